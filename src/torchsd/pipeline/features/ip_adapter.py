"""IP-Adapter: an image as a prompt. ``ip_adapter_image`` is encoded by CLIP's image tower
(``ip_adapter_encoder``: a CLIPVisionModelWithProjection folder; by default the ``image_encoder/`` folder
beside the adapter file or its parent, as h94/IP-Adapter lays them out), projected to a few context tokens by
the adapter (``ip_adapter_model``), and read by every cross-attention layer through its own keys and values
at ``ip_adapter_scale``. For classifier-free guidance the unconditional half gets the tokens of a zero image
embedding (basic) or of the encoder's features of a zero image (Plus), as diffusers and the reference code do.
The tokens and their keys and values are computed once per run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ...images import pil_to_tensor
from ...models.clip import preprocess_images
from .base import Feature, GenerationRequest, Run, StableDiffusion, number, parse_number


@dataclass(frozen=True)
class IPAdapterOptions:
    ip_adapter_image: Image.Image | None = None
    ip_adapter_model: str | Path | None = None
    ip_adapter_encoder: str | Path | None = None
    ip_adapter_scale: float = 1.0


class IPAdapterDenoiser:
    """A denoiser model whose U-Net calls carry the IP-Adapter's keys and values, one row per context row:
    the unconditional rows (``uncond_rows``, told by classifier-free guidance) get the negative image's."""

    takes_unconditional_rows = True

    def __init__(self, model, adapter, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor, scale: float):
        self.model = model
        self.prediction_type = model.prediction_type
        self.scale = scale
        self.cond = adapter.keys_values(cond_tokens, scale)
        self.uncond = adapter.keys_values(uncond_tokens, scale)
        self._rows: dict[tuple[int, int], list] = {}

    @property
    def accepts_several_contexts(self) -> bool:
        return self.model.accepts_several_contexts

    def keys_values(self, rows: int, uncond_rows: int) -> list:
        if (rows, uncond_rows) not in self._rows:
            def expand(t: torch.Tensor, n: int) -> torch.Tensor:
                return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t.repeat(n // t.shape[0], 1, 1)

            built = []
            for (k, v, s), (k_u, v_u, _) in zip(self.cond, self.uncond):
                if uncond_rows:
                    k = torch.cat([expand(k_u, uncond_rows), expand(k, rows - uncond_rows)])
                    v = torch.cat([expand(v_u, uncond_rows), expand(v, rows - uncond_rows)])
                built.append((k, v, s))
            self._rows[(rows, uncond_rows)] = built
        return self._rows[(rows, uncond_rows)]

    def __call__(self, x, sigma, context, concat=None, *, uncond_rows: int = 0, **unet_inputs):
        if getattr(self.model, "takes_unconditional_rows", False):
            unet_inputs["uncond_rows"] = uncond_rows
        kv = self.keys_values(context.shape[0], uncond_rows)
        return self.model(x, sigma, context, concat, image_keys_values=kv, **unet_inputs)


def default_encoder(model: Path) -> Path:
    for folder in (model.parent / "image_encoder", model.parent.parent / "image_encoder",
                   model.parent / "models" / "image_encoder"):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"no image encoder found beside {model} (an image_encoder/ folder there or one level up, as "
                     f"h94/IP-Adapter lays it out); give one with ip_adapter_encoder / --ip-adapter-encoder")


class IPAdapterFeature(Feature):
    name = "ip_adapter"
    Options = IPAdapterOptions
    binary_names = ("ip_adapter_image",)

    def validate(self, options: IPAdapterOptions, request: GenerationRequest) -> IPAdapterOptions:
        if options.ip_adapter_image is None:
            if options.ip_adapter_model is not None:
                raise ValueError("ip_adapter_model needs an ip_adapter_image (--ip-adapter-image)")
            return options
        if not isinstance(options.ip_adapter_image, Image.Image):
            raise ValueError("ip_adapter_image must be a PIL image")
        if options.ip_adapter_model is None:
            raise ValueError("ip_adapter_image needs ip_adapter_model: an ip-adapter_*.bin or .safetensors file")
        for name, off in (("deep_cache_interval", 1), ("tome_ratio", 0)):
            if (getattr(request, name, off) or off) != off:
                raise ValueError(f"an IP-Adapter does not work with {name} (its U-Net path does not carry the "
                                 f"image keys and values); set {name} to {off}")
        scale = options.ip_adapter_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"ip_adapter_scale must be a finite number; got {scale!r}")
        return options

    def active(self, options: IPAdapterOptions) -> bool:
        return options.ip_adapter_image is not None

    def prepare(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> None:
        from ...checkpoints.ip_adapter import load_image_encoder, load_ip_adapter

        options = request.options(self)
        model = Path(options.ip_adapter_model)
        if not model.exists():  # a name, as the A1111 API sends it: found among the control models
            from .control import control_models

            model = control_models(sd).resolve(options.ip_adapter_model)
        encoder_path = Path(options.ip_adapter_encoder) if options.ip_adapter_encoder else default_encoder(model)
        cache = sd.__dict__.setdefault("_ip_adapters", {})
        key = (str(model.resolve()), str(encoder_path.resolve()), sd.device, sd.dtype)
        if key not in cache:
            cache.clear()  # one at a time: an image encoder is 2.5 GB
            cache[key] = (load_ip_adapter(model, sd.unet, dtype=sd.dtype, device=sd.device),
                          load_image_encoder(encoder_path, dtype=sd.dtype, device=sd.device))
        adapter, encoder = cache[key]
        with torch.no_grad():
            image = pil_to_tensor(options.ip_adapter_image.convert("RGB")).to(sd.device, sd.dtype)  # [-1, 1]
            pixels = preprocess_images(image, encoder.vision.config.image_size)
            plus = adapter.config.plus
            features = encoder.features(pixels, plus)
            negative = encoder.features(torch.zeros_like(pixels), plus) if plus else torch.zeros_like(features)
            run.state[self.name] = (adapter, adapter.image_tokens(features), adapter.image_tokens(negative), model)

    def wrap_model(self, model, sd, request, run: Run, sigmas):
        adapter, cond, uncond, _ = run.state[self.name]
        return IPAdapterDenoiser(model, adapter, cond, uncond, request.options(self).ip_adapter_scale)

    # --- interfaces ------------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run, index) -> dict:
        options = request.options(self)
        return {"IP-Adapter": run.state[self.name][3].stem,  # the file found, not the name asked for
                "IP-Adapter scale": number(options.ip_adapter_scale)}

    def from_infotext(self, params: dict[str, str]) -> dict:
        # the model is written by name only, and the image not at all: --from takes the scale; the image and
        # the model file are given again (--ip-adapter-image, --ip-adapter-model)
        fields = {}
        if "IP-Adapter scale" in params:
            fields["ip_adapter_scale"] = parse_number(params, "IP-Adapter scale", float)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ip-adapter-image", type=Path, default=None, help="image prompt (IP-Adapter)")
        parser.add_argument("--ip-adapter-model", type=Path, default=None, help="ip-adapter_*.bin or .safetensors")
        parser.add_argument("--ip-adapter-encoder", type=Path, default=None,
                            help="CLIP image encoder folder (default: image_encoder/ beside the adapter)")
        parser.add_argument("--ip-adapter-scale", type=float, default=1.0)

    def from_arguments(self, args: argparse.Namespace) -> dict:
        fields = {name: getattr(args, name) for name in ("ip_adapter_model", "ip_adapter_encoder",
                                                          "ip_adapter_scale") if hasattr(args, name)}
        path = getattr(args, "ip_adapter_image", None)
        if path is not None:
            from ...images import open_image

            fields["ip_adapter_image"] = open_image(path, what="IP-Adapter image")
        return fields


IP_ADAPTER = IPAdapterFeature()

"""TAESD files in: madebyollin's ``taesd_encoder.pth`` / ``taesd_decoder.pth`` (or ``.safetensors``; the
taesdxl / taesd3 / taef1 names too), a folder holding them, or a diffusers ``AutoencoderTiny`` folder
(``diffusion_pytorch_model.safetensors`` with ``encoder.layers.N`` / ``decoder.layers.N`` keys).

A folder may hold the files of several families, as AUTOMATIC1111's and Forge's ``models/VAE-taesd`` does:
``family`` picks the ones named for it (taesd for SD 1/2, taesdxl, taesd3 for SD 3, taef1 for FLUX.1).
TAESD3 and TAEF1 have 16 latent channels and, like TAESD, read the latents the denoiser sees (for SD 3 and
FLUX.1: (z - shift) * scale), so every family's preview is ``decode(latents)``.

The architecture (levels, blocks per level, widths, latent channels) is read from the keys and shapes, and
the key set is checked exactly. madebyollin's decoder starts with a parameter-free clamp module, so its
layer N is diffusers' layer N-1.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from .io import CheckpointError, load_state_dict

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# madebyollin's file names per model family: <name>_encoder.*, <name>_decoder.*
FAMILY_NAMES = {"sd1": "taesd", "sd2": "taesd", "sdxl": "taesdxl", "sd3": "taesd3", "flux": "taef1"}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _levels(layers: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, blocks) per level from a Sequential's keys: convs separate levels, blocks are counted."""
    indices = sorted({int(k.split(".")[0]) for k in layers})
    kinds = ["block" if f"{i}.conv.0.weight" in layers else "conv" for i in indices]
    channels, blocks = [], []
    for i, kind in zip(indices, kinds):
        if kind == "block":
            if not blocks:
                raise CheckpointError("a TAESD whose layers start with a block instead of a conv")
            blocks[-1] += 1
            channels[-1] = layers[f"{i}.conv.0.weight"].shape[0]
        else:
            channels.append(0)
            blocks.append(0)
    # encoder: conv, blocks | conv, blocks | … | conv_out; decoder: conv_in, blocks | conv, blocks | … | conv_out.
    # Either way each level is a conv and the blocks after it, and the last conv has none
    return tuple(channels[:-1]), tuple(blocks[:-1])


def _config(encoder: dict | None, decoder: dict | None) -> TinyAutoencoderConfig:
    fields = {}
    if encoder is not None:
        last = max(int(k.split(".")[0]) for k in encoder)
        fields["latent_channels"] = encoder[f"{last}.weight"].shape[0]
        fields["encoder_channels"], fields["encoder_blocks"] = _levels(encoder)
    if decoder is not None:
        fields["latent_channels"] = decoder["0.weight"].shape[1]
        fields["decoder_channels"], fields["decoder_blocks"] = _levels(decoder)
    return TinyAutoencoderConfig(**fields)


def _read_halves(path: Path, family: str | None = None) -> tuple[dict | None, dict | None, str]:
    """(encoder layers, decoder layers, where from), keys relative to each half's Sequential. In a folder,
    the files named for ``family`` where there are some, else the first in name order."""
    if path.is_dir():
        for name in DIFFUSERS_WEIGHTS:
            if (path / name).is_file():
                return _read_halves(path / name)
        encoder = [p for p in sorted(path.iterdir()) if re.search(r"_encoder$", p.stem) and p.suffix in SUFFIXES]
        decoder = [p for p in sorted(path.iterdir()) if re.search(r"_decoder$", p.stem) and p.suffix in SUFFIXES]
        own = FAMILY_NAMES.get(family or "")
        if own is not None and any(p.stem == f"{own}_decoder" for p in decoder):
            encoder = [p for p in encoder if p.stem == f"{own}_encoder"]
            decoder = [p for p in decoder if p.stem == f"{own}_decoder"]
        if not encoder and not decoder:
            raise CheckpointError(f"{path}: no TAESD here: expected taesd_encoder/taesd_decoder .pth or .safetensors "
                                  f"files, or a diffusers AutoencoderTiny folder (diffusion_pytorch_model.*)")
        halves = [_read_halves(p[0])[n] if p else None for n, p in enumerate((encoder, decoder))]
        return halves[0], halves[1], str(path)
    state = load_state_dict(path)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in state):  # diffusers
        encoder = {k[len("encoder.layers."):]: v for k, v in state.items() if k.startswith("encoder.layers.")}
        decoder = {k[len("decoder.layers."):]: v for k, v in state.items() if k.startswith("decoder.layers.")}
        return encoder or None, decoder or None, str(path)
    if not all(re.match(r"\d+\.", k) for k in state):
        raise CheckpointError(f"{path}: not a TAESD file: expected madebyollin's keys (0.weight, 1.conv.0.weight …) "
                              f"or diffusers' (encoder.layers.…, decoder.layers.…); first keys: "
                              f"{', '.join(sorted(state)[:3])}")
    if path.stem.endswith("_decoder") or "0.weight" not in state:  # the decoder's layer 0 is the clamp
        shifted = {}
        for key, value in state.items():
            index, _, rest = key.partition(".")
            shifted[f"{int(index) - 1}.{rest}"] = value
        return None, shifted, str(path)
    return state, None, str(path)


def load_taesd(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, *, family: str | None = None
               ) -> TinyAutoencoder:
    """A TAESD from a file or folder (see the module docstring); a decoder file alone gives a decoder only.
    ``family`` ("sd1", "sdxl", "sd3", "flux" …): in a folder, its files (taesd3_decoder.pth …) first."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such TAESD file or folder")
    encoder, decoder, where = _read_halves(path, family)
    try:
        model = TinyAutoencoder(_config(encoder, decoder), encoder=encoder is not None, decoder=decoder is not None)
    except (ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"{where}: the TAESD's layers do not form a known architecture: {err}") from None
    state = {f"encoder.layers.{k}": v for k, v in (encoder or {}).items()}
    state.update({f"decoder.layers.{k}": v for k, v in (decoder or {}).items()})
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: the TAESD's keys do not fit {model.config}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model.load_state_dict(state)
    return model.to(device, dtype).eval().requires_grad_(False)

"""ControlNet units: ``control=[ControlUnit(image=..., model=..., weight=...), ...]``.

A unit's model may also be a T2I-Adapter, SD 1.x/2.x's or SDXL's (as the A1111 extension lists both among its
models): its features are added to the U-Net's down levels (and, SDXL's, to its middle block) with the unit's
weight, start/end and, for "ControlNet is more important", on the conditional rows only.

Each unit names a ControlNet (a path, or a name found in the control folders: ``--control-dir``, the
server's ``<models-dir>/ControlNet``), a hint image (optionally run through a built-in preprocessor:
``control_detect.py``), a weight, the fraction of the steps it acts on and a control mode. The residuals are
computed inside the denoiser at every U-Net call (``diffusion/control.py``), so every sampler, image-to-image,
inpainting and the hires pass (with the hint resized to its size) are controlled alike; several units add up.

Control modes, as the AUTOMATIC1111 extension defines them:

- "Balanced": every residual times the weight, on the conditional and the unconditional rows;
- "My prompt is more important": residual i of 13 times weight * 0.825**(12 - i) (the deep ones count,
  the shallow ones fade), on both rows ("soft injection");
- "ControlNet is more important": the same scales, on the conditional rows only ("CFG injection": the
  unconditional prediction sees no control, so guidance amplifies it). This is lllyasviel's "guess mode";
  diffusers' ``guess_mode`` does the same with scales logspace(-1, 0) instead of 0.825 powers.

Resize modes (hint image to the generation's size): "Just Resize" stretches, "Crop and Resize" fills the
frame and crops the overflow (centred), "Resize and Fill" fits inside and pads with black (no control).
"""

from __future__ import annotations

import argparse
import math
import re
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...diffusion.control import ControlInput, ControlledDenoiser, soft_scales
from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion
from .control_detect import MODULES, detect, module_name

BUNDLED = "bundled"  # --control-model bundled: the ControlNet that ships with the bundled model
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HIRES_OPTIONS = ("Both", "Low res only", "High res only")
_HIRES_NAMES = {"both": 0, "low res only": 1, "low": 1, "high res only": 2, "high": 2}
_MODE_NAMES = {"balanced": 0, "prompt": 1, "my prompt is more important": 1, "control": 2, "controlnet": 2,
               "controlnet is more important": 2}
_RESIZE_NAMES = {"just resize": 0, "resize": 0, "crop and resize": 1, "crop": 1, "resize and fill": 2, "fill": 2,
                 "inner fit (scale to fit)": 2, "outer fit (shrink to fit)": 1, "envelope (outer fit)": 1}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet. ``image``: a PIL image or a path; ``model``: a file or diffusers folder, or a name in
    the control folders; ``guidance_start``/``guidance_end``: the fraction of the steps it acts on;
    ``control_mode``/``resize_mode``: one of CONTROL_MODES / RESIZE_MODES (or its index, or a short name:
    "balanced", "prompt", "control"; "resize", "crop", "fill"); ``module``: a built-in preprocessor with its
    thresholds (canny: low and high, 0-255)."""

    image: Image.Image | str | Path | None = None
    model: str | Path = ""
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "Balanced"
    resize_mode: str | int = "Crop and Resize"
    module: str = "none"
    threshold_a: float | None = None
    threshold_b: float | None = None
    hires_option: str = "Both"  # with hires fix: "Both" passes, "Low res only", "High res only"

    def normalised(self) -> "ControlUnit":
        """Checked, with canonical names; raises ValueError saying how to fix a bad value."""
        if isinstance(self.image, (str, Path)):
            path = Path(self.image)
            if not path.is_file():
                raise ValueError(f"control image {str(path)!r} does not exist")
            image = Image.open(path)
            image.load()
        else:
            image = self.image
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"a control unit's image must be a PIL image or a path; got {type(image).__name__}")
        if not self.model or not isinstance(self.model, (str, Path)):
            raise ValueError("a control unit needs a model: a ControlNet file or folder, or its name in the control "
                             "folder (--control-model, <models-dir>/ControlNet)")
        for name in ("weight", "guidance_start", "guidance_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"control {name} must be a finite number; got {value!r}")
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            raise ValueError(f"control guidance start and end are fractions of the steps with 0 <= start <= end <= 1; "
                             f"got {self.guidance_start} and {self.guidance_end}")
        return replace(self, image=image, weight=float(self.weight), guidance_start=float(self.guidance_start),
                       guidance_end=float(self.guidance_end),
                       control_mode=CONTROL_MODES[_choice(self.control_mode, CONTROL_MODES, _MODE_NAMES,
                                                          "control mode")],
                       resize_mode=RESIZE_MODES[_choice(self.resize_mode, RESIZE_MODES, _RESIZE_NAMES,
                                                        "resize mode")],
                       module=module_name(self.module),
                       hires_option=HIRES_OPTIONS[_choice(self.hires_option, HIRES_OPTIONS, _HIRES_NAMES,
                                                          "hires option")])

    @property
    def model_name(self) -> str:
        return Path(self.model).stem if Path(self.model).suffix else Path(self.model).name


def _choice(value, names: tuple[str, ...], aliases: dict[str, int], what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and value.strip().lower() in aliases:
        return aliases[value.strip().lower()]
    raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(repr(n) for n in names)} "
                     f"(or 0-{len(names) - 1})")


@dataclass(frozen=True)
class ControlOptions:
    control: tuple[ControlUnit, ...] = ()


# --- the hint image --------------------------------------------------------------------------------------------

def fit_image(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """``image`` at width x height by the unit's resize mode (see the module docstring)."""
    image = image.convert("RGB")
    if resize_mode == "Just Resize" or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
    scale = (max if resize_mode == "Crop and Resize" else min)(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, ((width - w) // 2, (height - h) // 2))  # negative offsets crop, centred
    return canvas


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], as ControlNets were trained on."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def control_map(unit: ControlUnit, width: int, height: int) -> Image.Image:
    """The unit's hint at the given size: fitted, then preprocessed."""
    return detect(fit_image(unit.image, width, height, unit.resize_mode), unit.module, unit.threshold_a,
                  unit.threshold_b)


# --- the control models ----------------------------------------------------------------------------------------

class ControlModels:
    """The control folders of one pipeline and its loaded ControlNets (kept: loading one costs seconds)."""

    def __init__(self):
        self.dirs: list[Path] = []
        self.loaded: dict[tuple, torch.nn.Module] = {}

    def add_dir(self, folder: str | Path) -> None:
        if Path(folder) not in self.dirs:
            self.dirs.append(Path(folder))

    def names(self) -> dict[str, Path]:
        from ...checkpoints.controlnet import find_controlnets

        return find_controlnets(self.dirs)

    def resolve(self, model: str | Path) -> Path:
        path = Path(model)
        if path.exists():
            return path
        if str(model) == BUNDLED:
            from ...checkpoints import bundled_controlnet_path

            if not bundled_controlnet_path().is_file():
                raise ValueError(f"the bundled ControlNet {bundled_controlnet_path()} is missing from this "
                                 f"installation; reinstall torchsd or give a ControlNet file")
            return bundled_controlnet_path()
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(model))  # A1111 lists models as "name [hash]"
        found = self.names()
        if name in found:
            return found[name]
        where = ", ".join(str(d) for d in self.dirs) or "no control folder is set (--control-dir)"
        known = ", ".join(sorted(found)) or "none"
        raise ValueError(f"ControlNet {str(model)!r} not found: not a file or folder, nor a name in {where}. "
                         f"Known: {known}")

    def load(self, sd: StableDiffusion, model: str | Path) -> torch.nn.Module:
        """A ControlNet or a T2I-Adapter."""
        from ...checkpoints.controlnet import load_control_model

        path = self.resolve(model)
        key = (str(path.resolve()), sd.device, sd.dtype)
        if key not in self.loaded:
            self.loaded[key] = load_control_model(path, sd.config.unet, dtype=sd.dtype, device=sd.device,
                                                  latent_downscale=sd.config.vae.downscale_factor)
        return self.loaded[key]


_MODELS: "weakref.WeakKeyDictionary[object, ControlModels]" = weakref.WeakKeyDictionary()


def control_models(sd: StableDiffusion) -> ControlModels:
    """The pipeline's ControlModels (made on first use)."""
    if sd not in _MODELS:
        _MODELS[sd] = ControlModels()
    return _MODELS[sd]


def _check_fits(sd: StableDiffusion, net: torch.nn.Module, unit: ControlUnit) -> None:
    """A control model that cannot steer ``sd``'s U-Net, refused with both families named: a ControlNet made for
    another U-Net (an SD 1.x one on SDXL, an SDXL base's on the refiner), or a T2I-Adapter whose features do not
    have the sizes of the places the U-Net adds them (an SD 1.x/2.x adapter on SDXL, or the reverse)."""
    if not hasattr(net, "controlnet_down_blocks"):
        _check_adapter_fits(sd, net, unit)
        return
    from ...checkpoints.controlnet import family_of

    ours, theirs = net.config.unet, sd.config.unet
    fields = ("context_dim", "model_channels", "channel_mult", "num_res_blocks", "added_embed_dim")
    if all(getattr(ours, f) == getattr(theirs, f) for f in fields):
        return
    made_for = family_of(ours.context_dim, bool(ours.added_embed_dim))
    model = family_of(theirs.context_dim, bool(theirs.added_embed_dim))
    raise ValueError(f"ControlNet {unit.model_name!r} was made for an {made_for} U-Net ({ours.context_dim}-wide "
                     f"context, {ours.model_channels} channels) and does not fit {sd.name}, an {model} model "
                     f"({sd.config.family}: {theirs.context_dim}-wide context, {theirs.model_channels} channels); "
                     f"use a ControlNet made for this model's family")


def _check_adapter_fits(sd: StableDiffusion, adapter: torch.nn.Module, unit: ControlUnit) -> None:
    from ...models.unet import level_residual_shapes

    features = adapter.config.feature_shapes()
    places = level_residual_shapes(sd.config.unet)
    if features == places[:len(features)] and len(features) >= len(places) - 1:
        return

    def sizes(shapes):
        return ", ".join(f"{w} at 1/{s}" for w, s in shapes)

    made_for = "an SDXL" if adapter.config.layout == "full_adapter_xl" else "an SD 1.x/2.x"
    raise ValueError(f"T2I-Adapter {unit.model_name!r} ({made_for} adapter: features of {sizes(features)} of the "
                     f"latents' size) does not fit {sd.name}, an {'SDXL' if sd.config.is_sdxl else 'SD 1.x/2.x'} "
                     f"model ({sd.config.family}), whose U-Net adds them at {sizes(places[:-1])} and "
                     f"{sizes(places[-1:])} (the middle block); use a T2I-Adapter made for this model's family")


# --- the feature -------------------------------------------------------------------------------------------------

class Control(Feature):
    name = "control"
    Options = ControlOptions
    binary_names = ("control",)

    def validate(self, options: ControlOptions, request: GenerationRequest) -> ControlOptions:
        units = options.control
        if isinstance(units, ControlUnit):
            units = (units,)
        if not isinstance(units, (tuple, list)) or not all(isinstance(u, ControlUnit) for u in units):
            raise ValueError("control must be a list of ControlUnit(image=..., model=..., weight=...)")
        units = tuple(u.normalised() for u in units)
        if units and (getattr(request, "deep_cache_interval", 1) or 1) > 1:
            raise ValueError("ControlNet units and T2I-Adapters do not work with DeepCache (it reuses the deep "
                             "features their residuals change at every step); set deep_cache_interval to 1")
        for u in units:
            if u.image is None:
                raise ValueError(f"control unit {u.model_name!r} has no image; give one (--control IMAGE)")
        return ControlOptions(units)

    def active(self, options: ControlOptions) -> bool:
        return bool(options.control)

    def prepare(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> None:
        models = control_models(sd)
        units = request.options(self).control
        run.state[self.name] = [models.load(sd, u.model) for u in units]  # fail early
        for unit, net in zip(units, run.state[self.name]):
            _check_fits(sd, net, unit)

    def wrap_model(self, model, sd: StableDiffusion, request: GenerationRequest, run: Run, sigmas: torch.Tensor):
        units = request.options(self).control
        nets = run.state[self.name]
        inputs = []
        hires_pass = run.hires_steps is not None  # set while the hires pass samples
        for unit, net in zip(units, nets):
            _check_fits(sd, net, unit)  # also the model of a second loop (SDXL's refiner after the base)
            if unit.hires_option == HIRES_OPTIONS[2 if hires_pass else 1]:  # this pass is the other one
                continue
            # the hint's size is the latents' times the hint encoder's downscale (8, as the VAE's): the image's
            # size, or the hires pass's while it samples
            f = net.config.hint_downscale
            width, height = run.shape[-1] * f, run.shape[-2] * f
            if hasattr(net, "controlnet_down_blocks"):
                residuals = len(net.controlnet_down_blocks) + 1
                balanced = unit.control_mode == CONTROL_MODES[0]
                scales = [unit.weight] * residuals if balanced else soft_scales(unit.weight, residuals)
            else:  # a T2I-Adapter: the weight on every level (the 0.825 decay is ControlNet's 13 residuals')
                scales = [unit.weight] * len(net.config.widths)
            hint = hint_tensor(control_map(unit, width, height)).to(sd.device, sd.dtype)
            if getattr(net.config, "hint_channels", 3) == 1:  # the sketch adapter: one channel
                hint = hint.mean(dim=1, keepdim=True)
            inputs.append(ControlInput(net, hint, scales, unit.guidance_start, unit.guidance_end,
                                       cond_only=unit.control_mode == CONTROL_MODES[2]))
        return ControlledDenoiser(model, inputs, sigmas)

    # --- interfaces ------------------------------------------------------------------------------------------
    def infotext_params(self, sd: StableDiffusion, request: GenerationRequest, run: Run, index: int) -> dict:
        out = {}
        for i, u in enumerate(request.options(self).control):
            fields = [("Module", u.module), ("Model", u.model_name), ("Weight", _num(u.weight)),
                      ("Resize Mode", u.resize_mode), ("Guidance Start", _num(u.guidance_start)),
                      ("Guidance End", _num(u.guidance_end)), ("Control Mode", u.control_mode)]
            if u.threshold_a is not None:
                fields.append(("Threshold A", _num(u.threshold_a)))
            if u.threshold_b is not None:
                fields.append(("Threshold B", _num(u.threshold_b)))
            if u.hires_option != HIRES_OPTIONS[0]:
                fields.append(("Hr Option", u.hires_option))
            # the extension writes the unit as one quoted value (the infotext writer quotes it: it holds commas)
            out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields)
        return out

    def from_infotext(self, params: dict[str, str]) -> dict:
        units = []
        for key in sorted((k for k in params if re.fullmatch(r"ControlNet \d+", k)), key=lambda k: int(k.split()[1])):
            fields = dict(part.split(": ", 1) for part in re.split(r",\s*(?=[A-Z][\w ]*: )", params[key].strip('"'))
                          if ": " in part)
            units.append(ControlUnit(
                image=None, model=fields.get("Model", ""), weight=float(fields.get("Weight", 1.0)),
                guidance_start=float(fields.get("Guidance Start", 0.0)),
                guidance_end=float(fields.get("Guidance End", 1.0)),
                control_mode=fields.get("Control Mode", "Balanced"),
                resize_mode=fields.get("Resize Mode", "Crop and Resize"),
                module=fields.get("Module", "none"),
                threshold_a=float(fields["Threshold A"]) if "Threshold A" in fields else None,
                threshold_b=float(fields["Threshold B"]) if "Threshold B" in fields else None,
                hires_option=fields.get("Hr Option", "Both")))
        return {"control": tuple(units)} if units else {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser  # ControlNet units: each flag repeatable, the n-th of each makes unit n
        group.add_argument("--control", dest="control_images", action="append", default=[], metavar="IMAGE",
                           help="hint image of a ControlNet unit (repeatable: the n-th of each --control-* flag "
                                "belongs to the n-th unit)")
        group.add_argument("--control-model", dest="control_models", action="append", default=[],
                           metavar="FILE_OR_NAME",
                           help="ControlNet file, diffusers folder, or name in --control-dir; 'bundled': the "
                                "bundled model's (its control image: a shape's mask, white on black)")
        group.add_argument("--control-weight", dest="control_weights", action="append", default=[], type=float)
        group.add_argument("--control-start", dest="control_starts", action="append", default=[], type=float,
                           help="fraction of the steps where the unit starts (default 0)")
        group.add_argument("--control-end", dest="control_ends", action="append", default=[], type=float,
                           help="fraction of the steps where it stops (default 1)")
        group.add_argument("--control-mode", dest="control_modes", action="append", default=[],
                           help="balanced, prompt (my prompt is more important), "
                                                                   "control (ControlNet is more important)")
        group.add_argument("--control-resize", dest="control_resizes", action="append", default=[],
                           help="resize, crop (crop and resize, the default), fill (resize and fill)")
        group.add_argument("--control-preprocessor", dest="control_modules", action="append", default=[],
                           help=f"built-in preprocessor: {', '.join(MODULES)} (default none)")
        for side in ("a", "b"):  # the preprocessor's: canny's low and high thresholds (0-255)
            group.add_argument(f"--control-threshold-{side}", dest=f"control_thresholds_{side}", action="append",
                               default=[], type=float)
        group.add_argument("--control-hires", dest="control_hires", action="append", default=[],
                           help="with --hires: both (default), low (first pass only), high (hires pass only)")
        group.add_argument("--control-dir", action="append", default=[], type=Path,
                           help="folder of ControlNet models, used by name (repeatable)")

    def from_arguments(self, args: argparse.Namespace) -> dict:
        images = getattr(args, "control_images", [])
        given = getattr(args, "control", None)  # units read from an infotext (--from): their models and settings
        dests = {"model": "control_models", "weight": "control_weights", "guidance_start": "control_starts",
                 "guidance_end": "control_ends", "control_mode": "control_modes", "resize_mode": "control_resizes",
                 "module": "control_modules", "threshold_a": "control_thresholds_a",
                 "threshold_b": "control_thresholds_b", "hires_option": "control_hires"}
        lists = {name: getattr(args, dest, []) for name, dest in dests.items()}
        for folder in getattr(args, "control_dir", []):
            if not folder.is_dir():
                raise ValueError(f"folder {str(folder)!r} does not exist (--control-dir)")
        base = list(given or ())
        if not base and images and getattr(args, "from_image", None) is not None:
            base = list(_infotext_units(args.from_image))
        count = max([len(images), len(base)] + [len(v) for v in lists.values()])
        if not count:
            return {}
        for name, values in lists.items():
            if len(values) > max(len(images), len(base)):
                raise ValueError(f"{len(values)} --control-{name.replace('_', '-')} flags for "
                                 f"{max(len(images), len(base))} control units; give one --control IMAGE per unit")
        units = []
        for i in range(count):
            unit = base[i] if i < len(base) else ControlUnit()
            changes = {name: values[i] for name, values in lists.items() if i < len(values)}
            if i < len(images):
                changes["image"] = images[i]
            units.append(replace(unit, **changes))
        # with --from, the infotext's units (models, weights …) got their images here: mark them as given,
        # so that the infotext's image-less units do not replace them
        args.control = tuple(units)
        return {"control": tuple(units)}

    def configure_model(self, sd: StableDiffusion, args: argparse.Namespace) -> None:
        for folder in getattr(args, "control_dir", []):
            control_models(sd).add_dir(folder)

    def from_a1111(self, fields: A1111Fields) -> dict:
        """``alwayson_scripts.controlnet.args``: a list of units as webuiapi's ControlNetUnit.to_dict() sends
        them (taken out of the body by the server, which checks the rest of alwayson_scripts)."""
        scripts = fields.get("alwayson_scripts") or {}
        entry = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None) \
            if isinstance(scripts, dict) else None
        args = entry.get("args") if isinstance(entry, dict) else entry
        if not args:
            return {}
        if not isinstance(args, list):
            raise fields.error("alwayson_scripts.controlnet.args must be a list of ControlNet units")
        units = []
        ip_adapter: dict = {}  # the extension runs IP-Adapters as units too (module ip-adapter_clip_*)
        for n, raw in enumerate(args):
            if raw is False or raw is None:
                continue
            if not isinstance(raw, dict):
                raise fields.error(f"alwayson_scripts.controlnet.args[{n}] must be an object (a ControlNet unit)")
            unit = A1111Fields(raw, img2img=fields.img2img, width=fields.width, height=fields.height,
                               decode_image=fields.decode_image, error=fields.error)
            if not unit.bool("enabled", True):
                continue
            model = unit.str("model", "None")
            if model in ("", "None", "none"):
                raise fields.error(f"ControlNet unit {n}: no model; choose one of /controlnet/model_list")
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # the extension's {"image": b64, "mask": b64} form
                image = image.get("image")
            if not image:
                raise fields.error(f"ControlNet unit {n}: no image (torchsd does not reuse the img2img image); "
                                   f"send one as base64")
            module = unit.str("module", "none") or "none"
            if module.lower().startswith("ip-adapter") or "ip-adapter" in model.lower():
                if ip_adapter:
                    raise fields.error("one IP-Adapter unit at a time: torchsd applies a single IP-Adapter")
                if unit.float("guidance_start", 0.0) != 0 or unit.float("guidance_end", 1.0) != 1:
                    raise fields.error(f"ControlNet unit {n} (IP-Adapter): torchsd applies an IP-Adapter at every "
                                       f"step; set guidance_start 0 and guidance_end 1")
                ip_adapter = {"ip_adapter_image": fields.decode_image(image, f"alwayson_scripts.controlnet."
                                                                                f"args[{n}].image"),
                              "ip_adapter_model": model, "ip_adapter_scale": unit.float("weight", 1.0)}
                continue
            mode = unit.get("control_mode", 0)
            if unit.get("guessmode"):  # the extension's old field
                mode = 2
            try:
                units.append(ControlUnit(
                    image=fields.decode_image(image, f"alwayson_scripts.controlnet.args[{n}].image"), model=model,
                    weight=unit.float("weight", 1.0), guidance_start=unit.float("guidance_start", 0.0),
                    guidance_end=unit.float("guidance_end", 1.0), control_mode=mode,
                    resize_mode=unit.get("resize_mode", "Crop and Resize"), module=unit.str("module", "none") or "none",
                    threshold_a=_threshold(unit, "threshold_a"), threshold_b=_threshold(unit, "threshold_b"),
                    hires_option=unit.str("hr_option", "Both") or "Both").normalised())
            except ValueError as err:
                raise fields.error(f"ControlNet unit {n}: {err}") from None
        return ({"control": tuple(units)} if units else {}) | ip_adapter


def _infotext_units(path) -> tuple[ControlUnit, ...]:
    """The ControlNet units of a PNG's infotext (``--from IMAGE``), without their images."""
    from ..infotext import parse_infotext, read_png_infotext

    text = read_png_infotext(path)
    return CONTROL.from_infotext(parse_infotext(text)).get("control", ()) if text else ()


def _threshold(unit: A1111Fields, name: str) -> float | None:
    """The extension sends -1 or 64 (webuiapi's default) for an unused slider: keep the module's default then."""
    value = unit.float(name, None)
    module = module_name(unit.str("module", "none") or "none")
    used = MODULES[module][0 if name == "threshold_a" else 1]
    return None if value is None or value < 0 or used is None else value


def _num(value: float):
    return int(value) if float(value).is_integer() else value


CONTROL = Control()

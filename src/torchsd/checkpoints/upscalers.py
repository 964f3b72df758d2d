"""Upscaler files (``models/ESRGAN``) in, as AUTOMATIC1111 finds them: the name is the file stem.

Three key layouts: BasicSR's RRDBNet (``conv_first``, ``body.N.rdb1.conv1``, ``conv_up1`` …; Real-ESRGAN's
x4plus / x2plus / anime files, usually wrapped in ``params_ema``), the original ESRGAN repository's
(``model.0``, ``model.1.sub.N.RDB1.conv1.0`` …; most community "4x_*.pth" files), and Real-ESRGAN's
SRVGGNetCompact (``body.0``, ``body.1`` = PReLU …). Files are read with ``torch.load(weights_only=True)`` or
safetensors only; the architecture is read from the shapes, and the key set is checked exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..models.upscalers import CompactConfig, RRDBConfig, RRDBNet, SRVGGNetCompact
from .io import CheckpointError, load_state_dict
from .library import FileLibrary

SUFFIXES = (".pth", ".pt", ".safetensors")


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def _old_esrgan_to_basicsr(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.0`` conv_first, ``model.1.sub.N.RDBk.convj.0`` the body, ``model.1.sub.<last>`` conv_body, then
    upsampling convs every 3 indices (``model.3``, ``model.6`` …) and the last two convs: conv_hr, conv_last."""
    blocks = _count(state, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
    tail = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k))} - {0})
    if len(tail) < 2:
        raise CheckpointError("an ESRGAN file without its final convolutions (model.N.weight); it is incomplete")
    names = {0: "conv_first", tail[-2]: "conv_hr", tail[-1]: "conv_last"}
    names.update({n: f"upsamplers.{i}" for i, n in enumerate(tail[:-2])})
    out = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = tensor
        elif m := re.fullmatch(rf"model\.1\.sub\.{blocks}\.(weight|bias)", key):
            out[f"conv_body.{m[1]}"] = tensor
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = tensor
        else:
            out[key] = tensor  # left for the exact key check to name
    return out


def _rrdb(state: dict[str, torch.Tensor]) -> RRDBNet:
    state = {re.sub(r"^conv_up(\d+)\.", lambda m: f"upsamplers.{int(m[1]) - 1}.", k): v for k, v in state.items()}
    first, last = state["conv_first.weight"], state["conv_last.weight"]
    out_channels = last.shape[0]
    unshuffle = {out_channels: 1, out_channels * 4: 2, out_channels * 16: 4}.get(first.shape[1])
    if unshuffle is None:
        raise CheckpointError(f"an RRDBNet whose first conv takes {first.shape[1]} channels for {out_channels} out: "
                              f"not an ESRGAN layout torchsd knows")
    config = RRDBConfig(in_channels=first.shape[1] // unshuffle ** 2, out_channels=out_channels,
                        features=first.shape[0], growth=state["body.0.rdb1.conv1.weight"].shape[0],
                        blocks=_count(state, r"body\.(\d+)\.rdb1\.conv1\.weight"),
                        upsamplings=_count(state, r"upsamplers\.(\d+)\.weight"), unshuffle=unshuffle)
    return _filled(RRDBNet(config), state)


def _compact(state: dict[str, torch.Tensor]) -> SRVGGNetCompact:
    last = max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    first = state["body.0.weight"]
    in_channels, features = first.shape[1], first.shape[0]
    out_total = state[f"body.{last}.weight"].shape[0]
    scale = round((out_total / in_channels) ** 0.5)
    config = CompactConfig(in_channels=in_channels, out_channels=out_total // scale ** 2, features=features,
                           convs=(last - 2) // 2, scale=scale)
    return _filled(SRVGGNetCompact(config), state)


def _filled(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"the upscaler's keys do not fit a {type(model).__name__} {model.config}: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


def load_upscaler(path: str | Path) -> nn.Module:
    """An ESRGAN-family network from a file (float32, on the CPU, in eval mode)."""
    path = Path(path)
    state = load_state_dict(path)
    try:
        if "model.0.weight" in state and any(".RDB1." in k for k in state):
            if any("conv1x1" in k for k in state):
                raise CheckpointError("an ESRGAN+ (\"plus\") file, whose dense blocks have extra 1x1 convs; "
                                      "torchsd reads ESRGAN, Real-ESRGAN and SRVGGNetCompact files")
            return _rrdb(_old_esrgan_to_basicsr(state))
        if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
            return _rrdb(state)
        if "body.0.weight" in state and "body.1.weight" in state and state["body.1.weight"].ndim == 1:
            return _compact(state)
        if any(".residual_group." in k for k in state):  # SwinIR's (and Swin2SR's) transformer groups
            raise CheckpointError("a SwinIR file: torchsd reads the ESRGAN family only (ESRGAN, Real-ESRGAN and "
                                  "SRVGGNetCompact files such as 4x-UltraSharp or R-ESRGAN 4x+); SwinIR is not "
                                  "supported yet")
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    raise CheckpointError(f"{path}: not an upscaler torchsd reads: expected ESRGAN keys (model.0.weight, "
                          f"model.1.sub.0.RDB1…), BasicSR RRDBNet keys (conv_first, body.0.rdb1…) or "
                          f"SRVGGNetCompact keys (body.0.weight, body.1.weight); first keys: "
                          f"{', '.join(sorted(state)[:3])}")


@dataclass
class UpscalerLibrary(FileLibrary):
    """The folders of upscaler files; an upscaler's name is its file stem ("R-ESRGAN 4x+.pth" ->
    "R-ESRGAN 4x+"), as AUTOMATIC1111 lists them."""

    suffixes: ClassVar[tuple[str, ...]] = SUFFIXES
    missing_folder: ClassVar[str] = ("upscaler folder {folder!r} does not exist; give a folder of ESRGAN-family "
                                     ".pth/.safetensors files (--upscalers-dir)")
    max_cached: int = 2

    def find(self, name: str) -> Path | None:
        files = self.files()
        if name in files:
            return files[name]
        folded = {key.lower(): path for key, path in files.items()}
        return folded.get(name.lower())

    def load(self, name: str) -> nn.Module:
        path = self.find(name)
        if path is None:
            raise ValueError(f"unknown upscaler {name!r}; in {', '.join(map(str, self.dirs)) or 'no folder'}: "
                             f"{', '.join(sorted(self.files())) or 'none'}")
        return self.cached(path, lambda: load_upscaler(path))

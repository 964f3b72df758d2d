"""Offloading: weights live in CPU memory and visit the accelerator only while they compute.

- model offload: a network (text encoder, U-Net or flow transformer, VAE) is uploaded whole when it is
  called, and the one that ran before goes back; the U-Net stays up for the whole sampling loop, and the
  text encoders are back in CPU memory before it starts. Costs one upload
  per network per image; peak accelerator memory is the largest network plus its activations.
- sequential offload: every layer is uploaded just before its own forward and dropped after it.
  The least memory (one layer's weights), the most transfers: for the smallest GPUs.

The CPU copy of each weight is kept (pinned, for asynchronous uploads), so "going back" only drops
the accelerator copy: nothing is copied down. Both are forward hooks, registered on the modules and
removable with ``Offload.remove()``; the modules' code is untouched.

Sequential offload relies on every weight being used through its own module's forward, which holds
for the U-Net, the flow transformers (MMDiT, FLUX.1: quantized layers too, whose stored bytes are
their buffers), VAE and text encoders, plain or optimized: the fast blocks of ``accel.modules`` read a
layer's weight themselves only where the layer has no hooks (``fused.is_plain``), and call it otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


class Offload:
    """The hooks and the CPU home of each tensor."""

    def __init__(self, device: torch.device):
        self.device = device
        self.home: dict[int, torch.Tensor] = {}  # id(tensor holder) -> CPU copy
        self.handles: list = []
        self.resident: list[torch.Tensor] | None = None  # model offload: the network on the device

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        pin = self.device.type == "cuda"
        for t in tensors:
            cpu = t.data.to("cpu")
            self.home[id(t)] = cpu.pin_memory() if pin else cpu
            t.data = self.home[id(t)]

    def upload(self, tensors: list[torch.Tensor]) -> None:
        # copy=True: a real copy even where device and home are both the CPU (as in the tests)
        for t in tensors:
            t.data = self.home[id(t)].to(self.device, non_blocking=True, copy=True)

    def evict(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.data = self.home[id(t)]

    def is_uploaded(self, t: torch.Tensor) -> bool:
        return t.data.data_ptr() != self.home[id(t)].data_ptr()

    def remove(self) -> None:
        """Unhook; every weight is left in CPU memory (move the networks where you want them next)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.resident is not None:
            self.evict(self.resident)
        self.resident = None


def _tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _groups(sd) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Each network of a pipeline with the modules whose call means "this network is about to run"."""
    vae = [m for m in (sd.vae.encoder, sd.vae.decoder, sd.vae.quant_conv, sd.vae.post_quant_conv) if m is not None]
    if hasattr(sd, "unet"):  # SD 1/2, SDXL: SDXL's encoders are called through ``penultimate``, which looks
        # up the token embedding first
        return [(encoder, [encoder, encoder.token_embedding]) for encoder in sd.text_encoders] + [
                (sd.unet, [sd.unet]), (sd.vae, vae)]
    # SD 3 / FLUX.1 (pipeline/flow_model.py). A pipeline that frees its text encoders after each use reads
    # them from their files straight to the execution device: they are not offloaded, only the others are
    encoders = [] if sd.free_text_encoders else [m for m in sd.text_encoders.values() if m is not None]
    return [(encoder, [encoder]) for encoder in encoders] + [(sd.transformer, [sd.transformer]), (sd.vae, vae)]


def _execution_device(sd, device: torch.device) -> None:
    sd.execution_device = device
    if getattr(sd, "free_text_encoders", False):  # the encoders read at load run where the others do
        for encoder in sd.text_encoders.values():
            encoder.to(device)


def enable_model_offload(sd, device: torch.device | str) -> Offload:
    """One network at a time on ``device``; the others wait in CPU memory (see module doc)."""
    offload = Offload(torch.device(device))
    for network, triggers in _groups(sd):
        tensors = _tensors(network, recurse=True)
        offload.adopt(tensors)

        def bring_up(module, args, tensors=tensors):
            if offload.resident is not tensors:
                if offload.resident is not None:
                    offload.evict(offload.resident)
                offload.upload(tensors)
                offload.resident = tensors

        offload.handles += [m.register_forward_pre_hook(bring_up) for m in triggers]
    _execution_device(sd, offload.device)
    return offload


def enable_sequential_offload(sd, device: torch.device | str) -> Offload:
    """Each layer's own weights on ``device`` only during its forward (see module doc)."""
    offload = Offload(torch.device(device))
    for network, _ in _groups(sd):
        for module in network.modules():
            tensors = _tensors(module, recurse=False)
            if not tensors:
                continue
            offload.adopt(tensors)
            offload.handles.append(module.register_forward_pre_hook(
                lambda m, args, tensors=tensors: offload.upload(tensors)))
            offload.handles.append(module.register_forward_hook(
                lambda m, args, out, tensors=tensors: offload.evict(tensors)))
    _execution_device(sd, offload.device)
    return offload

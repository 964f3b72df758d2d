"""FLUX.1-dev's transformer on one GPU: 1024x1024, bf16, batch 1, distilled guidance; torchsd against diffusers'
FluxTransformer2DModel holding the *same* tensors (random weights, FLUX.1-dev's published size, 11.9 B).

    PYTHONPATH=src python benchmarks/gpu_flux.py                 # GPU: about 24 GiB of weights, a minute or two
    PYTHONPATH=src python benchmarks/gpu_flux.py --tiny          # tiny model on the CPU: checks the script

The GPU machine has no diffusers: carry ``.whl/`` and install it first, as ``gpu_issue10.sh`` does.

Printed for each: it/s of a flow-matching Euler loop (``--steps`` steps after ``--warmup``; CUDA events around
the loop), peak memory allocated during the loop above the weights, and once: the weights' size and both
outputs' agreement on one call (max |difference| relative to the output's max). Text encoding and the VAE are
not in the loop (the transformer is what a step costs); the inputs are random tensors of the right shapes
(512 T5 tokens, pooled CLIP-L).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from torchsd.checkpoints.flux import config_to_diffusers, to_diffusers
from torchsd.config import FluxConfig
from torchsd.models.flux import Flux, image_ids, pack, unpack

TINY = FluxConfig(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=16, context_dim=32, pooled_dim=16,
                  axes_dims_rope=(4, 6, 6))


def random_flux(config: FluxConfig, device: torch.device, dtype: torch.dtype) -> Flux:
    """Built without its random init (meta, then empty on the device), filled N(0, 0.02) (norms near 1)."""
    with torch.device("meta"):
        model = Flux(config)
    model = model.to_empty(device=device).to(dtype).eval()
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=gen)
    return model


def diffusers_sharing(model: Flux, config: FluxConfig):
    """diffusers' FluxTransformer2DModel on the same tensors (the key map is a renaming: nothing is copied)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**config_to_diffusers(config))
    theirs.load_state_dict(to_diffusers(model.state_dict(), config), strict=True, assign=True)
    return theirs.eval()


def call_diffusers(model, x, t, context, pooled, guidance):
    _, _, H, W = x.shape
    out = model(pack(x, 2), timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3, device=x.device),
                img_ids=image_ids(H // 2, W // 2, x.device), return_dict=False)[0]
    return unpack(out, H // 2, W // 2, 2)


def loop(step, x: torch.Tensor, steps: int, warmup: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Euler over FLUX.1-dev's shifted sigmas (mu = 1.15, FluxPipeline's at 4096 image tokens): it/s, and the
    peak GiB allocated above what was allocated at the start."""
    sigmas = torch.linspace(1, 1 / (steps + warmup), steps + warmup + 1)
    sigmas = math.exp(1.15) / (math.exp(1.15) + (1 / sigmas.clamp(min=1e-6) - 1))  # FluxPipeline's dynamic shift
    sigmas[-1] = 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start_event = end_event = None
    start = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            if cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
            start = time.perf_counter()
        v = step(x, sigmas[i].reshape(1).to(device) * 1000)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    if cuda:
        end_event.record()
        torch.cuda.synchronize()
        seconds = start_event.elapsed_time(end_event) / 1000
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        seconds, peak = time.perf_counter() - start, float("nan")
    return steps / seconds, peak, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny FLUX.1 on the CPU at 64 px (checks the script)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    config, size = (TINY, 64) if args.tiny else (FluxConfig.flux_dev(), args.size)
    dtype = torch.bfloat16
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    start = time.perf_counter()
    ours = random_flux(config, device, dtype)
    theirs = diffusers_sharing(ours, config)
    weights = sum(t.numel() * t.element_size() for t in ours.state_dict().values()) / 2 ** 30
    print(f"FLUX.1-dev size {sum(t.numel() for t in ours.parameters()) / 1e9:.2f} B parameters, {weights:.2f} GiB "
          f"in bf16, shared by both (built in {time.perf_counter() - start:.0f} s); {size}x{size}, "
          f"{args.steps} steps after {args.warmup}")
    gen = torch.Generator(device).manual_seed(1)
    h = size // 8
    x = torch.randn(1, config.latent_channels, h, h, generator=gen, device=device, dtype=dtype)
    context = torch.randn(1, 512, config.context_dim, generator=gen, device=device, dtype=dtype)
    pooled = torch.randn(1, config.pooled_dim, generator=gen, device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device)
    steps = {"torchsd": lambda x, t: ours(x, t, context, pooled, guidance=guidance),
             "diffusers": lambda x, t: call_diffusers(theirs, x, t, context, pooled, guidance)}
    with torch.inference_mode():
        t = torch.tensor([700.0], device=device)
        a, b = (fn(x, t).float() for fn in steps.values())
        error = float((a - b).abs().max() / b.abs().max())
        print(f"  one call: max |torchsd - diffusers| / max |diffusers| = {error:.2e}")
        for name, fn in steps.items():
            rate, peak, _ = loop(fn, x, args.steps, args.warmup, device)
            print(f"  {name:<9} {rate:6.2f} it/s   peak allocated above the weights {peak:6.2f} GiB")


if __name__ == "__main__":
    main()

"""SDXL on this CPU against diffusers: the full-size U-Net's guided step (CFG, batch 2) and the VAE decode, the
same random weights shared by both in one process (no copy), calls alternating (A B A B), peak RSS.

    PYTHONPATH=src python benchmarks/sdxl_cpu.py --sizes 512,1024 --dtypes bf16
    PYTHONPATH=src python benchmarks/sdxl_cpu.py --phases vae --sizes 512 --dtypes fp32 --reps 2

SDXL base's U-Net has 2.57 billion parameters: 5.1 GB in bf16, 10.3 GB in fp32. One network is built at a time
(in the dtype asked for, never a float32 copy first) and freed before the next; a dtype whose weights do not
fit in the memory the system says is available (with a margin for activations) is skipped with a note.
torchsd runs as the CLI and the server place it on a CPU (``accel.optimize``'s blocks, NCHW U-Net); diffusers
as it comes. Prints figures; asserts only that both sides compute the same thing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _assert_shared, _public, _share, compare, free, gib, load_note  # noqa: E402
from torchsd.accel import optimize  # noqa: E402
from torchsd.checkpoints.diffusers import (  # noqa: E402
    to_diffusers_keys,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from torchsd.config import ModelConfig  # noqa: E402
from torchsd.diffusion.denoisers import Condition, ModelDenoiser, classifier_free_guidance  # noqa: E402
from torchsd.models.unet import UNet, added_vector  # noqa: E402
from torchsd.models.vae import AutoencoderKL  # noqa: E402
from torchsd.pipeline import autoencoding  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG = ModelConfig.sdxl_base()
SCALE = 7.5


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def built(cls, config, dtype: torch.dtype):
    """A network initialised directly in ``dtype`` (PyTorch's default initialisation, seed 0)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        return cls(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def shared_diffusers(cls, config: dict, state: dict, name: str):
    with torch.device("meta"):
        model = cls(**_public(config))
    _share(model, state)
    _assert_shared(name, model)
    return model


def row(label: str, results: dict, agreement: float) -> None:
    ours, theirs = results["torchsd"], results["diffusers"]
    print(f"  {label:<30} torchsd {ours['min']:7.2f} s   diffusers {theirs['min']:7.2f} s   "
          f"ratio {ours['min'] / theirs['min']:.2f} (CPU time {ours['cpu_min'] / theirs['cpu_min']:.2f})   "
          f"peak RSS {gib(ours['peak'])} (+{gib(ours['peak_extra'])}) vs {gib(theirs['peak'])} "
          f"(+{gib(theirs['peak_extra'])})   max rel. difference {agreement:.1e}", flush=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def phase_unet(dtype: torch.dtype, sizes: list[int], reps: int) -> None:
    from diffusers import UNet2DConditionModel

    unet = built(UNet, CONFIG.unet, dtype)
    params = sum(p.numel() for p in unet.parameters())
    theirs_unet = shared_diffusers(UNet2DConditionModel, unet_config_to_diffusers(CONFIG.unet, 128),
                                   to_diffusers_keys(unet.state_dict(), "unet"), "unet")
    optimize(unet, torch.device("cpu"), dtype)
    print(f"U-Net: {params / 1e9:.3f} B parameters, {gib(params * unet.conv_in.weight.element_size())} of weights "
          f"shared by both", flush=True)
    denoiser = ModelDenoiser(unet, CONFIG.schedule)
    gen = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(1, 4, size // 8, size // 8, generator=gen)
        context = torch.randn(2, 77, CONFIG.unet.context_dim, generator=gen).to(dtype)  # (uncond, cond)
        pooled = torch.randn(2, CONFIG.unet.pooled_dim, generator=gen)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        y = added_vector(pooled, time_ids, CONFIG.unet.micro_condition_dim).to(dtype)
        denoise = classifier_free_guidance(denoiser, Condition(context[1:], y[1:]), Condition(context[:1], y[:1]),
                                           SCALE)
        sigma = torch.tensor(1.5)
        t = denoiser.timestep(sigma[None])
        c_in = 1 / (sigma ** 2 + 1) ** 0.5

        def theirs():
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
            out = theirs_unet(torch.cat([x, x]).mul(c_in).to(dtype), t, encoder_hidden_states=context,
                              added_cond_kwargs=added).sample
            uncond, cond = out.float().chunk(2)
            return uncond + SCALE * (cond - uncond)

        outputs = {}
        results = compare({"torchsd": lambda: outputs.__setitem__("torchsd", denoise(x, sigma)),
                           "diffusers": lambda: outputs.__setitem__("diffusers", theirs())}, reps)
        eps = (x - outputs["torchsd"].float()) / sigma  # x0 -> the guided noise prediction diffusers gives
        row(f"U-Net step, CFG, {size}x{size}", results, relative(eps, outputs["diffusers"]))


def phase_vae(dtype: torch.dtype, sizes: list[int], reps: int) -> None:
    from diffusers import AutoencoderKL as TheirVAE

    vae = built(AutoencoderKL, CONFIG.vae, dtype)
    theirs_vae = shared_diffusers(TheirVAE, vae_config_to_diffusers(CONFIG.vae, 1024),
                                  to_diffusers_keys(vae.state_dict(), "vae"), "vae")
    optimize(vae, torch.device("cpu"), dtype)
    if dtype != torch.float32:  # torchsd's CPU layout for a bf16 VAE (runtime.wants_channels_last)
        vae.to(memory_format=torch.channels_last)
    for size in sizes:
        latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
        outputs = {}
        results = compare({
            "torchsd": lambda: outputs.__setitem__("torchsd", autoencoding.decode(vae, latents)),
            "diffusers": lambda: outputs.__setitem__("diffusers", theirs_vae.decode(latents.to(dtype)).sample)},
            reps)
        row(f"VAE decode {size}x{size}", results, relative(outputs["torchsd"], outputs["diffusers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="unet,vae")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--reps", type=int, default=1, help="timed calls per side (after one warm-up call)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_note()}, "
          f"{gib(available_bytes())} available", flush=True)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for phase in args.phases.split(","):
            with torch.device("meta"):
                network = UNet(CONFIG.unet) if phase == "unet" else AutoencoderKL(CONFIG.vae)
            weights = sum(p.numel() for p in network.parameters()) * (4 if dtype == torch.float32 else 2)
            margin = 3 << 30 if max(sizes) > 512 else 1 << 30
            if available_bytes() < weights + margin:
                print(f"{phase} {name}: skipped: {gib(weights)} of weights and {gib(margin)} for activations do not "
                      f"fit in the {gib(available_bytes())} available", flush=True)
                continue
            print(f"--- {phase}, {name} ---", flush=True)
            (phase_unet if phase == "unet" else phase_vae)(dtype, sizes, args.reps)
            free()  # the phase's networks are gone with its frame: give the memory back before the next


if __name__ == "__main__":
    main()

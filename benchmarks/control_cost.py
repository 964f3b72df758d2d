"""What ControlNet units cost per step, torchsd against diffusers, SD 1.5-size random weights shared by both.

    PYTHONPATH=src python benchmarks/control_cost.py [--size 256] [--dtypes fp32,bf16] [--reps 3] [--threads N]

One guided step (the batch of 2: unconditional and conditional) with 0, 1 and 2 ControlNet units:
  torchsd    the sampler's denoiser as a run builds it: ``ControlledDenoiser`` (the units' residuals at every
             call) inside classifier-free guidance, the U-Net under ``apply_runtime`` as the CLI and server
             place it; the ControlNets as ``load_control_model`` returns them (plain modules);
  diffusers  what ``StableDiffusionControlNetPipeline.__call__`` does per step: each ``ControlNetModel`` on the
             latents doubled for guidance (``MultiControlNetModel`` sums the residuals of several), then
             ``UNet2DConditionModel`` with ``down_block_additional_residuals`` and ``mid_block_additional_residual``.
Only the U-Net and the ControlNet are SD 1.5-size (the VAE and text encoder are tiny and unused: the step takes
random text contexts of SD 1.5's shape), to fit a shared machine's memory. Both sides hold the same tensors (the
U-Net's and the ControlNet's: torchsd's ``from_unet`` with every weight perturbed, shared with a diffusers
``ControlNetModel`` built to match). Two units are that ControlNet twice with two hints: the work of two networks
in the memory of one (memory is not measured here). Calls alternate (A B A B …); min and median are printed, wall and
CPU time, and the cost of the units is each row minus the same side's row without (CPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _share, build, compare, diffusers_unet, free, load_note  # noqa: E402
from torchsd.checkpoints.diffusers import to_diffusers_keys, unet_config_to_diffusers  # noqa: E402
from torchsd.config import CLIPTextConfig, ModelConfig, VAEConfig  # noqa: E402
from torchsd.diffusion.control import ControlInput, ControlledDenoiser  # noqa: E402
from torchsd.diffusion.denoisers import classifier_free_guidance  # noqa: E402
from torchsd.models.controlnet import ControlNet  # noqa: E402
from torchsd.runtime import RuntimeOptions, apply_runtime  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCALE = 7.5


def random_controlnet(sd, seed: int) -> ControlNet:
    net = ControlNet.from_unet(sd.unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)
    return net.eval().requires_grad_(False)


def diffusers_controlnet(net: ControlNet, sample_size: int):
    """A diffusers ControlNetModel holding the same tensors as ``net``."""
    import inspect

    from diffusers import ControlNetModel

    unet_config = unet_config_to_diffusers(net.config.unet, sample_size)
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet_config.items() if k in accepted and not k.startswith("_")}
    with torch.device("meta"):
        ref = ControlNetModel(**config, conditioning_embedding_out_channels=net.config.hint_widths)
    state = to_diffusers_keys(net.state_dict(), "unet")
    missing = set(ref.state_dict()) - set(state)
    assert not missing, f"diffusers ControlNetModel: no weights for {sorted(missing)[:5]}"
    return _share(ref, state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.size}x{args.size}; {load_note()}", flush=True)
    sd15 = ModelConfig.sd15()
    sd = build(dataclasses.replace(  # the SD 1.5 U-Net; a tiny VAE and text encoder that the step does not use
        sd15, vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=CLIPTextConfig(width=sd15.text.width, num_layers=1, num_heads=12, ffn_dim=64)))
    net = random_controlnet(sd, seed=1)
    nets = [net, net]  # two units: the same network twice, with two hints
    h = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, h, h, generator=gen)
    hints = [torch.rand(1, 3, args.size, args.size, generator=gen) for _ in nets]
    cond, uncond = (torch.randn(1, 77, sd15.text.width, generator=gen) for _ in range(2))
    sigma, t = torch.tensor(1.5), torch.tensor(500)
    for dtype in (DTYPES[d] for d in args.dtypes.split(",")):
        for model in (sd.unet, sd.vae, sd.text_encoder, net):
            model.to(dtype=dtype, memory_format=torch.contiguous_format)
        free()
        unet = diffusers_unet(sd)  # shares sd.unet's tensors, NCHW: built before torchsd's layout change
        reference = diffusers_controlnet(net, sd.config.sample_size // 8)
        apply_runtime(sd, RuntimeOptions(), "cpu", dtype)
        context = torch.cat([uncond, cond]).to(dtype)

        def ours(units: int):
            inputs = [ControlInput(net, hint.to(dtype), [1.0] * (len(net.controlnet_down_blocks) + 1))
                      for net, hint in zip(nets[:units], hints)]
            model = ControlledDenoiser(sd.denoiser, inputs, torch.tensor([2.0, 0.0])) if units else sd.denoiser
            denoise = classifier_free_guidance(model, cond.to(dtype), uncond.to(dtype), SCALE)
            return lambda: denoise(x.to(dtype), sigma)

        def theirs(units: int, unet=unet, theirs_nets=(reference, reference)):
            def step():
                latents = torch.cat([x, x]).to(dtype)
                down = mid = None
                for net, hint in zip(theirs_nets[:units], hints):
                    d, m = net(latents, t, encoder_hidden_states=context, return_dict=False,
                               controlnet_cond=torch.cat([hint, hint]).to(dtype), conditioning_scale=1.0)
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                out = unet(latents, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, return_dict=False)[0]
                uncond_out, cond_out = out.chunk(2)
                return uncond_out + SCALE * (cond_out - uncond_out)
            return step

        fns = {}
        for units in (0, 1, 2):
            fns[f"torchsd {units}"] = ours(units)
            fns[f"diffusers {units}"] = theirs(units)
        with sd.sampling_context():
            results = compare(fns, args.reps)
        print(f"\n== {str(dtype).removeprefix('torch.')}: one guided step (min / median of {args.reps}); wall seconds, "
              f"then CPU seconds of this process (less sensitive to other work on a shared machine); {load_note()}",
              flush=True)
        print(f"  {'units':<6} {'torchsd wall':>16} {'diffusers wall':>16} {'torchsd CPU':>12} {'diffusers CPU':>14} "
              f"{'ratio CPU':>10}   {'the units, CPU: torchsd':>24} {'diffusers':>10}")
        for units in (0, 1, 2):
            a, b = results[f"torchsd {units}"], results[f"diffusers {units}"]
            extra_a = a["cpu_min"] - results["torchsd 0"]["cpu_min"]
            extra_b = b["cpu_min"] - results["diffusers 0"]["cpu_min"]
            print(f"  {units:<6} {a['min']:7.2f} / {a['median']:6.2f} {b['min']:7.2f} / {b['median']:6.2f} "
                  f"{a['cpu_min']:12.2f} {b['cpu_min']:14.2f} {a['cpu_min'] / b['cpu_min']:10.2f}   "
                  f"{extra_a:+22.2f} s {extra_b:+8.2f} s", flush=True)
        del unet, reference, fns
        free()


if __name__ == "__main__":
    main()

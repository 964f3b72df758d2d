"""Few-step samplers and schedules (issue 24): TCD and LCM against diffusers' TCDScheduler and LCMScheduler, the
trailing schedules of SDXL-Lightning, Hyper-SD and SDXL-Turbo against the schedulers their model cards name, and
LCM-LoRA / Hyper-SD / TCD LoRA files in their published key layouts merging through the LoRA loader.

The runs reuse test_samplers_parity's harness: the same tiny U-Net in torchsd and in diffusers, the same
starting noise, the same text context and guidance, and a generator with the same seed for the noise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import test_samplers_parity as parity
from reference import max_rel_error, random_pipeline
from torchsd.config import ScheduleConfig
from torchsd.diffusion.denoisers import classifier_free_guidance
from torchsd.diffusion.samplers import get_sampler, resolve_sampler, sampler_options
from torchsd.diffusion.schedules import final_sigma, sigma_at

Case = parity.Case
CASES = [
    # TCD-LoRA / Hyper-SD: TCDScheduler on the LCM grid, its eta (gamma) from deterministic to LCM-like
    Case("tcd", "automatic", "TCDScheduler", steps=4),
    Case("tcd", "automatic", "TCDScheduler", options={"eta": 0.0}, step_options={"eta": 0.0}, steps=4),
    Case("tcd", "automatic", "TCDScheduler", options={"eta": 1.0}, step_options={"eta": 1.0}, steps=8),
    Case("lcm", "automatic", "LCMScheduler", steps=8),
    # SDXL-Lightning: Euler, trailing; Hyper-SD 2-8 steps: DDIM, trailing; SDXL-Turbo: Euler a, trailing
    Case("euler", "trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, steps=4),
    Case("ddim", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}, steps=2),
    Case("euler_a", "trailing", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, steps=4),
]
parity.VP_SPACE.add("TCDScheduler")  # TCD's samples are z = x / sqrt(1 + sigma^2), as LCM's


models = parity.models  # the same module-scoped fixture: (our pipeline, diffusers' U-Net, context) per prediction


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_few_step_samplers_match_diffusers_step_for_step(models, case, prediction):
    parity.test_final_latents_match_diffusers(models, case, prediction)


def test_tcd_is_registered_under_comfyui_and_forge_name():
    spec, scheduler = resolve_sampler("TCD")
    assert (spec.name, scheduler.name, spec.stochastic) == ("tcd", "lcm", True)
    options = sampler_options(spec, None, 0.5, ScheduleConfig())
    assert options["eta"] == 0.5 and options["schedule"] == ScheduleConfig()


def test_hyper_sd_one_step_tcd_at_timestep_800_matches_diffusers(models):
    """Hyper-SD's one-step LoRAs: TCDScheduler(eta=1.0) with timesteps=[800], per its model card."""
    sd, unet, context = models("epsilon")
    schedule = sd.config.schedule
    reference = parity.make_scheduler(Case("tcd", "automatic", "TCDScheduler"), "epsilon")
    reference.set_timesteps(timesteps=[800])
    levels = torch.tensor([float(sigma_at(schedule, torch.tensor([800.0]))[0]), final_sigma(schedule)])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    uncond, cond = context.chunk(2)
    denoise = classifier_free_guidance(sd.denoiser, cond, uncond, parity.GUIDANCE)
    x = get_sampler("tcd").function(denoise, noise * (1 + float(levels[0]) ** 2) ** 0.5, levels.float(), eta=1.0,
                                    schedule=schedule, generator=[torch.Generator().manual_seed(3)])
    ours = x / (1 + float(levels[-1]) ** 2) ** 0.5
    theirs = parity.run_diffusers(reference, unet, context, noise,
                                  Case("tcd", "automatic", "TCDScheduler", step_options={"eta": 1.0}), 3)
    assert max_rel_error(ours, theirs) < parity.TOL


def test_lcm_boundary_scalings_left_out_are_below_float32_noise():
    """Our LCM (as AUTOMATIC1111's and ComfyUI's) drops LCMScheduler's c_skip * x + c_out * x0: at every timestep
    the LCM grid can visit, c_skip and 1 - c_out are below 1e-5, so the x0 it returns differs by < 1e-5 relative."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(parity.SD15_SCHEDULER)
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps.tolist():
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip < 7e-6 and 1 - c_out < 4e-6, t


def test_tcd_eta_out_of_range_teaches_the_range():
    with pytest.raises(ValueError, match="between 0 .deterministic. and 1 .LCM."):
        get_sampler("tcd").function(lambda x, s: x, torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), eta=1.5)


def test_tcd_through_the_pipeline_is_seeded_and_eta_zero_is_deterministic():
    sd = random_pipeline("sd1")
    run = dict(steps=4, guidance_scale=1.0, width=32, height=32, sampler="TCD")
    a = sd.generate("a red circle", seed=5, **run).latents
    assert torch.equal(a, sd.generate("a red circle", seed=5, **run).latents)
    assert not torch.equal(a, sd.generate("a red circle", seed=5, eta=0.0, **run).latents)


# ---- LoRA files in the layouts the few-step LoRAs are published in ----

def published_lora(sd, layout: str, rank: int = 4) -> dict[str, torch.Tensor]:
    """A U-Net-only LoRA over every attention projection and ResNet conv, as LCM-LoRA, Hyper-SD and TCD-LoRA ship:
    kohya keys over diffusers module names with a per-module alpha (LCM-LoRA, Hyper-SD15/SDXL *-lora.safetensors),
    or diffusers' PEFT keys (``unet.<path>.lora_A.weight``, as ``save_lora_weights`` writes for TCD-LoRA)."""
    from reference import diffusers_unet as to_diffusers

    gen, state = torch.Generator().manual_seed(1), {}
    for name, module in to_diffusers(sd).named_modules():
        if not (name.endswith(("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"))):
            continue
        weight = module.weight
        down = torch.randn(rank, *weight.shape[1:], generator=gen) * 0.1  # (rank, in[, kh, kw])
        up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=gen) * 0.1
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(8.0)}
        else:
            state |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    return state


@pytest.mark.parametrize("layout, scale", [("kohya", 8.0 / 4), ("peft", 1.0)])
def test_few_step_lora_layouts_merge_every_layer(tmp_path, layout, scale):
    from torchsd.checkpoints.lora import AppliedLora, load_lora, merged_loras, weight_of

    sd = random_pipeline("sd1")
    path = tmp_path / f"{layout}.safetensors"
    state = published_lora(sd, layout)
    save_file(state, str(path))
    lora = load_lora(path, sd)
    pairs = len(state) // (3 if layout == "kohya" else 2)
    assert len(lora.layers) == pairs and all(layer.scale == scale for layer in lora.layers)
    before = {layer.module: weight_of(sd, layer).clone() for layer in lora.layers}
    with merged_loras(sd, [AppliedLora(lora, 1.0, 1.0)]):
        changes = [float((weight_of(sd, layer) - before[layer.module]).norm()) for layer in lora.layers]
    # what the file says each layer changes by, from its own tensors: scale * up @ down
    downs = sorted(k for k in state if k.endswith(("lora_down.weight", "lora_A.weight")))
    expected = [float((state[k.replace("lora_down", "lora_up").replace("lora_A", "lora_B")].flatten(1)
                       @ state[k].flatten(1) * scale).norm()) for k in downs]
    assert sorted(changes) == pytest.approx(sorted(expected), rel=1e-4)
    for layer in lora.layers:
        assert torch.equal(weight_of(sd, layer), before[layer.module])

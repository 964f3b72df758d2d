"""SDXL ControlNet: the same random weights in torchsd and diffusers (ControlNetModel with the "text_time" added
embedding) give the same residuals; diffusers' saved folders and single files load; a run's final latents equal
diffusers' StableDiffusionXLControlNetPipeline on a tiny random SDXL; an SD 1.x ControlNet on SDXL is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torchsd
from reference import max_rel_error, random_pipeline
from sdxl_reference import diffusers_unet_of, random_sdxl
from test_controlnet import diffusers_controlnet
from test_controlnet import random_controlnet as perturbed_controlnet
from torchsd.checkpoints.controlnet import load_controlnet, save_controlnet
from torchsd.models.controlnet import ControlNet
from torchsd.models.unet import added_vector
from torchsd.pipeline.features.control import ControlUnit

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry, low quality"
TOL = 1e-4


def random_controlnet(sd, seed: int = 3) -> ControlNet:
    """test_controlnet's perturbed from_unet copy; the hint encoder downscales by 2, as the tiny VAE does."""
    return perturbed_controlnet(sd, seed, hint_widths=(16, 32))


@pytest.fixture(scope="module")
def sd():
    return random_sdxl("sdxl")


def inputs(sd, rows: int = 2, seed: int = 0):
    c = sd.config.unet
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, 77, c.context_dim, generator=gen)
    pooled = torch.randn(rows, c.pooled_dim, generator=gen)
    numbers = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [64.0, 48.0, 8.0, 4.0, 32.0, 32.0]])[:rows]
    return context, added_vector(pooled, numbers, c.micro_condition_dim), {"text_embeds": pooled, "time_ids": numbers}


def test_from_unet_copies_the_added_embedding_and_starts_at_zero(sd):
    net = ControlNet.from_unet(sd.unet, hint_widths=(16, 32))
    assert torch.equal(net.add_embedding.linear_1.weight, sd.unet.add_embedding.linear_1.weight)
    context, y, _ = inputs(sd, 1)
    with torch.no_grad():
        down, mid = net(torch.randn(1, 4, 8, 8), torch.tensor([500]), context, torch.rand(1, 3, 16, 16), y=y)
    assert all(not d.any() for d in down) and not mid.any()
    with pytest.raises(ValueError, match="takes the added vector y"):
        net(torch.randn(1, 4, 8, 8), torch.tensor([500]), context, torch.rand(1, 3, 16, 16))


def test_residuals_and_unet_match_diffusers(sd):
    net = random_controlnet(sd)
    unet_ref = diffusers_unet_of(sd.unet)
    ref = diffusers_controlnet(net, unet_ref)
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 16, generator=gen), torch.rand(2, 3, 16, 32, generator=gen)
    context, y, added = inputs(sd)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        down, mid = net(x, t, context, hint, y=y)
        ref_down, ref_mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, added_cond_kwargs=added,
                                return_dict=False)
        assert len(down) == len(ref_down)
        for ours, theirs in zip(down, ref_down):
            assert max_rel_error(ours, theirs) < TOL
        assert max_rel_error(mid, ref_mid) < TOL
        ours = sd.unet(x, t, context, y, down_residuals=down, mid_residual=mid)
        theirs = unet_ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                          down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid).sample
        assert max_rel_error(ours, theirs) < TOL
        assert max_rel_error(ours, sd.unet(x, t, context, y)) > 1e-3  # the residuals did something


def test_one_latent_under_two_conditions_equals_a_repeated_batch(sd):
    """CFG's call: one latent, two contexts each with its own added vector y."""
    net = random_controlnet(sd)
    gen = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 16, 16, generator=gen)
    context, y, _ = inputs(sd)
    t = torch.tensor([400.0])
    with torch.no_grad():
        down, mid = net(x, t, context, hint, y=y)
        shared = sd.unet(x, t, context, y, down_residuals=down, mid_residual=mid)
        x2, t2 = x.repeat(2, 1, 1, 1), t.repeat(2)
        down2, mid2 = net(x2, t2, context, hint, y=y)
        batched = sd.unet(x2, t2, context, y, down_residuals=down2, mid_residual=mid2)
    assert max_rel_error(shared, batched) < 1e-5


# --- files ---------------------------------------------------------------------------------------------------

def test_diffusers_folders_and_single_files_load(sd, tmp_path):
    net = random_controlnet(sd)
    ref = diffusers_controlnet(net, diffusers_unet_of(sd.unet))
    ref.save_pretrained(tmp_path / "cn")
    expected = net.state_dict()
    for path in (tmp_path / "cn", tmp_path / "cn" / "diffusion_pytorch_model.safetensors"):
        loaded = load_controlnet(path, sd.config.unet)
        assert loaded.add_embedding is not None and loaded.config.hint_widths == (16, 32)
        assert loaded.state_dict().keys() == expected.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    save_controlnet(net, tmp_path / "ours.safetensors")  # torchsd's own writer, read back
    assert torch.equal(load_controlnet(tmp_path / "ours.safetensors", sd.config.unet).add_embedding.linear_2.bias,
                       net.add_embedding.linear_2.bias)


def test_fewer_transformer_blocks_than_the_unet_are_read_from_the_weights(sd, tmp_path):
    """SDXL's "mid"/"small" ControlNets keep fewer transformer blocks per level than the U-Net they steer."""
    from diffusers import ControlNetModel

    ref = ControlNetModel.from_unet(diffusers_unet_of(sd.unet), conditioning_embedding_out_channels=(16, 32))
    config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    small = ControlNetModel(**{**config, "transformer_layers_per_block": [1, 1]}).eval()
    small.save_pretrained(tmp_path / "small")
    net = load_controlnet(tmp_path / "small", sd.config.unet)
    assert net.config.unet.transformer_depth == (1, 1) and net.config.unet.mid_transformer_depth == 1
    assert sd.config.unet.transformer_depth == (1, 2)
    x, hint = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 16, 16)
    context, y, added = inputs(sd, 1)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([300]), context, hint, y=y)
        ref_down, ref_mid = small(x, torch.tensor([300]), encoder_hidden_states=context, controlnet_cond=hint,
                                  added_cond_kwargs=added, return_dict=False)
    assert max_rel_error(mid, ref_mid) < TOL and max_rel_error(down[-1], ref_down[-1]) < TOL


def test_a_controlnet_of_another_family_is_refused_by_its_shapes(sd, tmp_path):
    sd1 = random_pipeline("sd1")
    save_controlnet(ControlNet.from_unet(sd1.unet, hint_widths=(16, 32)), tmp_path / "sd1.safetensors")
    save_controlnet(ControlNet.from_unet(sd.unet, hint_widths=(16, 32)), tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"an SD 1\.x\S* ControlNet .*does not fit this SDXL model"):
        load_controlnet(tmp_path / "sd1.safetensors", sd.config.unet)
    with pytest.raises(ValueError, match=r"an SDXL ControlNet .*does not fit this SD 1\.x\S* model"):
        load_controlnet(tmp_path / "xl.safetensors", sd1.config.unet)


# --- a run against diffusers' StableDiffusionXLControlNetPipeline ----------------------------------------------

@pytest.fixture(scope="module")
def saved(sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-control")
    sd.save(root / "model")
    diffusers_controlnet(random_controlnet(sd), diffusers_unet_of(sd.unet)).save_pretrained(root / "cn")
    return root


def hint_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", [
    dict(scale=1.0, start=0.0, end=1.0),
    dict(scale=0.7, start=0.25, end=0.75),
], ids=["full", "window"])
def test_final_latents_match_diffusers(saved, case):
    import diffusers

    image = hint_image(0)
    pipe = torchsd.load_pipeline(saved / "model", dtype=torch.float32)
    unit = ControlUnit(image=image, model=saved / "cn", weight=case["scale"], guidance_start=case["start"],
                       guidance_end=case["end"])
    run = dict(steps=6, guidance_scale=5.0, sampler="ddim", eta=0.0, width=32, height=32, latents=noise(), seed=0)
    ours = pipe.generate(PROMPT, NEGATIVE, control=[unit], **run)
    plain = pipe.generate(PROMPT, NEGATIVE, **run)
    reference = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        saved / "model", controlnet=diffusers.ControlNetModel.from_pretrained(saved / "cn"))
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, image=image, num_inference_steps=6, guidance_scale=5.0,
                       width=32, height=32, latents=noise(), controlnet_conditioning_scale=case["scale"],
                       control_guidance_start=case["start"], control_guidance_end=case["end"],
                       output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < 1e-3
    assert max_rel_error(plain.latents, theirs) > 1e-2  # the control changed the result
    assert 'ControlNet 0: "Module: none, Model: cn' in ours.infotexts[0]


def test_modes_samplers_hires_run_and_the_refiner_is_refused(saved, tmp_path):
    import dataclasses

    pipe = torchsd.load_pipeline(saved / "model", dtype=torch.float32)
    unit = ControlUnit(image=hint_image(1, 48), model=saved / "cn", module="canny")
    base = dict(steps=3, width=32, height=32, seed=1)
    results = {mode: pipe.generate(PROMPT, NEGATIVE, control=[dataclasses.replace(unit, control_mode=mode)],
                                   **base).latents for mode in ("balanced", "prompt", "control")}
    assert max_rel_error(results["prompt"], results["balanced"]) > 1e-3
    assert max_rel_error(results["control"], results["prompt"]) > 1e-3
    assert torch.isfinite(pipe.generate(PROMPT, NEGATIVE, sampler="euler_a", control=[unit], **base).latents).all()
    hires = pipe.generate(PROMPT, hires=True, hires_scale=1.5, hires_steps=2, control=[unit], **base)
    assert hires.images[0].size == (48, 48)
    random_sdxl("sdxl_refiner").save(tmp_path / "refiner")
    with pytest.raises(ValueError, match="made for an SDXL U-Net .*does not fit"):
        pipe.generate(PROMPT, control=[unit], refiner_checkpoint=str(tmp_path / "refiner"), refiner_switch_at=0.5,
                      **base)

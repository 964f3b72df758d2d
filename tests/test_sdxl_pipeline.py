"""SDXL end to end: a tiny random SDXL saved as a diffusers folder gives the same final latents in torchsd
and in diffusers' StableDiffusionXLPipeline (both encoders, pooled output, micro-conditioning, CFG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torchsd
from reference import max_rel_error
from sdxl_reference import random_sdxl
from torchsd.diffusion.denoisers import Condition
from torchsd.pipeline.features import owner_of
from torchsd.pipeline.infotext import request_fields

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry, low quality"
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "model"
    random_sdxl("sdxl").save(path)
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return torchsd.load_pipeline(folder, dtype=torch.float32)


def diffusers_xl(folder, scheduler="DDIMScheduler", cls="StableDiffusionXLPipeline", **config):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_prompt_encoding_matches_diffusers(sd, folder):
    pipe = diffusers_xl(folder)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, negative_prompt=None,
                                                                   do_classifier_free_guidance=True)
    cond = sd.condition([PROMPT])
    assert max_rel_error(cond.context, embeds) < 1e-5 and max_rel_error(cond.pooled, pooled) < 1e-5
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_ddim_guided_matches_diffusers(sd, folder, negative):
    ours = sd.generate(PROMPT, negative, steps=6, guidance_scale=6.0, sampler="ddim", width=32, height=32,
                       latents=noise(), seed=0)
    theirs = diffusers_xl(folder)(PROMPT, negative_prompt=negative or None, num_inference_steps=6, guidance_scale=6.0,
                                  width=32, height=32, latents=noise(), output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_micro_conditioning_options_match_diffusers(sd, folder):
    sizes = dict(original_size=(96, 48), crops_coords_top_left=(8, 4), target_size=(64, 80),
                 negative_original_size=(16, 16), negative_target_size=(40, 24))
    ours = sd.generate(PROMPT, NEGATIVE, steps=4, guidance_scale=5.0, sampler="ddim", width=32, height=32,
                       latents=noise(1), seed=0, **sizes)
    theirs = diffusers_xl(folder)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                                  width=32, height=32, latents=noise(1), output_type="latent", **sizes).images
    assert max_rel_error(ours.latents, theirs) < TOL
    plain = sd.generate(PROMPT, NEGATIVE, steps=4, guidance_scale=5.0, sampler="ddim", width=32, height=32,
                        latents=noise(1), seed=0)
    assert max_rel_error(plain.latents, theirs) > 1e-3  # the sizes do reach the U-Net


@pytest.mark.parametrize("sampler, scheduler, reference, config", [
    ("Euler a", "automatic", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
])
def test_k_samplers_match_diffusers(sd, folder, sampler, scheduler, reference, config):
    """Euler a with diffusers' noise stream (the same seeded generator), DPM++ 2M on Karras levels (where
    diffusers rounds the U-Net's timesteps to integers: so does the reference-side denoiser here)."""
    if scheduler == "karras":
        from test_samplers_parity import RoundedTimesteps

        sd = _with_denoiser(sd, RoundedTimesteps(sd.unet, sd.config.schedule))
    ours = sd.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=5.0, sampler=sampler, scheduler=scheduler,
                       width=32, height=32, latents=noise(2), seed=7)
    theirs = diffusers_xl(folder, reference, **config)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0, width=32, height=32,
        latents=noise(2), generator=torch.Generator().manual_seed(7), output_type="latent").images
    # DPM++ 2M: diffusers' multistep solver starts from the VP sample and ends on its own final step; measured
    # 2.3e-3 here, the SDXL conditioning being exact (DDIM and Euler a above: < 1e-4). Sampler-level parity of
    # DPM++ 2M Karras is tests/test_samplers_parity.py's
    assert max_rel_error(ours.latents, theirs) < (TOL if sampler == "Euler a" else 5e-3)


def _with_denoiser(sd, denoiser):
    import copy

    other = copy.copy(sd)
    other.denoiser = denoiser
    return other


def test_long_weighted_prompt_runs_both_encoders_per_chunk(sd):
    """A1111's long prompts: each 75-token chunk through both encoders, the pooled output from the first."""
    long = ", ".join(["a (red:1.3) circle on a blue background"] * 12)
    cond = sd.condition([long])
    assert cond.context.shape == (1, 154, 192) and cond.pooled.shape == (1, 96)
    first = sd.condition([long.split(", a (red")[0]])
    assert cond.pooled.shape == first.pooled.shape
    result = sd.generate(long, steps=2, width=32, height=32, seed=1)
    assert result.images[0].size == (32, 32)


def test_cfg_rows_carry_the_added_vector():
    """The run's conditions are Condition objects; CFG stacks their added vectors with the contexts."""
    from torchsd.diffusion.denoisers import cat_conditions

    a = Condition(torch.zeros(1, 77, 8), torch.zeros(1, 4))
    b = Condition(torch.ones(1, 77, 8), torch.ones(1, 4))
    both = cat_conditions([a, b])
    assert both.shape == (2, 77, 8) and torch.equal(both.y[:, 0], torch.tensor([0.0, 1.0]))


def test_features_work_on_sdxl_shapes(sd):
    """img2img, inpainting, hires fix and variation seeds with an SDXL model (4-channel 2048-context U-Net)."""
    gen = np.random.default_rng(0)
    init = Image.fromarray(gen.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    assert sd.generate(PROMPT, steps=3, init_image=init, strength=0.6, seed=1).images[0].size == (32, 32)
    assert sd.generate(PROMPT, steps=3, init_image=init, mask=mask, strength=0.8, seed=1).images[0].size == (32, 32)
    hires = sd.generate(PROMPT, steps=2, width=32, height=32, hires=True, hires_scale=2.0, hires_steps=2, seed=1)
    assert hires.images[0].size == (64, 64)
    varied = sd.generate(PROMPT, steps=2, width=32, height=32, seed=1, subseed=5, subseed_strength=0.5)
    assert varied.images[0].size == (32, 32)


def test_sdxl_options_in_the_infotext_round_trip(sd):
    result = sd.generate(PROMPT, steps=2, width=32, height=32, seed=3, original_size=(96, 48),
                         crops_coords_top_left=(8, 4))
    text = result.infotexts[0]
    assert "Original size: 48x96" in text and 'Crop top left: "8,4"' in text
    fields = request_fields(text)
    assert fields["original_size"] == (96, 48) and fields["crops_coords_top_left"] == (8, 4)
    assert owner_of("negative_aesthetic_score").name == "sdxl"


def test_refiner_uses_the_aesthetic_score(tmp_path):
    """The refiner (bigG alone, 5 micro-conditions) against diffusers' StableDiffusionXLImg2ImgPipeline."""
    random_sdxl("sdxl_refiner").save(tmp_path / "refiner")
    sd = torchsd.load_pipeline(tmp_path / "refiner", dtype=torch.float32)
    gen = np.random.default_rng(1)
    init = Image.fromarray(gen.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ours = sd.generate(PROMPT, NEGATIVE, steps=6, guidance_scale=5.0, sampler="ddim", init_image=init,
                       strength=0.5, seed=4, aesthetic_score=7.0)
    pipe = diffusers_xl(tmp_path / "refiner", cls="StableDiffusionXLImg2ImgPipeline")
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.5, num_inference_steps=6,
                  guidance_scale=5.0, aesthetic_score=7.0, generator=torch.Generator().manual_seed(4),
                  output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_default_size_is_the_models(sd):
    import torchsd.config as config

    assert config.ModelConfig.sdxl_base().sample_size == 1024 and sd.config.sample_size == 64


def test_sdxl_embedding_matches_diffusers_textual_inversion(folder, tmp_path):
    """An SDXL embedding file (clip_l, clip_g) splices each set into its encoder, as diffusers'
    load_textual_inversion does when given each encoder and tokenizer."""
    from safetensors.torch import save_file

    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    vectors = {"clip_l": torch.randn(2, 64, generator=gen), "clip_g": torch.randn(2, 128, generator=gen)}
    (tmp_path / "emb").mkdir()
    save_file(vectors, str(tmp_path / "emb" / "shinyemb.safetensors"))
    sd.embeddings.add_dir(tmp_path / "emb")
    cond = sd.condition(["a photo of shinyemb on a table"])
    assert [e.name for e in cond.embeddings] == ["shinyemb"]
    pipe = diffusers_xl(folder)
    pipe.load_textual_inversion(vectors["clip_l"], token="shinyemb", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="shinyemb", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of shinyemb on a table", do_classifier_free_guidance=False)
    assert max_rel_error(cond.context, embeds) < 1e-5 and max_rel_error(cond.pooled, pooled) < 1e-5


def test_turbo_style_single_step_without_guidance_matches_diffusers(sd, folder):
    """SDXL Turbo's way: trailing spacing, one Euler a step, guidance 1 (no unconditional pass)."""
    ours = sd.generate(PROMPT, steps=1, guidance_scale=1.0, sampler="Euler a", scheduler="trailing", width=32,
                       height=32, latents=noise(3), seed=2)
    theirs = diffusers_xl(folder, "EulerAncestralDiscreteScheduler", timestep_spacing="trailing")(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, width=32, height=32, latents=noise(3),
        generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_kohya_sdxl_lora_matches_diffusers(folder, tmp_path):
    """kohya's SDXL layout: lora_unet_ + the original layout's names, lora_te1_ (CLIP-L), lora_te2_ (bigG);
    diffusers' load_lora_weights reads the same file."""
    from safetensors.torch import save_file
    from torch import nn

    from ldm_reference import unet_to_original

    pipe = diffusers_xl(folder)
    gen, state = torch.Generator().manual_seed(11), {}

    def add(key, module):
        rank = 2
        if isinstance(module, nn.Linear):
            down, up = torch.randn(rank, module.in_features, generator=gen), torch.randn(module.out_features, rank,
                                                                                           generator=gen)
        else:
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
        state[key + ".lora_down.weight"], state[key + ".lora_up.weight"] = down * 0.1, up * 0.1
        state[key + ".alpha"] = torch.tensor(1.0)

    for name, module in pipe.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (".attentions." in name or ".resnets." in name):
            original = next(iter(unet_to_original({name + ".weight": None}, 2)))  # the independent writer's names
            original = original.removeprefix("model.diffusion_model.").removesuffix(".weight")
            add("lora_unet_" + original.replace(".", "_"), module)
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                add(prefix + ("text_model." + name.removeprefix("text_model.")).replace(".", "_"), module)
    (tmp_path / "loras").mkdir()
    save_file(state, str(tmp_path / "loras" / "xl.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "loras" / "xl.safetensors"), adapter_name="xl")
    pipe.set_adapters(["xl"], adapter_weights=[0.7])
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
                  latents=noise(4), output_type="latent").images
    sd = torchsd.load_pipeline(folder, dtype=torch.float32, lora_dirs=[tmp_path / "loras"])
    options = dict(steps=3, guidance_scale=5.0, sampler="ddim", width=32, height=32, latents=noise(4), seed=0)
    ours = sd.generate(f"{PROMPT} <lora:xl:0.7>", NEGATIVE, **options)
    without = sd.generate(PROMPT, NEGATIVE, **options)
    assert max_rel_error(ours.latents, theirs) < TOL
    assert max_rel_error(ours.latents, without.latents) > 100 * TOL


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_moves_both_text_encoders(folder, mode):
    """Offloading (here onto the CPU itself) runs the second encoder through its hooks as well."""
    try:  # the offload moves into torchsd.accel with the accel branch
        from torchsd.accel import enable_model_offload, enable_sequential_offload
    except ImportError:
        from torchsd.offload import enable_model_offload, enable_sequential_offload

    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    expected = sd.generate(PROMPT, NEGATIVE, steps=2, width=32, height=32, seed=1).latents
    offload = (enable_model_offload if mode == "model" else enable_sequential_offload)(sd, "cpu")
    try:
        again = sd.generate(PROMPT, NEGATIVE, steps=2, width=32, height=32, seed=1).latents
    finally:
        offload.remove()
    assert max_rel_error(again, expected) < 1e-5  # offloaded layers take the plain (unfused) paths


def test_base_then_refiner_matches_diffusers_denoising_end_and_start(sd, folder, tmp_path):
    """A1111's refiner_checkpoint / refiner_switch_at against diffusers' hand-off: the base pipeline with
    denoising_end, its latents into the refiner's img2img pipeline with denoising_start. diffusers cuts at a
    training timestep (0.5: t >= 500, so DDIM's 831 and 665 of six leading steps go to the base), A1111 at a
    fraction of the steps: switching after 2 of 6 steps is the same split."""
    random_sdxl("sdxl_refiner", seed=6).save(tmp_path / "refiner")
    ours = sd.generate(PROMPT, NEGATIVE, steps=6, guidance_scale=5.0, sampler="ddim", width=32, height=32,
                       latents=noise(5), seed=0, refiner_checkpoint=str(tmp_path / "refiner"), refiner_switch_at=1 / 3)
    base = diffusers_xl(folder)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0,
                                width=32, height=32, latents=noise(5), denoising_end=0.5, output_type="latent").images
    refiner = diffusers_xl(tmp_path / "refiner", cls="StableDiffusionXLImg2ImgPipeline")
    theirs = refiner(PROMPT, negative_prompt=NEGATIVE, image=base, num_inference_steps=6, guidance_scale=5.0,
                     denoising_start=0.5, output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL
    assert "Refiner: refiner" in ours.infotexts[0] and "Refiner switch at: 0.333" in ours.infotexts[0]

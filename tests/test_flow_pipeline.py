"""SD 3 / 3.5 and FLUX.1 end to end: torchsd's FlowPipeline, loaded from folders written by diffusers' own
save_pretrained, gives diffusers' StableDiffusion3Pipeline's and FluxPipeline's latents and images; the
request, infotext and CLI work as for the U-Net models; bad input is refused with a message."""

import numpy as np
import pytest
import torch
from PIL import Image

import flow_reference as ref
import torchsd
from reference import max_rel_error


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("flow")
    return {"sd3": ref.saved(ref.sd3_pipeline(work), work / "sd3"),
            "sd3_no_t5": ref.saved(ref.sd3_pipeline(work, t5=False), work / "sd3_no_t5"),
            "dev": ref.saved(ref.flux_pipeline(work), work / "dev"),
            "schnell": ref.saved(ref.flux_pipeline(work, dev=False), work / "schnell")}


def ours(folder):
    return torchsd.load_pipeline(folder, "cpu", torch.float32)


def generators(seed, n=1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def check_images(pipe, result, theirs_pt):
    """Our decode of our latents against diffusers' image (in [0, 1])."""
    mine = (pipe.decode_latents(result.latents) + 1) / 2
    assert max_rel_error(mine.clamp(0, 1), theirs_pt) < 1e-3
    png = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    assert (png - theirs_pt[0]).abs().max() < 1.5 / 255  # the saved picture is that image, rounded


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5"])
def test_sd3_equals_stable_diffusion3_pipeline(folders, name):
    from diffusers import StableDiffusion3Pipeline

    without = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3_no_t5" else {}
    reference = StableDiffusion3Pipeline.from_pretrained(folders[name], **without)
    kw = dict(prompt="a photo of a cat", negative_prompt="zebra", height=32, width=32, num_inference_steps=4,
              guidance_scale=4.5)
    with torch.no_grad():
        latents = reference(**kw, generator=generators(7), output_type="latent").images
        image = reference(**kw, generator=generators(7), output_type="pt").images
    pipe = ours(folders[name])
    result = pipe.generate("a photo of a cat", "zebra", width=32, height=32, steps=4, guidance_scale=4.5, seed=7)
    assert max_rel_error(result.latents, torch.randn(latents.shape, generator=generators(7)[0])) > 0.1
    assert max_rel_error(result.latents, latents) < 1e-4
    check_images(pipe, result, image)
    assert "Sampler: Euler" in result.infotexts[0] and "CFG scale: 4.5" in result.infotexts[0]


@pytest.mark.parametrize("name,cfg", [("dev", 1.0), ("dev", 3.0), ("schnell", 1.0)])
def test_flux_equals_flux_pipeline(folders, name, cfg):
    """dev: the dynamic shift by the image's token count and the embedded (distilled) guidance; with a negative
    prompt and a scale above 1, diffusers' true CFG. schnell: no guidance, 256 T5 tokens."""
    from diffusers import FluxPipeline

    reference = FluxPipeline.from_pretrained(folders[name])
    negative = "zebra" if cfg > 1 else None
    kw = dict(prompt="an astronaut riding a horse", height=32, width=32, num_inference_steps=4,
              guidance_scale=2.5, true_cfg_scale=cfg, negative_prompt=negative,
              max_sequence_length=512 if name == "dev" else 256)
    with torch.no_grad():
        packed = reference(**kw, generator=generators(3), output_type="latent").images
        image = reference(**kw, generator=generators(3), output_type="pt").images
    latents = FluxPipeline._unpack_latents(packed, 32, 32, 2)
    pipe = ours(folders[name])
    extra = {"distilled_cfg_scale": 2.5} if name == "dev" else {}
    result = pipe.generate("an astronaut riding a horse", negative or "", width=32, height=32, steps=4,
                           guidance_scale=cfg, seed=3, **extra)
    assert max_rel_error(result.latents, latents) < 1e-4
    check_images(pipe, result, image)
    text = result.infotexts[0]
    assert ("Distilled CFG Scale: 2.5" in text) == (name == "dev") and f"CFG scale: {cfg}" in text


def test_sd3_image_to_image_equals_diffusers(folders):
    from diffusers import StableDiffusion3Img2ImgPipeline

    picture = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    reference = StableDiffusion3Img2ImgPipeline.from_pretrained(folders["sd3"])
    with torch.no_grad():
        latents = reference(prompt="a red chair", image=picture, strength=0.5, num_inference_steps=4,
                            guidance_scale=3.0, generator=generators(5), output_type="latent").images
    result = ours(folders["sd3"]).generate("a red chair", init_image=picture, strength=0.5, steps=4,
                                           guidance_scale=3.0, seed=5)
    assert max_rel_error(result.latents, latents) < 1e-4
    assert "Denoising strength: 0.5" in result.infotexts[0]


def test_batch_images_equal_their_seeds_alone_and_progress_is_reported(folders):
    pipe = ours(folders["schnell"])
    steps = []
    batch = pipe.generate("a cat", width=32, height=32, steps=3, seed=11, batch_size=2, callback=steps.append)
    alone = pipe.generate("a cat", width=32, height=32, steps=3, seed=12)
    assert [s.index for s in steps] == [0, 1, 2] and steps[0].total == 3 and steps[0].x0.shape == (2, 16, 16, 16)
    assert batch.seeds == [11, 12] and max_rel_error(batch.latents[1:], alone.latents) < 1e-5


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "unipc"])
def test_other_samplers_run_and_approach_euler_at_many_steps(folders, sampler):
    pipe = ours(folders["sd3"])
    common = dict(width=32, height=32, seed=1, guidance_scale=1.0)
    euler = pipe.generate("a cat", steps=40, **common).latents
    other = pipe.generate("a cat", steps=40, sampler=sampler, **common)
    assert max_rel_error(other.latents, euler) < 0.05
    from torchsd.diffusion.samplers import get_sampler

    assert f"Sampler: {get_sampler(sampler).label}," in other.infotexts[0]


def test_flow_times_below_one_are_diffusers_flow_dpm_solver_levels():
    from diffusers import DPMSolverMultistepScheduler

    from torchsd.config import FlowScheduleConfig
    from torchsd.pipeline.flow_run import flow_sigmas_below_one

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    scheduler.set_timesteps(9)
    torch.testing.assert_close(flow_sigmas_below_one(FlowScheduleConfig.sd3(), 9, 64).float(), scheduler.sigmas,
                               atol=1e-6, rtol=0)


def test_ddim_runs_as_euler_and_the_infotext_says_so(folders):
    pipe = ours(folders["schnell"])
    ddim = pipe.generate("a cat", width=32, height=32, steps=2, seed=4, sampler="ddim")
    euler = pipe.generate("a cat", width=32, height=32, steps=2, seed=4, sampler="Euler")
    assert torch.equal(ddim.latents, euler.latents) and "Sampler: Euler," in ddim.infotexts[0]


@pytest.mark.parametrize("options,message", [
    ({"sampler": "euler_a"}, "Euler, Heun, DPM\\+\\+ 2M, UniPC"),
    ({"sampler": "DPM++ 2M SDE"}, "does not run on flow-matching models"),
    ({"scheduler": "karras"}, "schedule type"),
    ({"distilled_cfg_scale": 3.0}, "FLUX.1-dev's embedded guidance"),
    ({"tiling": True}, "tiling is not available for SD 3 / 3.5"),
])
def test_bad_requests_say_what_works(folders, options, message):
    pipe = ours(folders["sd3"])
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", **{"width": 32, "height": 32, "steps": 2, **options})


def test_size_must_fit_the_vae_and_the_patches(folders):
    import dataclasses

    pipe = ours(folders["sd3"])  # as a full-size model's VAE: 8x, so 16-pixel steps
    pipe.config = dataclasses.replace(pipe.config, vae=dataclasses.replace(pipe.config.vae, channel_mult=(1, 2, 4, 4)))
    with pytest.raises(ValueError, match="width 40: .* multiples of 16 pixels .* try 32 or 48"):
        pipe.generate("a cat", width=40, height=32, steps=1)


def test_flow_options_on_an_sd_model_are_refused():
    sd = torchsd.load_pipeline(None, "cpu", torch.float32)
    with pytest.raises(ValueError, match="flow-matching models"):
        sd.generate("a cat", steps=1, width=16, height=16, distilled_cfg_scale=3.5)


def test_cli_generate_and_from_reproduce(folders, tmp_path, capsys):
    from torchsd.cli import main

    model = ["--model", str(folders["dev"]), "--dtype", "fp32", "--device", "cpu"]
    assert main(["generate", "a horse", "--steps", "2", "--size", "32x32", "--seed", "5", "--distilled-cfg", "4",
                 "--sampler", "heun", "-o", str(tmp_path / "a.png"), *model]) == 0
    assert main(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), *model]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)
    text = Image.open(tmp_path / "b.png").text["parameters"]
    assert "Distilled CFG Scale: 4" in text and "Sampler: Heun" in text
    assert main(["generate", "a horse", "--sampler", "euler_a", "--size", "32x32", *model]) == 2
    assert "Euler, Heun, DPM++ 2M, UniPC" in capsys.readouterr().err

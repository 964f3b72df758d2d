"""CLIP guidance moves samples toward the prompt as CLIP sees it, with DDIM and the Euler family, with and
without classifier-free guidance; it is reproducible per seed, and bad settings fail with a clear message.

The models are tiny and random. "Toward the prompt" is checkable on them because the similarity is measured
by the same CLIP that guides: after one step (which lands on x0), the decoded image's cosine similarity to
the prompt must be higher with guidance than without. Random towers respond weakly to pixels, hence the
large scale (trained CLIPs use about 100)."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reference import random_clip, random_pipeline
from torchsd.cli import build_parser, main
from torchsd.cli.flags import request_from_args
from torchsd.diffusion.clip_guidance import LinearLatentDecoder, clip_guidance, spherical_distance, vae_decoder
from torchsd.diffusion.denoisers import classifier_free_guidance
from torchsd.pipeline import GenerationRequest

SCALE = 1e4
PROMPTS = ["a red circle", "two dogs in the snow", "a black triangle on white"]


@pytest.fixture(scope="module")
def sd():
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    sd = random_pipeline("sd1")
    sd.clip = random_clip(0)
    return sd


def similarity(sd, latents, prompt):
    clip = sd.clip
    with torch.no_grad():
        text = clip.encode_text(sd.tokenizer([prompt]))
        image = clip.encode_image(clip.preprocess(sd.decode_latents(latents).clamp(-1, 1)))
    return F.cosine_similarity(image, text).item()


def kdiffusion_sampling():
    """k-diffusion's sampling.py by file path: its package __init__ needs torchvision and more, which the
    test environment does not have; sampling.py itself needs only ``utils.append_dims``."""
    name = "_kdiffusion_for_clip_guidance"
    if name + ".sampling" not in sys.modules:
        root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
        package = types.ModuleType(name)
        package.__path__ = []
        package.utils = types.SimpleNamespace(append_dims=lambda x, n: x[(...,) + (None,) * (n - x.ndim)])
        sys.modules[name], sys.modules[name + ".utils"] = package, package.utils
        spec = importlib.util.spec_from_file_location(name + ".sampling", root / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name + ".sampling"] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".sampling"]


# --- it points the right way ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_ddim_step_raises_clip_similarity(sd, cfg):
    for seed, prompt in enumerate(PROMPTS):
        options = dict(steps=1, seed=seed, guidance_scale=cfg, sampler="ddim")
        plain = sd.generate(prompt, **options)
        guided = sd.generate(prompt, clip_guidance_scale=SCALE, clip_cutouts=0, **options)
        before, after = similarity(sd, plain.latents, prompt), similarity(sd, guided.latents, prompt)
        assert after > before + 1e-4, (prompt, before, after)


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_euler_ancestral"])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_euler_step_raises_clip_similarity(sd, sampler, cfg):
    """k-diffusion's own Euler samplers, which know nothing of CLIP, run the wrapped denoiser."""
    sample = getattr(kdiffusion_sampling(), sampler)
    clip, tokenizer = sd.clip, sd.tokenizer
    for seed, prompt in enumerate(PROMPTS):
        cond = sd.encode_prompt([prompt])
        denoise = classifier_free_guidance(sd.denoiser, cond, sd.encode_prompt([""]), cfg)
        with torch.no_grad():
            text = clip.encode_text(tokenizer([prompt]))
        guided = clip_guidance(denoise, clip, text, vae_decoder(sd.vae, 0.18215), SCALE, cutouts=0)
        sigmas = torch.tensor([sd.denoiser.sigma_max, 0.0])
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        plain_x = sample(denoise, noise, sigmas, disable=True)
        guided_x = sample(guided, noise, sigmas, disable=True)
        before, after = similarity(sd, plain_x, prompt), similarity(sd, guided_x, prompt)
        assert after > before + 1e-4, (prompt, before, after)


def test_cutouts_and_linear_decoder_also_raise_similarity_on_average(sd):
    """Random crops and the linear stand-in for the decoder only approximate CLIP's view of the decoded
    image, so a single prompt may go either way; the mean must go up."""
    for options in (dict(clip_cutouts=8), dict(clip_cutouts=0, clip_decoder="linear")):
        gains = []
        for seed, prompt in enumerate(PROMPTS):
            plain = sd.generate(prompt, steps=1, seed=seed, guidance_scale=1.0)
            guided = sd.generate(prompt, steps=1, seed=seed, guidance_scale=1.0, clip_guidance_scale=SCALE, **options)
            gains.append(similarity(sd, guided.latents, prompt) - similarity(sd, plain.latents, prompt))
        assert sum(gains) / len(gains) > 0, (options, gains)


# --- the pieces ----------------------------------------------------------------------------------

def test_spherical_distance():
    a = torch.tensor([[1.0, 0.0]])
    assert spherical_distance(a, torch.tensor([[3.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # angle theta -> 2 * (theta / 2)^2 = theta^2 / 2
    assert spherical_distance(a, torch.tensor([[0.0, 2.0]])).item() == pytest.approx((torch.pi / 2) ** 2 / 2)
    assert spherical_distance(a, torch.tensor([[-1.0, 0.0]])).item() == pytest.approx(torch.pi ** 2 / 2)


def test_checkpointed_decoder_gives_the_same_image_and_gradient(sd):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for checkpoint in (False, True):
        x = latents.clone().requires_grad_(True)
        image = vae_decoder(sd.vae, 0.18215, checkpoint=checkpoint)(x)
        (grad,) = torch.autograd.grad(image.square().sum(), x)
        results.append((image.detach(), grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


class AffineVAE(torch.nn.Module):
    """A stand-in "VAE" whose decoder is exactly a per-pixel affine map, nearest-upsampled by 2."""

    def __init__(self, weight, bias):
        super().__init__()
        self.config = types.SimpleNamespace(latent_channels=4, downscale_factor=2)
        self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)
        self.weight, self.bias = weight, bias

    def decode(self, latents):
        rgb = torch.einsum("oc,bchw->bohw", self.weight, latents) + self.bias[:, None, None]
        return F.interpolate(rgb, scale_factor=2, mode="nearest")


def test_linear_decoder_fit_recovers_an_affine_decoder():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 4, generator=gen) * 0.02, torch.randn(3, generator=gen) * 0.1
    decoder, r2 = LinearLatentDecoder.fit(AffineVAE(weight, bias), scaling_factor=0.5)
    # the fit sees latents / scaling_factor, so it must find weight / 0.5
    assert torch.allclose(decoder.weight, weight / 0.5, atol=1e-5)
    assert torch.allclose(decoder.bias, bias, atol=1e-5)
    assert r2 > 0.9999
    assert decoder(torch.zeros(1, 4, 3, 3)).shape == (1, 3, 6, 6)


# --- the pipeline --------------------------------------------------------------------------------

def test_scale_zero_is_exactly_no_guidance_and_needs_no_clip():
    sd = random_pipeline("sd1")
    plain = sd.generate("a red circle", steps=2, seed=3)
    off = sd.generate("a red circle", steps=2, seed=3, clip_guidance_scale=0.0, clip_model="/nowhere")
    assert torch.equal(plain.latents, off.latents)
    assert "CLIP" not in off.infotexts[0]


def test_guided_runs_are_reproducible_and_per_image(sd):
    options = dict(steps=2, guidance_scale=7.5, clip_guidance_scale=SCALE, clip_cutouts=4)
    pair = sd.generate("a red circle", seed=10, batch_size=2, **options)
    again = sd.generate("a red circle", seed=10, batch_size=2, **options)
    alone = sd.generate("a red circle", seed=11, **options)
    unguided = sd.generate("a red circle", seed=11, steps=2, guidance_scale=7.5)
    assert torch.equal(pair.latents, again.latents)
    # image 2 of the batch is seed 11 generated alone: noise and cut-outs are drawn per image. (Batched
    # float sums differ by ~1e-5 even unguided; cut-outs of another seed move these latents by ~10.)
    assert torch.allclose(pair.latents[1], alone.latents[0], atol=1e-4)
    assert not torch.allclose(alone.latents, unguided.latents, atol=1e-1)
    assert "CLIP guidance scale: 10000.0, CLIP model: own, CLIP cutouts: 4, CLIP decoder: vae" in alone.infotexts[0]


def test_clip_model_path_is_loaded_once_and_cached(sd, tmp_path):
    from torchsd.checkpoints.clip import save_clip

    save_clip(sd.clip, tmp_path / "clip.safetensors")
    other = random_pipeline("sd1")  # has no CLIP of its own
    options = dict(steps=1, seed=0, clip_guidance_scale=SCALE, clip_cutouts=0, clip_model=tmp_path / "clip.safetensors")
    first = other.generate("a red circle", **options)
    cached = other.clip_models[str(tmp_path / "clip.safetensors")]
    second = other.generate("a red circle", **options)
    assert other.clip_models[str(tmp_path / "clip.safetensors")] is cached
    assert torch.equal(first.latents, second.latents)
    # the same weights as the fixture's own CLIP give the same image
    own = sd.generate("a red circle", steps=1, seed=0, clip_guidance_scale=SCALE, clip_cutouts=0)
    assert torch.allclose(first.latents, own.latents, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------

def test_scale_without_a_clip_model_is_refused():
    sd = random_pipeline("sd1")
    with pytest.raises(ValueError, match="clip_guidance_scale needs a CLIP model with an image encoder, and this "
                                         "model has none: pass clip_model"):
        sd.generate("a red circle", steps=1, clip_guidance_scale=100)


def test_missing_clip_model_file_is_refused(tmp_path):
    sd = random_pipeline("sd1")
    with pytest.raises(ValueError, match="no such file or folder"):
        sd.generate("a red circle", steps=1, clip_guidance_scale=100, clip_model=tmp_path / "nothing")


def test_text_embedding_of_the_wrong_width_is_refused(sd):
    with pytest.raises(ValueError, match=r"the text embedding has shape \(1, 64\), but this CLIP embeds images in 32 "
                                         r"dimensions: encode the prompt with the same CLIP"):
        clip_guidance(sd.denoiser, sd.clip, torch.zeros(1, 64), vae_decoder(sd.vae, 0.18215), 100.0)


@pytest.mark.parametrize("field, value, message", [
    ("clip_guidance_scale", -1.0, "clip_guidance_scale must be a finite number >= 0"),
    ("clip_guidance_scale", float("nan"), "clip_guidance_scale must be a finite number >= 0"),
    ("clip_cutouts", 65, "clip_cutouts must be between 0 .* and 64; got 65"),
    ("clip_decoder", "taesd", "clip_decoder must be one of vae, linear; got 'taesd'"),
])
def test_bad_options_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="x", **{field: value})


def test_cli_flags_reach_the_request(capsys):
    args = build_parser().parse_args(["generate", "a cat", "--clip-guidance-scale", "150", "--clip-model", "clip/",
                                      "--clip-cutouts", "8", "--clip-decoder", "linear"])
    request = request_from_args(args)
    assert (request.clip_guidance_scale, request.clip_model, request.clip_cutouts, request.clip_decoder) == \
        (150.0, "clip/", 8, "linear")
    assert main(["generate", "a cat", "--clip-cutouts", "-1"]) == 2
    assert "clip_cutouts must be between 0" in capsys.readouterr().err

"""SDXL beside the features that reach into the U-Net: DeepCache and ToMe (against the DeepCache and tomesd
packages on diffusers' SDXL networks), IP-Adapter (U-Net and whole run against diffusers), and an SD 1.x
ControlNet, which is refused with its reason (it does not fit SDXL's U-Net; SDXL ControlNets:
tests/test_sdxl_control.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torchsd
from reference import max_rel_error
from sdxl_reference import diffusers_unet_of, random_sdxl
from torchsd.models.step_cache import DeepCacheUNet
from torchsd.models.token_merging import token_merging
from torchsd.models.unet import added_vector

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry, low quality"
RUN = dict(steps=8, guidance_scale=5.0, width=32, height=32, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-features") / "model"
    random_sdxl("sdxl").save(path)
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return torchsd.load_pipeline(folder, dtype=torch.float32)


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))  # the tiny VAE scales by 2


def unet_inputs(unet, seed=0):
    """One latent under two contexts, each with its own added vector (pooled text, micro-conditioning), and
    what diffusers' U-Net takes for the same vector (text_embeds, time_ids)."""
    c = unet.config
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, c.context_dim, generator=gen)
    pooled = torch.randn(2, c.pooled_dim, generator=gen)
    numbers = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [64.0, 48.0, 8.0, 4.0, 32.0, 32.0]])
    y = added_vector(pooled, numbers, c.micro_condition_dim)
    return z, context, y, {"text_embeds": pooled, "time_ids": numbers}


def diffusers_xl(folder, scheduler="EulerDiscreteScheduler", **config):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- DeepCache -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("branch", [0, 2, 4])
def test_deep_cache_full_steps_are_the_plain_sdxl_unet_bit_for_bit(branch):
    unet = random_sdxl("sdxl").unet
    z, context, y, _ = unet_inputs(unet)
    wrapper = DeepCacheUNet(unet, interval=1, branch=branch)
    with torch.no_grad():
        for t in (900.0, 500.0):
            assert torch.equal(wrapper(z, torch.tensor([t]), context, y), unet(z, torch.tensor([t]), context, y))


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 4)])
def test_deep_cache_run_matches_deepcache_package_on_sdxl(sd, folder, interval, branch):
    pytest.importorskip("DeepCache")
    from DeepCache import DeepCacheSDHelper

    ours = sd.generate(PROMPT, NEGATIVE, latents=noise(), deep_cache_interval=interval, deep_cache_branch=branch,
                       **RUN).latents
    assert sd.denoiser.unet is sd.unet
    pipe = diffusers_xl(folder, timestep_spacing="linspace")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=RUN["steps"], guidance_scale=5.0, width=32,
                  height=32, latents=noise(), output_type="latent").images
    plain = sd.generate(PROMPT, NEGATIVE, latents=noise(), **RUN).latents
    assert max_rel_error(plain, theirs) > 1e-3  # caching changed the run
    assert max_rel_error(ours, theirs) < 1e-3


# --- ToMe ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, max_downsample", [(0.5, 2), (0.75, 8)])
def test_token_merging_on_the_sdxl_unet_matches_tomesd(ratio, max_downsample):
    """SDXL's top level has no transformers: merging starts one level down (two blocks per transformer)."""
    tomesd = pytest.importorskip("tomesd")
    unet = random_sdxl("sdxl").unet
    theirs_unet = diffusers_unet_of(unet)
    tomesd.apply_patch(theirs_unet, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    z, context, y, added = unet_inputs(unet)
    t = torch.tensor([501.0])
    with torch.no_grad():
        theirs = theirs_unet(z.repeat(2, 1, 1, 1), t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        plain = unet(z, t, context, y)
        with token_merging(unet, ratio, max_downsample):
            ours = unet(z, t, context, y)
    assert max_rel_error(plain, theirs) > 1e-3  # merging changed the output
    assert max_rel_error(ours, theirs) < 1e-4


def test_deep_cache_and_token_merging_in_an_sdxl_run(sd):
    result = sd.generate(PROMPT, steps=4, width=32, height=32, seed=1, deep_cache_interval=2, tome_ratio=0.5,
                         tome_max_downsample=2)
    assert result.images[0].size == (32, 32)
    assert "DeepCache interval: 2" in result.infotexts[0] and "Token merging ratio: 0.5" in result.infotexts[0]


# --- IP-Adapter ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plus", [False, True], ids=["basic", "plus"])
def test_sdxl_unet_with_ip_adapter_matches_diffusers(tmp_path, plus):
    from test_ip_adapter import original_state, random_ip_adapter
    from torchsd.checkpoints.ip_adapter import load_ip_adapter

    sd = random_sdxl("sdxl")
    adapter = random_ip_adapter(sd, plus)
    unet_ref = diffusers_unet_of(sd.unet)
    state = original_state(adapter, sd, unet_ref)
    torch.save(state, tmp_path / "ip-adapter_sdxl.bin")
    loaded = load_ip_adapter(tmp_path / "ip-adapter_sdxl.bin", sd.unet)
    unet_ref._load_ip_adapter_weights([state])
    for processor in unet_ref.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.6]
    z, context, y, added = unet_inputs(sd.unet)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 5, 48, generator=gen) if plus else torch.randn(2, 48, generator=gen)
    t = torch.tensor([999.0])
    with torch.no_grad():
        ours = sd.unet(z, t, context, y, image_keys_values=loaded.keys_values(loaded.image_tokens(image), 0.6))
        theirs = unet_ref(z.repeat(2, 1, 1, 1), t, encoder_hidden_states=context,
                          added_cond_kwargs={**added, "image_embeds": [image[:, None]]}).sample
        assert max_rel_error(ours, theirs) < 1e-4
        assert max_rel_error(ours, sd.unet(z, t, context, y)) > 1e-3


def test_sdxl_run_with_ip_adapter_matches_diffusers_pipeline(sd, folder, tmp_path):
    from test_ip_adapter import original_state, random_ip_adapter, tiny_encoder_folder
    from torchsd.checkpoints.ip_adapter import load_image_encoder
    from torchsd.images import pil_to_tensor
    from torchsd.models.clip import preprocess_images

    pipe = diffusers_xl(folder, "DDIMScheduler")
    state = original_state(random_ip_adapter(sd, plus=False), sd, pipe.unet)
    (tmp_path / "ip").mkdir()
    torch.save(state, tmp_path / "ip" / "ip-adapter_sdxl_tiny.bin")
    tiny_encoder_folder(tmp_path / "ip" / "image_encoder")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    ours = sd.generate(PROMPT, NEGATIVE, steps=6, guidance_scale=6.0, sampler="ddim", width=32, height=32,
                       latents=noise(), seed=0, ip_adapter_image=image,
                       ip_adapter_model=tmp_path / "ip" / "ip-adapter_sdxl_tiny.bin", ip_adapter_scale=0.6)
    encoder = load_image_encoder(tmp_path / "ip" / "image_encoder")
    with torch.no_grad():
        embeds = encoder.features(preprocess_images(pil_to_tensor(image), 32), plus=False)
    pipe.unet._load_ip_adapter_weights([state])
    pipe.set_ip_adapter_scale(0.6)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0, width=32, height=32,
                  latents=noise(), output_type="latent",
                  ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]]).images
    assert max_rel_error(ours.latents, theirs) < 1e-4
    assert "IP-Adapter: ip-adapter_sdxl_tiny, IP-Adapter scale: 0.6" in ours.infotexts[0]


# --- control ---------------------------------------------------------------------------------------------------

def test_an_sd1_controlnet_on_sdxl_is_refused_with_the_reason(sd, tmp_path):
    """SDXL ControlNets run (tests/test_sdxl_control.py); one made for SD 1.x does not fit SDXL's U-Net."""
    from reference import random_pipeline
    from torchsd.checkpoints.controlnet import save_controlnet
    from torchsd.models.controlnet import ControlNet

    sd1 = random_pipeline("sd1")
    save_controlnet(ControlNet.from_unet(sd1.unet, hint_widths=(16, 32)), tmp_path / "cn_sd1.safetensors")
    unit = torchsd.ControlUnit(image=Image.new("RGB", (32, 32)), model=tmp_path / "cn_sd1.safetensors")
    with pytest.raises(ValueError, match=r"an SD 1\.x\S* ControlNet .*does not fit this SDXL model"):
        sd.generate(PROMPT, steps=2, width=32, height=32, control=[unit])

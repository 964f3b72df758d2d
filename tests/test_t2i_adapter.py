"""T2I-Adapter: the same random weights in torchsd and diffusers give the same features, and the U-Net with
them the same output."""

import pytest
import torch

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.models.adapter import AdapterConfig, T2IAdapter

TOL = 1e-4


def random_adapter(sd, seed: int = 7, downscale: int | None = None) -> T2IAdapter:
    c = sd.config.unet
    widths = tuple(c.model_channels * m for m in c.channel_mult)
    config = AdapterConfig(widths=widths, num_res_blocks=2,
                           downscale=downscale or sd.config.vae.downscale_factor)
    torch.manual_seed(seed)
    return T2IAdapter(config).eval()


def diffusers_adapter(adapter: T2IAdapter):
    from diffusers import T2IAdapter as Reference

    c = adapter.config
    ref = Reference(in_channels=c.hint_channels, channels=list(c.widths), num_res_blocks=c.num_res_blocks,
                    downscale_factor=c.downscale, adapter_type="full_adapter")
    ref.load_state_dict({"adapter." + k: v for k, v in adapter.state_dict().items()}, strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    return random_pipeline(request.param)


def test_features_and_unet_match_diffusers(sd):
    adapter = random_adapter(sd, downscale=8)
    ref = diffusers_adapter(adapter)
    unet_ref = diffusers_unet(sd)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=gen)
    hint = torch.rand(2, 3, 64, 128, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ours, theirs = adapter(hint), ref(hint)
        assert len(ours) == len(theirs) == len(sd.config.unet.channel_mult)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and max_rel_error(a, b) < TOL
        out = sd.unet(x, t, context, level_residuals=[f * 0.5 for f in ours])
        expected = unet_ref(x, t, encoder_hidden_states=context,
                            down_intrablock_additional_residuals=[f * 0.5 for f in theirs]).sample
        assert max_rel_error(out, expected) < TOL
        assert max_rel_error(out, sd.unet(x, t, context)) > 1e-3


# --- files and the pipeline ---------------------------------------------------------------------------------

def test_files_diffusers_and_original_layouts(tmp_path):
    from safetensors.torch import save_file

    from torchsd.checkpoints.controlnet import load_control_model
    from torchsd.checkpoints.io import CheckpointError

    sd = random_pipeline("sd1")
    adapter = random_adapter(sd, downscale=8)
    ref = diffusers_adapter(adapter)
    ref.save_pretrained(tmp_path / "folder")
    diffusers_state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(diffusers_state, str(tmp_path / "single.safetensors"))
    # TencentARC's flat layout, as diffusers' conversion script reads it: body.{2 * level + j}, in_conv on 2 * level
    original = {}
    for key, value in diffusers_state.items():
        parts = key.removeprefix("adapter.").split(".")
        if parts[0] == "body" and parts[2] == "resnets":
            key = f"body.{2 * int(parts[1]) + int(parts[3])}.{'.'.join(parts[4:])}"
        elif parts[0] == "body":
            key = f"body.{2 * int(parts[1])}.{'.'.join(parts[2:])}"
        else:
            key = ".".join(parts)
        original[key] = value
    torch.save(original, tmp_path / "t2iadapter_canny_sd15v2.pth")
    for path in (tmp_path / "folder", tmp_path / "single.safetensors", tmp_path / "t2iadapter_canny_sd15v2.pth"):
        loaded = load_control_model(path, sd.config.unet)
        assert loaded.config == adapter.config, path
        for key, value in adapter.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (path, key)
    original["body.0.skep.weight"] = torch.zeros(1)
    torch.save(original, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="skep"):
        load_control_model(tmp_path / "old.pth", sd.config.unet)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_final_latents_match_diffusers_adapter_pipeline(tmp_path, scale):
    """(StableDiffusionAdapterPipeline has no adapter_conditioning_factor: start/end are ControlNet's code path)"""
    import numpy as np
    from diffusers import T2IAdapter as Reference
    from PIL import Image

    import torchsd
    from test_pipeline_parity import diffusers_pipeline, initial_latents

    sd = random_pipeline("sd1")
    sd.save(tmp_path / "model")
    adapter = random_adapter(sd)  # unshuffle by the tiny VAE's factor 2: features at the latents' size
    diffusers_adapter(adapter).save_pretrained(tmp_path / "adapter")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pipe = diffusers_pipeline(tmp_path / "model", "StableDiffusionAdapterPipeline",
                              adapter=Reference.from_pretrained(tmp_path / "adapter"))
    prompt, negative = "a red circle", "blurry"
    theirs = pipe(prompt, negative_prompt=negative, image=image, num_inference_steps=8, guidance_scale=6.0,
                  width=32, height=32, latents=initial_latents(), adapter_conditioning_scale=scale,
                  output_type="latent").images
    ours = torchsd.load_pipeline(tmp_path / "model", dtype=torch.float32).generate(
        prompt, negative, steps=8, guidance_scale=6.0, sampler="ddim", eta=0.0, width=32, height=32,
        latents=initial_latents(), seed=0,
        control=[torchsd.ControlUnit(image=image, model=tmp_path / "adapter", weight=scale)])
    assert max_rel_error(ours.latents, theirs) < TOL

"""T2I-Adapter, SD 1.x/2.x's ("full_adapter") and SDXL's ("full_adapter_xl"): the same random weights in torchsd
and diffusers give the same features, and the U-Net with them the same output; diffusers' files load; a run's
final latents equal diffusers' StableDiffusionAdapterPipeline's and StableDiffusionXLAdapterPipeline's."""

import pytest
import torch

from reference import diffusers_unet, max_rel_error, random_pipeline
from sdxl_reference import diffusers_unet_of, random_sdxl
from torchsd.models.adapter import AdapterConfig, T2IAdapter
from torchsd.models.unet import level_residual_shapes

TOL = 1e-4


def random_adapter(sd, seed: int = 7, downscale: int | None = None) -> T2IAdapter:
    """An adapter for ``sd``'s U-Net: one width per level; SDXL's layout on SDXL, with a fourth feature for the
    middle block where the U-Net has SDXL's three levels (unshuffling by twice the VAE's factor, as 16 is)."""
    c = sd.config.unet
    widths = tuple(c.model_channels * m for m in c.channel_mult)
    xl = sd.config.is_sdxl
    if xl and len(widths) >= 3:
        widths += widths[-1:]
    config = AdapterConfig(widths=widths, num_res_blocks=2,
                           downscale=downscale or sd.config.vae.downscale_factor * (2 if xl else 1),
                           layout="full_adapter_xl" if xl else "full_adapter")
    torch.manual_seed(seed)
    return T2IAdapter(config).eval()


def diffusers_adapter(adapter: T2IAdapter):
    from diffusers import T2IAdapter as Reference

    c = adapter.config
    ref = Reference(in_channels=c.hint_channels, channels=list(c.widths), num_res_blocks=c.num_res_blocks,
                    downscale_factor=c.downscale, adapter_type=c.layout)
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


# --- SDXL: TencentARC's t2i-adapter-*-sdxl-1.0, diffusers' full_adapter_xl ---------------------------------------

@pytest.fixture(scope="module")
def xl():
    return random_sdxl("sdxl", levels=3)  # SDXL's three levels: the XL layout is made for them


def test_sdxl_features_and_unet_match_diffusers(xl):
    """Features 0 and 1 at half the latents' size (level 0's after its downsampler), 2 and 3 at a quarter (level 2,
    then the middle block), as diffusers' UNet2DConditionModel adds them."""
    from test_sdxl_control import inputs

    adapter = random_adapter(xl)
    assert adapter.config.feature_shapes() == level_residual_shapes(xl.config.unet) == [
        (32, 2), (64, 2), (128, 4), (128, 4)]
    ref = diffusers_adapter(adapter)
    unet_ref = diffusers_unet_of(xl.unet)
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 16, 16, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    context, y, added = inputs(xl)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ours, theirs = adapter(hint), ref(hint)
        assert [f.shape for f in ours] == [f.shape for f in theirs]
        for a, b in zip(ours, theirs):
            assert max_rel_error(a, b) < TOL
        out = xl.unet(x, t, context, y, level_residuals=[f * 0.5 for f in ours])
        expected = unet_ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                            down_intrablock_additional_residuals=[f * 0.5 for f in theirs]).sample
        assert max_rel_error(out, expected) < TOL
        assert max_rel_error(out, xl.unet(x, t, context, y)) > 1e-3
        without_mid = xl.unet(x, t, context, y, level_residuals=[f * 0.5 for f in ours[:3]])
        assert max_rel_error(out, without_mid) > 1e-4  # the fourth feature went somewhere: the middle block
        with pytest.raises(ValueError, match="give one per level"):
            xl.unet(x, t, context, y, level_residuals=ours[:2])


def test_sdxl_files_from_diffusers_save_pretrained(xl, tmp_path):
    """The layout from config.json in a folder; in a single file (no config) from the unshuffle factor: twice the
    VAE's is SDXL's, the VAE's SD 1.x/2.x's."""
    from safetensors.torch import save_file

    from torchsd.checkpoints.controlnet import load_control_model

    adapter = random_adapter(xl)  # unshuffle 4: twice the tiny VAE's 2
    diffusers_adapter(adapter).save_pretrained(tmp_path / "xl")
    single = tmp_path / "xl" / "diffusion_pytorch_model.safetensors"
    for path in (tmp_path / "xl", single):
        loaded = load_control_model(path, xl.config.unet, latent_downscale=2)
        assert loaded.config == adapter.config, path
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    # as TencentARC ships them: unshuffle 16 for SDXL's VAE (8, the default), in a file of its own
    real = random_adapter(xl, downscale=16)
    save_file({k: v.contiguous() for k, v in diffusers_adapter(real).state_dict().items()},
              str(tmp_path / "t2i-adapter-canny-sdxl-1.0.safetensors"))
    loaded = load_control_model(tmp_path / "t2i-adapter-canny-sdxl-1.0.safetensors", xl.config.unet)
    assert loaded.config.layout == "full_adapter_xl" and loaded.config.hint_downscale == 8
    sd1 = random_adapter(random_pipeline("sd1"), downscale=8)
    save_file({k: v.contiguous() for k, v in diffusers_adapter(sd1).state_dict().items()},
              str(tmp_path / "t2iadapter_canny_sd15v2.safetensors"))
    assert load_control_model(tmp_path / "t2iadapter_canny_sd15v2.safetensors", xl.config.unet).config == sd1.config


@pytest.fixture(scope="module")
def xl_saved(xl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-adapter")
    xl.save(root / "model")
    diffusers_adapter(random_adapter(xl)).save_pretrained(root / "adapter")
    sd1 = random_pipeline("sd1")
    sd1.save(root / "sd1")
    diffusers_adapter(random_adapter(sd1)).save_pretrained(root / "sd1-adapter")
    return root


@pytest.mark.parametrize("scale, end", [(1.0, 1.0), (0.6, 0.5)])
def test_sdxl_final_latents_match_diffusers_adapter_pipeline(xl_saved, scale, end):
    """The unit's weight is adapter_conditioning_scale, its guidance end adapter_conditioning_factor."""
    import diffusers

    import torchsd
    from test_sdxl_control import NEGATIVE, PROMPT, hint_image, noise

    image = hint_image(0)
    pipe = torchsd.load_pipeline(xl_saved / "model", dtype=torch.float32)
    run = dict(steps=6, guidance_scale=5.0, sampler="ddim", eta=0.0, width=32, height=32, latents=noise(), seed=0)
    ours = pipe.generate(PROMPT, NEGATIVE, **run, control=[
        torchsd.ControlUnit(image=image, model=xl_saved / "adapter", weight=scale, guidance_end=end)])
    reference = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(
        xl_saved / "model", adapter=diffusers.T2IAdapter.from_pretrained(xl_saved / "adapter"))
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, image=image, num_inference_steps=6, guidance_scale=5.0,
                       width=32, height=32, latents=noise(), adapter_conditioning_scale=scale,
                       adapter_conditioning_factor=end, output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < 1e-3
    assert max_rel_error(pipe.generate(PROMPT, NEGATIVE, **run).latents, theirs) > 1e-2  # the adapter acted
    assert 'ControlNet 0: "Module: none, Model: adapter, Weight: ' in ours.infotexts[0]


def test_an_adapter_of_another_family_is_refused(xl_saved):
    import torchsd
    from test_sdxl_control import hint_image

    xl = torchsd.load_pipeline(xl_saved / "model", dtype=torch.float32)
    sd1 = torchsd.load_pipeline(xl_saved / "sd1", dtype=torch.float32)
    run = dict(steps=2, width=32, height=32, seed=0)
    with pytest.raises(ValueError, match=r"an SD 1\.x/2\.x adapter.*does not fit .*an SDXL model"):
        xl.generate("a cat", **run, control=[torchsd.ControlUnit(image=hint_image(0), model=xl_saved / "sd1-adapter")])
    with pytest.raises(ValueError, match=r"an SDXL adapter.*does not fit .*an SD 1\.x/2\.x model"):
        sd1.generate("a cat", **run, control=[torchsd.ControlUnit(image=hint_image(0), model=xl_saved / "adapter")])

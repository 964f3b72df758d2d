"""SD 3.5 and FLUX.1 from single files as they are published and kept (BFL's flux1-*.safetensors with ae.safetensors,
clip_l and t5xxl beside it in Forge's folders; SD 3.5's all-in-one file; GGUF kept quantized), written here by the
tests' own writers from the weights of a diffusers reference pipeline: the same images as diffusers' pipeline; the
missing parts named; and ``torchsd convert`` back to a folder diffusers loads."""

import shutil

import pytest
import torch

import flow_reference as ref
import torchsd
from reference import max_rel_error
from test_flux_files import bfl_from_diffusers
from test_sd3_files import original_from_diffusers
from torchsd.checkpoints import bfl
from torchsd.checkpoints.diffusers import from_diffusers_keys
from torchsd.checkpoints.io import CheckpointError, save_safetensors
from torchsd.config import VAEConfig


def save(tensors: dict, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path)
    return path


def ae_tensors(vae) -> dict:
    """The autoencoder in LDM names (what ae.safetensors holds; bfl.vae_to_original is checked against
    diffusers' convert_ldm_vae_checkpoint in test_flux_files.py)."""
    config = VAEConfig(latent_channels=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       use_quant_conv=False)
    return bfl.vae_to_original(from_diffusers_keys(vae.state_dict(), "vae"), config)


def nested(clip_state: dict) -> dict:
    """transformers 4's layout, as clip_l.safetensors files ship: the tower under text_model."""
    return {k if k == "text_projection.weight" or k.startswith("text_model.") else "text_model." + k: v
            for k, v in clip_state.items()}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A Forge models folder: Stable-diffusion/flux1-dev.safetensors, VAE/ae.safetensors, text_encoder/{clip_l,
    t5xxl_fp16}.safetensors and text_encoder/t5_tokenizer/; and the diffusers pipeline of the same weights."""
    work = tmp_path_factory.mktemp("flux_files")
    pipe = ref.flux_pipeline(work)
    models = work / "models"
    save(bfl_from_diffusers(pipe.transformer.state_dict()), models / "Stable-diffusion" / "flux1-dev.safetensors")
    save(ae_tensors(pipe.vae), models / "VAE" / "ae.safetensors")
    clip = nested(pipe.text_encoder.state_dict())
    clip["text_projection.weight"] = torch.randn(64, 64)  # SD 3's clip_l.safetensors has one; FLUX.1 ignores it
    save(clip, models / "text_encoder" / "clip_l.safetensors")
    save(pipe.text_encoder_2.state_dict(), models / "text_encoder" / "t5xxl_fp16.safetensors")
    pipe.tokenizer_2.save_pretrained(models / "text_encoder" / "t5_tokenizer")
    return pipe, models


def reference_latents(pipe, **kw):
    from diffusers import FluxPipeline

    with torch.no_grad():
        packed = pipe(prompt="a horse on the moon", height=32, width=32, num_inference_steps=3, guidance_scale=3.5,
                      generator=[torch.Generator().manual_seed(2)], output_type="latent", **kw).images
    return FluxPipeline._unpack_latents(packed, 32, 32, 2)


def run(pipe, **kw):
    return pipe.generate("a horse on the moon", width=32, height=32, steps=3, seed=2, **kw).latents


def test_flux_file_with_parts_in_forge_folders_equals_diffusers(flux):
    reference, models = flux
    pipe = torchsd.load_pipeline(models / "Stable-diffusion" / "flux1-dev.safetensors", "cpu", torch.float32)
    assert pipe.config.label == "FLUX.1 (dev)" and pipe.parts["vae"].endswith("ae.safetensors")
    assert max_rel_error(run(pipe), reference_latents(reference)) < 1e-4


def test_flux_parts_named_explicitly_through_the_cli(flux, tmp_path):
    from torchsd.cli import main

    _, models = flux
    lone = tmp_path / "lone" / "flux1-dev.safetensors"
    lone.parent.mkdir()
    shutil.copy(models / "Stable-diffusion" / "flux1-dev.safetensors", lone)
    text = models / "text_encoder"
    assert main(["generate", "a horse", "--model", str(lone), "--vae", str(models / "VAE" / "ae.safetensors"),
                 "--text-encoder", str(text / "clip_l.safetensors"),
                 "--text-encoder", str(text / "t5xxl_fp16.safetensors"),
                 "--t5-tokenizer", str(text / "t5_tokenizer"), "--size", "32x32", "--steps", "1", "--dtype", "fp32",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()


def test_missing_parts_are_named_with_the_flag_that_takes_them(flux, tmp_path):
    _, models = flux
    lone = tmp_path / "flux1-dev.safetensors"
    shutil.copy(models / "Stable-diffusion" / "flux1-dev.safetensors", lone)
    with pytest.raises(CheckpointError, match=r"no autoencoder .* ae\.safetensors with --vae FILE"):
        torchsd.load_pipeline(lone, "cpu", torch.float32)
    vae = models / "VAE" / "ae.safetensors"
    with pytest.raises(CheckpointError, match=r"needs CLIP-L .* --text-encoder FILE"):
        torchsd.load_pipeline(lone, "cpu", torch.float32, vae=vae)
    clip = models / "text_encoder" / "clip_l.safetensors"
    with pytest.raises(CheckpointError, match=r"T5-XXL encoder .* --text-encoder"):
        torchsd.load_pipeline(lone, "cpu", torch.float32, vae=vae, text_encoders=[clip])
    t5 = tmp_path / "elsewhere" / "t5xxl_fp16.safetensors"  # no t5_tokenizer/ beside it
    t5.parent.mkdir()
    shutil.copy(models / "text_encoder" / "t5xxl_fp16.safetensors", t5)
    with pytest.raises(CheckpointError, match=r"T5's tokenizer .* --t5-tokenizer"):
        torchsd.load_pipeline(lone, "cpu", torch.float32, vae=vae, text_encoders=[clip, t5])
    with pytest.raises(CheckpointError, match="not a CLIP or T5"):
        torchsd.load_pipeline(lone, "cpu", torch.float32, vae=vae, text_encoders=[vae])


def test_flux_gguf_stays_quantized_and_runs_close_to_float(flux, tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_quantized import quantize, write_gguf
    from torchsd.models.quantized import QuantizedLinear

    reference, models = flux
    tensors = bfl_from_diffusers(reference.transformer.state_dict())
    arrays = {k: quantize(v, "Q8_0") if v.ndim == 2 and v.shape[1] % 32 == 0 else v.numpy() for k, v in tensors.items()}
    kinds = {k: "Q8_0" if v.ndim == 2 and v.shape[1] % 32 == 0 else "F32" for k, v in tensors.items()}
    path = models / "Stable-diffusion" / "flux1-dev-Q8_0.gguf"
    write_gguf(path, arrays, kinds)
    assert gguf.GGUFReader(str(path)).tensors
    try:
        pipe = torchsd.load_pipeline(path, "cpu", torch.float32)
        assert sum(isinstance(m, QuantizedLinear) for m in pipe.transformer.modules()) > 5
        assert max_rel_error(run(pipe), reference_latents(reference)) < 2e-2
    finally:
        path.unlink()


def test_sd35_all_in_one_file_equals_diffusers(tmp_path):
    reference = ref.sd3_pipeline(tmp_path)
    transformer = original_from_diffusers(reference.transformer.state_dict())
    tensors = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    tensors.update({"first_stage_model." + k: v for k, v in ae_tensors(reference.vae).items()})
    for name, encoder in (("clip_l", reference.text_encoder), ("clip_g", reference.text_encoder_2)):
        tensors.update({f"text_encoders.{name}.transformer.{k}": v
                        for k, v in nested(encoder.state_dict()).items()})
    tensors.update({f"text_encoders.t5xxl.transformer.{k}": v
                    for k, v in reference.text_encoder_3.state_dict().items()})
    path = save(tensors, tmp_path / "sd3.5_medium.safetensors")
    reference.tokenizer_3.save_pretrained(tmp_path / "t5_tokenizer")
    pipe = torchsd.load_pipeline(path, "cpu", torch.float32)
    assert pipe.config.label == "SD 3 / 3.5 (sd35_medium)"
    assert pipe.parts["clip_g"].endswith("(text_encoders.clip_g.transformer)")
    with torch.no_grad():
        theirs = reference(prompt="a red chair", negative_prompt="blurry", height=32, width=32,
                           num_inference_steps=3, guidance_scale=5.0, generator=[torch.Generator().manual_seed(4)],
                           output_type="latent").images
    mine = pipe.generate("a red chair", "blurry", width=32, height=32, steps=3, seed=4, guidance_scale=5.0)
    assert max_rel_error(mine.latents, theirs) < 1e-4


def test_convert_single_files_to_a_folder_diffusers_loads(flux, tmp_path):
    from diffusers import FluxPipeline

    from torchsd.cli import main

    reference, models = flux
    out = tmp_path / "flux-dev-diffusers"
    source = str(models / "Stable-diffusion" / "flux1-dev.safetensors")
    assert main(["convert", source, str(out), "--dtype", "fp32"]) == 0
    converted = FluxPipeline.from_pretrained(out)
    assert max_rel_error(reference_latents(converted), reference_latents(reference)) < 1e-5
    assert max_rel_error(run(torchsd.load_pipeline(out, "cpu", torch.float32)), reference_latents(reference)) < 1e-4
    assert main(["convert", source, str(tmp_path / "x.safetensors")]) == 2

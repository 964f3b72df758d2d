"""Writing both formats: round trips key for key, the original SD 1.5 key set, ``torchsd convert``, VAE swaps."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchsd
from ldm_reference import diffusers_configs, original_checkpoint, random_reference_models
from reference import max_rel_error, random_pipeline
from test_checkpoints_single_file import inferable_config
from torchsd.checkpoints import convert_checkpoint
from torchsd.checkpoints.ldm import METADATA_KEY, model_states_on_meta, single_file_tensors
from torchsd.cli import main
from torchsd.config import ModelConfig

COMPONENT_FILES = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors"]


def read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_identical(a: dict, b: dict, skip=lambda key: False):
    assert a.keys() == b.keys()
    for key in a:
        if not skip(key):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_to_single_file_and_back_is_identical(tmp_path, family, dtype):
    random_pipeline(family, "v_prediction" if family == "sd2" else "epsilon").save(tmp_path / "a", dtype=dtype)
    convert_checkpoint(tmp_path / "a", tmp_path / "model.safetensors")  # dtype kept as stored
    convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "b")
    for name in COMPONENT_FILES:
        assert_identical(load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name))
    for name in ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
                 "tokenizer/special_tokens_map.json"]:
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((tmp_path / "b" / name).read_text())
    single = read_all(tmp_path / "model.safetensors")
    assert {v.dtype for k, v in single.items() if k.startswith("model.")} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_to_folder_and_back_is_identical(tmp_path, family, dtype):
    """Key for key; what torchsd does not keep is documented: SD 2's unused last OpenCLIP layer and the
    text projection come back as the identity, the schedule buffers are rebuilt from the config."""
    config = inferable_config(family)
    state, _ = original_checkpoint(config, seed=8)
    state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(tmp_path / "a.safetensors"))
    convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "folder", format="diffusers")
    convert_checkpoint(tmp_path / "folder", tmp_path / "b.safetensors", format="single-file")
    written = read_all(tmp_path / "b.safetensors")
    rebuilt = ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
               f"cond_stage_model.model.transformer.resblocks.{config.text.num_layers}.")
    extras = {k: written.pop(k) for k in list(written) if k not in state}
    assert_identical(state, written, skip=lambda k: k.startswith(rebuilt))
    # what the writer adds beyond the networks: the DDPM schedule (as diffusers computes it)
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(extras["alphas_cumprod"], reference.alphas_cumprod, rtol=1e-6)
    assert torch.allclose(extras["betas"], reference.betas, rtol=1e-6)
    if family == "sd1":
        assert torch.equal(extras["cond_stage_model.transformer.text_model.embeddings.position_ids"],
                           torch.arange(77)[None])


def test_sd15_single_file_has_the_original_key_set_and_shapes():
    """Built on the meta device. The expected layout comes from ldm_reference (checked against diffusers'
    converters) applied to full-size diffusers models; the counts and spot shapes are those of published
    SD 1.5 files (686 U-Net, 248 VAE, 197 text tensors, position_ids included)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm_reference import clip_to_original, unet_to_original, vae_to_original

    config = ModelConfig.sd15()
    written = single_file_tensors(config, model_states_on_meta(config))
    unet_cfg, vae_cfg, _ = diffusers_configs(config)
    with torch.device("meta"):
        from transformers import CLIPTextConfig, CLIPTextModel

        from torchsd.checkpoints.diffusers import text_config_to_transformers

        expected = unet_to_original(UNet2DConditionModel(**unet_cfg).state_dict(), 2)
        expected |= vae_to_original(AutoencoderKL(**vae_cfg).state_dict(), 4)
        text = CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(config.text)))
        expected |= clip_to_original(text.state_dict())
    expected["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    buffers = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
               "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}
    assert set(written) == set(expected) | buffers
    assert {k: tuple(v.shape) for k, v in written.items() if k not in buffers} == \
        {k: tuple(v.shape) for k, v in expected.items()}
    counts = {p: sum(k.startswith(p) for k in written)
              for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}
    spot = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.0.in_layers.0.weight": (1920,),
            "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
            "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
            "alphas_cumprod": (1000,)}
    assert {k: tuple(written[k].shape) for k in spot} == spot
    assert written["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_sd21_single_file_has_the_openclip_key_set():
    config = ModelConfig.sd21_v()
    written = single_file_tensors(config, model_states_on_meta(config))
    text = {k: tuple(v.shape) for k, v in written.items() if k.startswith("cond_stage_model.")}
    assert len(text) == 294 and len([k for k in text if ".resblocks.23." in k]) == 12  # 24 layers, as published
    assert text["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)
    assert text["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert text["cond_stage_model.model.logit_scale"] == ()
    assert tuple(written["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320)


def test_written_sd2_file_gives_the_same_context_through_its_last_layer(tmp_path):
    """The identity layer written in place of OpenCLIP's unused 24th: a tool that runs every layer of the
    file (diffusers' converter into a model with one layer more) gets torchsd's penultimate context."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from torchsd.checkpoints.diffusers import text_config_to_transformers

    sd = random_pipeline("sd2")
    sd.save(tmp_path / "m.safetensors", format="single-file")
    state = read_all(tmp_path / "m.safetensors")
    cfg = text_config_to_transformers(sd.config.text)
    full = CLIPTextModel(CLIPTextConfig(**(cfg | {"num_hidden_layers": sd.config.text.num_layers + 1}))).eval()
    converted = convert_open_clip_checkpoint(full, state)
    missing, unexpected = full.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()},
                                               strict=False)
    assert not missing and set(unexpected) <= {"text_projection.weight"}
    ids = sd.tokenizer(["a house on a hill", ""])
    with torch.no_grad():
        assert max_rel_error(sd.text_encoder(ids), full(ids).last_hidden_state) < 1e-5


def test_written_file_embeds_the_config_so_tiny_head_counts_survive(tmp_path):
    sd = random_pipeline("sd1")  # 2 U-Net heads, 4 text heads: not what tensors of a real SD 1 file imply
    sd.save(tmp_path / "m.safetensors", format="single-file")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert ModelConfig.from_dict(json.loads(f.metadata()[METADATA_KEY])) == sd.config
    loaded = torchsd.load_pipeline(tmp_path / "m.safetensors", dtype=torch.float32)
    assert loaded.config == sd.config
    ids = sd.tokenizer(["a cat"])
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids), sd.text_encoder(ids))


def test_cli_convert_both_ways_with_dtype(tmp_path, capsys):
    random_pipeline("sd2", "v_prediction").save(tmp_path / "folder")
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "m.safetensors"), "--to", "single-file",
                 "--dtype", "fp16"]) == 0
    assert "SD2, v_prediction" in capsys.readouterr().out
    assert {v.dtype for v in read_all(tmp_path / "m.safetensors").values() if v.ndim > 1} == {torch.float16}
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    back = torchsd.load_pipeline(tmp_path / "back", dtype=torch.float16)
    original = torchsd.load_pipeline(tmp_path / "folder", dtype=torch.float16)
    assert back.config == original.config
    assert torch.equal(back.unet.conv_in.weight, original.unet.conv_in.weight)


def test_cli_convert_refuses_with_exit_2(tmp_path, capsys):
    random_pipeline("sd1").save(tmp_path / "folder")
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "m.ckpt"), "--to", "single-file"]) == 2
    assert "written as .safetensors" in capsys.readouterr().err and not (tmp_path / "m.ckpt").exists()
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "x"), "--use-ema"]) == 2
    assert "apply to single-file inputs" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- VAE swaps ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_vae(tmp_path_factory):
    """An SD 1 model file and, separately, another autoencoder of the same shape in every layout."""
    root = tmp_path_factory.mktemp("vae")
    config = inferable_config("sd1")
    state, _ = original_checkpoint(config, seed=11)
    save_file(state, str(root / "model.safetensors"))
    other, _ = original_checkpoint(config, seed=12)
    vae_state = {k.removeprefix("first_stage_model."): v for k, v in other.items()
                 if k.startswith("first_stage_model.")}
    save_file(vae_state, str(root / "vae-original.safetensors"))
    torch.save({"state_dict": vae_state | {"loss.logvar": torch.zeros(())}}, root / "vae-original.ckpt")
    save_file(other, str(root / "whole-model.safetensors"))
    _, vae, _ = random_reference_models(config, seed=12)
    vae.save_pretrained(root / "vae-diffusers")
    save_file(vae.state_dict(), str(root / "vae-diffusers-names.safetensors"))
    return root, other


@pytest.mark.parametrize("vae", ["vae-original.safetensors", "vae-original.ckpt", "whole-model.safetensors",
                                 "vae-diffusers", "vae-diffusers-names.safetensors"])
def test_vae_is_swapped_in_either_layout(model_and_vae, vae):
    root, other = model_and_vae
    sd = torchsd.load_pipeline(root / "model.safetensors", vae=root / vae, dtype=torch.float32)
    plain = torchsd.load_pipeline(root / "model.safetensors", dtype=torch.float32)
    expected = other["first_stage_model.decoder.conv_out.weight"]
    if vae.startswith("vae-diffusers"):  # a different random VAE: compare with what diffusers holds
        from diffusers import AutoencoderKL

        expected = AutoencoderKL.from_pretrained(root / "vae-diffusers").decoder.conv_out.weight.detach()
    assert torch.equal(sd.vae.decoder.conv_out.weight, expected)
    assert not torch.equal(plain.vae.decoder.conv_out.weight, expected)
    assert torch.equal(sd.unet.conv_in.weight, plain.unet.conv_in.weight)


def test_cli_generate_and_convert_take_vae(model_and_vae, tmp_path):
    root, other = model_and_vae
    assert main(["generate", "a cat", "--model", str(root / "model.safetensors"), "--vae",
                 str(root / "vae-original.safetensors"), "--steps", "1", "--size", "16x16", "--seed", "1",
                 "--output", str(tmp_path / "cat.png")]) == 0
    assert (tmp_path / "cat.png").exists()
    assert main(["convert", str(root / "model.safetensors"), str(tmp_path / "swapped.safetensors"), "--vae",
                 str(root / "vae-diffusers")]) == 0
    from diffusers import AutoencoderKL

    expected = AutoencoderKL.from_pretrained(root / "vae-diffusers").encoder.conv_in.weight.detach()
    assert torch.equal(read_all(tmp_path / "swapped.safetensors")["first_stage_model.encoder.conv_in.weight"], expected)


def test_vae_of_another_latent_space_is_refused(model_and_vae, tmp_path):
    root, _ = model_and_vae
    import dataclasses

    config = inferable_config("sd1")
    wide = dataclasses.replace(config, vae=dataclasses.replace(config.vae, latent_channels=16),
                               unet=dataclasses.replace(config.unet, in_channels=16, out_channels=16))
    state, _ = original_checkpoint(wide, seed=1)
    save_file({k: v for k, v in state.items() if k.startswith("first_stage_model.")},
              str(tmp_path / "vae16.safetensors"))
    with pytest.raises(ValueError, match="16-channel latents.*model needs 4 channels"):
        torchsd.load_pipeline(root / "model.safetensors", vae=tmp_path / "vae16.safetensors", dtype=torch.float32)
    save_file({"foo": torch.zeros(3)}, str(tmp_path / "novae.safetensors"))
    with pytest.raises(ValueError, match="holds no autoencoder"):
        torchsd.load_pipeline(root / "model.safetensors", vae=tmp_path / "novae.safetensors", dtype=torch.float32)

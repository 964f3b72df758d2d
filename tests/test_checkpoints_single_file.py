"""Original-layout single files (written independently by ``ldm_reference``) give the same outputs in
torchsd as the same weights run through diffusers' own single-file conversion."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import torchsd
from ldm_reference import diffusers_from_original, original_checkpoint, random_reference_models
from reference import max_rel_error
from torchsd.checkpoints.diffusers import schedule_config_to_diffusers
from torchsd.checkpoints.ldm import read_single_file
from torchsd.config import CLIPTextConfig, ModelConfig, PredictionType, ScheduleConfig, UNetConfig, VAEConfig

TOL = 1e-4
PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry"


def inferable_config(family: str, prediction_type: str = "epsilon") -> ModelConfig:
    """Tiny models whose every config field the tensors reveal (published head sizes, 32 norm groups).
    SD 1 has attention at the first level only (upsampler at slot 1), SD 2 at the second (slot 2)."""
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    if family == "sd1":
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, False), num_heads=8,
                          context_dim=64)
        text = CLIPTextConfig(width=64, num_layers=2, num_heads=1, ffn_dim=128, projection_dim=64)
    else:
        unet = UNetConfig(model_channels=64, channel_mult=(1, 2), attention_levels=(False, True), num_heads=None,
                          head_dim=64, transformer_depth=2, context_dim=64, use_linear_projection=True)
        text = CLIPTextConfig(width=64, num_layers=2, num_heads=1, ffn_dim=128, activation="gelu", projection_dim=64,
                              pad_token_id=0)
    v = prediction_type == "v_prediction"
    return ModelConfig(unet=unet, vae=vae, text=text, schedule=ScheduleConfig(prediction_type=prediction_type),
                       family=family, sample_size=768 if v else 512)


CASES = [("sd1", "epsilon"), ("sd2", "v_prediction")]


@pytest.fixture(scope="module", params=CASES, ids=["sd1-eps", "sd2-v"])
def case(request, tmp_path_factory):
    """An original-layout .safetensors (no torchsd metadata); SD 2's v-prediction comes from a sidecar .yaml."""
    family, prediction = request.param
    config = inferable_config(family, prediction)
    state, _ = original_checkpoint(config, seed=3)
    path = tmp_path_factory.mktemp(family) / "model.safetensors"
    save_file(state, str(path))
    if prediction == "v_prediction":
        path.with_suffix(".yaml").write_text(
            'model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    return config, state, path, diffusers_from_original(state, config)


def test_reference_writer_inverts_diffusers_converters(case):
    """ldm_reference's original layout is what diffusers' converters read: they give back every tensor."""
    config, _, _, _ = case
    extra = 1 if config.family == "sd2" else 0
    state, models = original_checkpoint(config, seed=3)
    for original, converted in zip(models, diffusers_from_original(state, config)):
        a, b = original.state_dict(), converted.state_dict()
        if extra:  # the converted text model keeps the layers SD 2 uses, not OpenCLIP's last
            a = {k: v for k, v in a.items() if not k.startswith(f"encoder.layers.{config.text.num_layers}.")}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_is_inferred_from_the_tensors(case):
    config, _, path, _ = case
    assert read_single_file(path)[0] == config


def test_text_encoder_matches_diffusers_conversion(case):
    config, _, path, (_, _, ref) = case
    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    ids = sd.tokenizer([PROMPT, ""])
    assert ids[1, -1] == config.text.pad_token_id
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert max_rel_error(sd.text_encoder(ids), out.last_hidden_state) < TOL
        skipped = ref.final_layer_norm(out.hidden_states[-2])
        assert max_rel_error(sd.text_encoder(ids, clip_skip=2), skipped) < TOL


def test_unet_matches_diffusers_conversion(case):
    config, _, path, (ref, _, _) = case
    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, config.text.width, generator=gen)
    t = torch.tensor([981, 3])
    with torch.no_grad():
        assert max_rel_error(sd.unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample) < TOL


def test_vae_encode_decode_match_diffusers_conversion(case):
    _, _, path, (_, ref, _) = case
    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours, theirs = sd.vae.encode(images), ref.encode(images).latent_dist
        assert max_rel_error(ours.mean, theirs.mean) < TOL and max_rel_error(ours.std, theirs.std) < TOL
        assert max_rel_error(sd.vae.decode(ours.mean), ref.decode(theirs.mean).sample) < TOL


def test_ddim_with_guidance_matches_diffusers_pipeline(case, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    config, _, path, (unet, vae, text) = case
    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    assert sd.config.schedule.prediction_type.value == config.schedule.prediction_type.value
    sd.tokenizer.save_pretrained(tmp_path / "tokenizer")
    scheduler = DDIMScheduler(**{k: v for k, v in schedule_config_to_diffusers(config.schedule).items()
                                 if not k.startswith("_")})
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = sd.generate(PROMPT, NEGATIVE, steps=4, guidance_scale=6.5, sampler="ddim", width=16, height=16,
                       latents=latents, seed=0)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.5, width=16, height=16,
                  latents=latents, output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def _weights(sd):
    return {f"{name}.{k}": v for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder))
            for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def sd1_state():
    config = inferable_config("sd1")
    return config, original_checkpoint(config, seed=5)[0]


@pytest.mark.parametrize("variant", ["ckpt-nested", "ckpt-flat", "fp16", "bf16", "old-text-keys"])
def test_file_variants_load_the_same_weights(sd1_state, tmp_path, variant):
    """.ckpt under "state_dict" or flat, fp16 / bf16 tensors, and SD 1 text keys without ``text_model.``."""
    config, state = sd1_state
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    if variant.startswith("ckpt"):
        path = tmp_path / "model.ckpt"
        nested = {"state_dict": state, "global_step": 470000, "epoch": 6}
        torch.save(nested if variant == "ckpt-nested" else state, path)
        dtype = torch.float32
    elif variant == "old-text-keys":
        path = tmp_path / "old.safetensors"
        save_file({k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}, str(path))
        dtype = torch.float32
    else:
        dtype = torch.float16 if variant == "fp16" else torch.bfloat16
        path = tmp_path / f"{variant}.safetensors"
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
    expected = _weights(torchsd.load_pipeline(plain, dtype=torch.float32))
    loaded = torchsd.load_pipeline(path, dtype=torch.float32)
    assert loaded.config == config and loaded.dtype == torch.float32
    got = _weights(loaded)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k].to(dtype).float()) for k in got)
    kept = torchsd.load_pipeline(path, dtype=dtype)
    conv_in = state["model.diffusion_model.input_blocks.0.0.weight"].to(dtype)
    assert kept.dtype == dtype and torch.equal(kept.unet.conv_in.weight, conv_in)


def test_ema_weights_are_used_only_when_asked(sd1_state, tmp_path):
    config, state = sd1_state
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "with-ema.safetensors"
    save_file(state | ema | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)},
              str(path))
    conv_in = state["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(torchsd.load_pipeline(path, dtype=torch.float32).unet.conv_in.weight, conv_in)
    from_ema = torchsd.load_pipeline(path, use_ema=True, dtype=torch.float32)
    assert torch.equal(from_ema.unet.conv_in.weight, conv_in + 1.0)
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with pytest.raises(ValueError, match="use_ema=True but the file holds no EMA copy.*load without use_ema"):
        torchsd.load_pipeline(plain, use_ema=True, dtype=torch.float32)


def test_inpainting_file_has_nine_input_channels(tmp_path):
    config = dataclasses.replace(inferable_config("sd1"),
                                 unet=dataclasses.replace(inferable_config("sd1").unet, in_channels=9))
    state, _ = original_checkpoint(config, seed=2)
    path = tmp_path / "inpaint.safetensors"
    save_file(state, str(path))
    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    assert sd.config == config and sd.config.is_inpainting and sd.unet.conv_in.weight.shape[1] == 9


def test_prediction_type_from_argument_then_sidecar_then_default(sd1_state, tmp_path):
    _, state = sd1_state
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    assert read_single_file(path)[0].schedule.prediction_type is PredictionType.EPSILON
    assert read_single_file(path, prediction_type="v")[0].schedule.prediction_type is PredictionType.V_PREDICTION
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: 'v'\n")
    assert read_single_file(path)[0].schedule.prediction_type is PredictionType.V_PREDICTION
    assert read_single_file(path, prediction_type="epsilon")[0].schedule.prediction_type is PredictionType.EPSILON
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert read_single_file(path)[0].schedule.prediction_type is PredictionType.EPSILON
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon'.*got 'x0'"):
        read_single_file(path, prediction_type="x0")


def test_sd2_text_file_without_the_unused_layer_loads_too(tmp_path):
    """Files converted back from diffusers hold only the OpenCLIP layers SD 2 uses (ViT-H: 23 of 24)."""
    config = inferable_config("sd2")
    state, _ = original_checkpoint(config, seed=1)
    last = f"cond_stage_model.model.transformer.resblocks.{config.text.num_layers}."
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(last)}, str(path))
    # not ViT-H, so the file is read as holding the whole tower: one layer fewer than written
    assert read_single_file(path)[0].text.num_layers == config.text.num_layers - 1
    from torchsd.checkpoints.detect import openclip_layers_kept
    assert openclip_layers_kept(24, 1024) == 23 and openclip_layers_kept(23, 1024) == 23


def test_reference_models_are_random_not_default():
    """Guards the reference: no parameter sits at an initial constant."""
    unet, vae, text = random_reference_models(inferable_config("sd1"), seed=9)
    for model in (unet, vae, text):
        assert all(p.std() > 0 for p in model.parameters() if p.numel() > 1)

"""SDXL files: diffusers folders written by diffusers' own pipelines, Stability's single-file layout written
by an independent test writer and read by diffusers' own converters, and full-size key sets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from sdxl_reference import (
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    diffusers_xl_pipeline,
    original_sdxl_file,
    random_sdxl,
    tokenizer_pair,
)
from torchsd.checkpoints import model_states, read_checkpoint
from torchsd.checkpoints.detect import refuse_unsupported
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.ldm import model_states_on_meta, to_original
from torchsd.config import ModelConfig

FAMILIES = ["sdxl", "sdxl_refiner"]


def assert_same_states(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for component in ours:
        a, b = ours[component], theirs[component]
        assert a.keys() == b.keys(), component
        for key in a:
            assert torch.equal(a[key].float(), b[key].float()), (component, key)


@pytest.fixture(scope="module", params=FAMILIES)
def sd(request):
    return random_sdxl(request.param)


def test_folder_saved_by_diffusers_loads_the_same_weights(sd, tmp_path):
    pipe = diffusers_xl_pipeline(sd, tmp_path / "source")
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    config, states, tokenizer, _ = read_checkpoint(tmp_path / "saved")
    assert config == sd.config
    assert_same_states(states, model_states(sd))
    # tokenizer_2 pads with "!" (id 0): the second encoder's config keeps it
    assert config.text_encoders[-1].pad_token_id == 0 and config.text.pad_token_id == (
        49407 if sd.config.family == "sdxl" else 0)


def test_folder_written_by_torchsd_is_read_by_diffusers(sd, tmp_path):
    from diffusers import DiffusionPipeline

    sd.save(tmp_path / "ours")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if sd.config.family == "sdxl" else
                                   "StableDiffusionXLImg2ImgPipeline")
    assert pipe.tokenizer_2.pad_token_id == 0
    reference = diffusers_xl_pipeline(sd, tmp_path / "source")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name), getattr(reference, name)
        if theirs is None:
            assert ours is None
            continue
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Each family's weights in Stability's layout, without torchsd metadata."""
    root = tmp_path_factory.mktemp("xl-files")
    files = {}
    for family in FAMILIES:
        sd = random_sdxl(family, seed=5)
        path = root / f"{family}.safetensors"
        save_file(original_sdxl_file(sd), str(path))
        files[family] = sd, path
    return files


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_is_detected_and_read_from_its_tensors(single_files, family):
    sd, path = single_files[family]
    config, states, tokenizer, _ = read_checkpoint(path)
    assert config == dataclasses.replace(sd.config, sample_size=1024)  # the size is SDXL's, not in the tensors
    assert tokenizer.pad_token_id == config.text.pad_token_id
    assert_same_states(states, model_states(sd))


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_matches_diffusers_own_conversion(single_files, family):
    """diffusers' single-file converters turn the same file into the weights torchsd reads."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file

    from sdxl_reference import diffusers_unet_of, transformers_text_encoder_of
    from torchsd.checkpoints.diffusers import to_diffusers_keys

    sd, path = single_files[family]
    state = load_file(str(path))
    _, ours, _, _ = read_checkpoint(path)
    unet_cfg = dict(diffusers_unet_of(sd.unet).config)
    unet = convert_ldm_unet_checkpoint(state, unet_cfg)
    assert_same_states({"unet": unet}, {"unet": to_diffusers_keys(ours["unet"], "unet")})
    from reference import diffusers_vae

    vae = convert_ldm_vae_checkpoint(state, dict(diffusers_vae(sd).config))
    assert_same_states({"vae": vae}, {"vae": to_diffusers_keys(ours["vae"], "vae")})
    big_g = "text_encoder_2" if family == "sdxl" else "text_encoder"
    prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
    model = transformers_text_encoder_of(getattr(sd, big_g))

    def flat(d):
        return {k.removeprefix("text_model."): v for k, v in d.items() if not k.endswith("position_ids")}

    assert_same_states({"g": flat(convert_open_clip_checkpoint(model, state, prefix=prefix))},
                       {"g": flat(to_diffusers_keys(ours[big_g], "text_encoder"))})
    if family == "sdxl":
        clip_l = convert_ldm_clip_checkpoint(state)
        assert_same_states({"l": flat(clip_l)}, {"l": flat(to_diffusers_keys(ours["text_encoder"], "text_encoder"))})


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_written_by_torchsd_reads_back_and_matches_the_reference_layout(single_files, family, tmp_path):
    from safetensors.torch import load_file

    sd, path = single_files[family]
    sd.save(tmp_path / "ours.safetensors", format="single-file")
    written, reference = load_file(str(tmp_path / "ours.safetensors")), load_file(str(path))
    networks = {k for k in written if k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner."))}
    # the same tensors under the same names as the independent writer's (plus the position_ids buffer)
    assert {k for k in networks if not k.endswith("position_ids")} == set(reference)
    assert all(torch.equal(written[k], reference[k]) for k in reference if k in written and "logit_scale" not in k)
    config, states, _, _ = read_checkpoint(tmp_path / "ours.safetensors")
    assert config == sd.config
    assert_same_states(states, model_states(sd))


def test_inpainting_sdxl_file_has_nine_input_channels(tmp_path):
    base = ModelConfig.tiny("sdxl")
    config = dataclasses.replace(base, unet=dataclasses.replace(base.unet, in_channels=9))
    from torchsd.pipeline import StableDiffusion

    sd = StableDiffusion.from_config(config)
    save_file(original_sdxl_file(sd), str(tmp_path / "inpaint.safetensors"))
    read, _, _, _ = read_checkpoint(tmp_path / "inpaint.safetensors")
    assert read.is_inpainting and read.family == "sdxl"


def test_sdxl_text_without_label_emb_is_refused():
    sd = random_sdxl("sdxl")
    state = {k: v for k, v in original_sdxl_file(sd).items() if ".label_emb." not in k}
    with pytest.raises(CheckpointError, match="no label_emb"):
        refuse_unsupported(state, "x.safetensors")


@pytest.mark.parametrize("preset,published", [("sdxl_base", SDXL_BASE_UNET), ("sdxl_refiner", SDXL_REFINER_UNET)])
def test_full_size_key_sets_match_diffusers_conversion(preset, published):
    """The full-size original key set torchsd writes is what diffusers' converter maps onto its published
    U-Net, key for key and shape for shape (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = getattr(ModelConfig, preset)()
    original = to_original(model_states_on_meta(config), config)
    unet_keys = {k: v for k, v in original.items() if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        reference = UNet2DConditionModel(**published).state_dict()
    converted = convert_ldm_unet_checkpoint(unet_keys, published)
    assert converted.keys() == reference.keys()
    assert all(converted[k].shape == reference[k].shape for k in reference)
    text = {k for k in original if k.startswith("conditioner.")}
    big_g = "conditioner.embedders.1.model." if preset == "sdxl_base" else "conditioner.embedders.0.model."
    assert sum(k.startswith(big_g + "transformer.resblocks.") for k in text) == 32 * 12  # all 32 layers
    assert original[big_g + "text_projection"].shape == (1280, 1280)
    if preset == "sdxl_base":
        assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in text
    else:
        assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)


def test_tokenizer_pair_pads_as_sdxl(tmp_path):
    first, second = tokenizer_pair(random_sdxl("sdxl"), tmp_path)
    assert first.pad_token_id == 49407 and second("a cat", padding="max_length").input_ids[-1] == 0

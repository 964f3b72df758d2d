"""The joint CLIP equals transformers' CLIPModel and OpenCLIP's layout on the same random weights; its
checkpoints load and save in every layout, and refuse what does not fit with a message that says why."""

import dataclasses
import json

import pytest
import torch

from reference import OpenCLIPReference, _perturb, features, max_rel_error, random_clip, transformers_clip
from torchsd.checkpoints.clip import load_clip, save_clip
from torchsd.checkpoints.io import CheckpointError
from torchsd.models.clip import CLIP, preprocess_images
from torchsd.text.tokenizer import CLIPTokenizer

TOL = 1e-4
PROMPTS = ["a red circle at the top left on a blue background", "", "two green squares"]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip(request):
    text, vision = CLIP.tiny_configs()
    return random_clip(0, dataclasses.replace(text, activation=request.param),
                       dataclasses.replace(vision, activation=request.param))


def pixels(clip, batch=2, seed=0):
    size = clip.vision.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_towers_and_projections_match_transformers(clip, tokenizer):
    ref = transformers_clip(clip)
    ids, images = tokenizer(PROMPTS), pixels(clip)
    with torch.no_grad():
        text_out = ref.text_model(ids)
        assert max_rel_error(clip.text(ids), text_out.last_hidden_state) < TOL
        assert max_rel_error(clip.text.pooled(ids), text_out.pooler_output) < TOL
        assert max_rel_error(clip.vision(images), ref.vision_model(images).pooler_output) < TOL
        assert max_rel_error(clip.encode_text(ids), features(ref.get_text_features(ids))) < TOL
        assert max_rel_error(clip.encode_image(images), features(ref.get_image_features(images))) < TOL
        ours = clip(ids, images)
        theirs = ref(input_ids=ids, pixel_values=images).logits_per_image
    assert ours.shape == (2, 3)
    assert max_rel_error(ours, theirs) < TOL


@pytest.mark.parametrize("height, width", [(48, 64), (100, 70), (20, 30)])
def test_preprocess_matches_transformers_image_processor(height, width):
    """Resize the short side (bicubic), centre-crop, CLIP mean/std, as CLIPImageProcessor does it with PIL.
    PIL rounds the resized image to 8 bits (1/255 is 0.015 after normalising), hence the tolerance."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(height, width),
                                             mode="bilinear")
    image = Image.fromarray((smooth[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    theirs = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"])
    ours = preprocess_images(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1, 32)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max() < 0.02  # normalised values span about [-1.8, 2.1]


def test_transformers_folder_round_trip(clip, tokenizer, tmp_path):
    """The folder we write is what transformers reads, and ours reads it back key for key."""
    from transformers import CLIPModel

    save_clip(clip, tmp_path / "clip", format="transformers")
    ref = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    loaded = load_clip(tmp_path / "clip")
    ids, images = tokenizer(PROMPTS), pixels(clip)
    with torch.no_grad():
        assert max_rel_error(loaded.encode_text(ids), features(ref.get_text_features(ids))) < TOL
        assert max_rel_error(loaded.encode_image(images), features(ref.get_image_features(images))) < TOL
    for key, value in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.text.config == clip.text.config and loaded.vision.config == clip.vision.config


def test_torchsd_format_round_trip(clip, tmp_path):
    save_clip(clip, tmp_path / "clip.safetensors")
    loaded = load_clip(tmp_path / "clip.safetensors")
    assert loaded.text.config == clip.text.config and loaded.vision.config == clip.vision.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in clip.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dict_matches_its_reference(activation, suffix, tokenizer, tmp_path):
    text, vision = CLIP.tiny_configs()
    vision = dataclasses.replace(vision, num_heads=3)  # OpenCLIP's heads are a fixed width (16 here)
    torch.manual_seed(0)
    ref = OpenCLIPReference(text, vision, activation).eval()
    _perturb(ref, 0)
    state = ref.state_dict()
    if activation == "quick_gelu":  # how OpenAI's own files look: hyper-parameters stored as tensors
        state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    path = tmp_path / f"open_clip{suffix}"
    if suffix == ".pt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ours = load_clip(path, head_width=16)  # tiny widths 64/48 -> 4 and 3 heads
    assert ours.text.config.activation == activation  # from the OpenAI marker, or GELU by default
    assert (ours.text.config.num_heads, ours.vision.config.num_heads) == (4, 3)
    ids = tokenizer(PROMPTS)
    images = pixels(ours)
    with torch.no_grad():
        assert max_rel_error(ours.encode_text(ids), ref.encode_text(ids)) < TOL
        assert max_rel_error(ours.encode_image(images), ref.encode_image(images)) < TOL
    assert torch.equal(ours.logit_scale, ref.logit_scale)


# --- errors ------------------------------------------------------------------------------------

def test_projection_width_mismatch_is_refused():
    text, vision = CLIP.tiny_configs()
    with pytest.raises(ValueError, match="text projection_dim 32 must equal vision projection_dim 16"):
        CLIP(text, dataclasses.replace(vision, projection_dim=16))


def test_open_clip_with_mismatched_projections_is_refused(tmp_path):
    from safetensors.torch import save_file

    text, vision = CLIP.tiny_configs()
    state = OpenCLIPReference(text, dataclasses.replace(vision, projection_dim=16)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="bad.safetensors: CLIP: text projection_dim 32 must equal vision"):
        load_clip(tmp_path / "bad.safetensors", head_width=16)


def test_wrong_weights_for_the_config_are_refused(clip, tmp_path):
    save_clip(clip, tmp_path / "clip", format="transformers")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"keys do not match the model: 16 missing \(first: vision.layers.2"):
        load_clip(tmp_path / "clip")
    config["vision_config"]["num_hidden_layers"] = 2
    config["vision_config"]["intermediate_size"] = 64
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision.layers.0.mlp.fc1.bias has shape \(96,\), the model expects "
                                              r"\(64,\): the config does not match the weights"):
        load_clip(tmp_path / "clip")


def test_transformers_weights_without_config_and_non_clip_files_are_refused(clip, tmp_path):
    save_clip(clip, tmp_path / "clip", format="transformers")
    with pytest.raises(CheckpointError, match="needs its config.json: pass the folder"):
        load_clip(tmp_path / "clip" / "model.safetensors")
    (tmp_path / "clip" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_clip(tmp_path / "clip")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a CLIP model"):
        load_clip(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ValueError, match="saved as .safetensors"):
        save_clip(clip, tmp_path / "clip.pt")


def test_image_of_the_wrong_size_is_refused(clip):
    with pytest.raises(ValueError, match="takes 32x32 images; got 48x32: resize and crop them first"):
        clip.encode_image(torch.zeros(1, 3, 32, 48))

"""ControlNet files: lllyasviel's original layout (.pth / .safetensors, with or without ``control_model.``)
and diffusers' (folder and single file) load to the same weights; diffusers' own converter agrees. An SDXL
ControlNet in the original layout loads too, where diffusers' single-file reader cannot read it."""

import re

import pytest
import torch
from safetensors.torch import save_file

from reference import random_pipeline
from test_controlnet import random_controlnet
from torchsd.checkpoints.controlnet import find_controlnets, load_controlnet, read_controlnet_state
from torchsd.checkpoints.diffusers import from_diffusers_keys, to_diffusers_keys
from torchsd.checkpoints.io import CheckpointError


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture(scope="module")
def net(sd):
    return random_controlnet(sd)


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def write_original(diffusers_state: dict, layers_per_block: int) -> dict:
    """An independent writer of the cldm layout, by regular expressions over diffusers' names."""
    out = {}
    per_level = layers_per_block + 1
    for key, value in diffusers_state.items():
        k = key
        k = re.sub(r"^time_embedding\.linear_1\.", "time_embed.0.", k)
        k = re.sub(r"^time_embedding\.linear_2\.", "time_embed.2.", k)
        k = re.sub(r"^conv_in\.", "input_blocks.0.0.", k)
        k = re.sub(r"^controlnet_cond_embedding\.conv_in\.", "input_hint_block.0.", k)
        k = re.sub(r"^controlnet_cond_embedding\.blocks\.(\d+)\.",
                   lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.", k)
        k = re.sub(r"^controlnet_cond_embedding\.conv_out\.", "input_hint_block.14.", k)
        k = re.sub(r"^controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1.0.", k)
        k = re.sub(r"^controlnet_mid_block\.", "middle_block_out.0.", k)
        k = re.sub(r"^add_embedding\.linear_([12])\.", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.", k)  # SDXL
        k = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
                   lambda m: f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.", k)
        k = re.sub(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
                   lambda m: f"input_blocks.{1 + int(m[1]) * per_level + int(m[3])}."
                             f"{0 if m[2] == 'resnets' else 1}.", k)
        k = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}.", k)
        k = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", k)
        m = re.match(r"^((?:input_blocks\.\d+|middle_block)\.[02]\.)(\w+)\.(.*)$", k)
        if m and m[2] in RESNET:
            k = f"{m[1]}{RESNET[m[2]]}.{m[3]}"
        assert k != key, key
        out[k] = value.clone()
    return out


@pytest.mark.parametrize("form", ["pth", "safetensors", "prefixed.safetensors", "whole-model.pth"])
def test_original_layout_loads_and_equals_diffusers_conversion(sd, net, tmp_path, form):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    original = write_original(to_diffusers_keys(net.state_dict(), "unet"), sd.config.unet.num_res_blocks)
    tensors = dict(original)
    if form.startswith(("prefixed", "whole")):
        tensors = {"control_model." + k: v for k, v in original.items()}
    if form.startswith("whole"):  # ControlNet 1.0 files hold the SD model beside it
        tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    path = tmp_path / f"control.{form.split('.')[-1] if '.' in form else form}"
    if path.suffix == ".pth":
        torch.save(tensors, path)
    else:
        save_file(tensors, path)
    state, _ = read_controlnet_state(path, sd.config.unet)
    reference = from_diffusers_keys(convert_controlnet_checkpoint(original, {"layers_per_block": 2}), "unet")
    assert state.keys() == reference.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value) and torch.equal(reference[key], value), key
    loaded = load_controlnet(path, sd.config.unet)
    assert loaded.config.hint_widths == (16, 32, 96, 256)


def test_diffusers_folder_and_single_file(sd, net, tmp_path):
    from diffusers import ControlNetModel

    from reference import diffusers_unet
    from test_controlnet import diffusers_controlnet

    ref = diffusers_controlnet(net, diffusers_unet(sd))
    ref.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "single.safetensors")
    for path in (tmp_path / "folder", tmp_path / "single.safetensors"):
        loaded = load_controlnet(path, sd.config.unet)
        for key, value in net.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (path, key)
    assert set(find_controlnets([tmp_path])) == {"folder", "single"}
    assert ControlNetModel  # the reference wrote both


def test_wrong_family_and_control_lora_are_refused(sd, net, tmp_path):
    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()},
              tmp_path / "c.safetensors")
    sd2 = random_pipeline("sd2")
    with pytest.raises(CheckpointError, match="only fits the model family"):
        load_controlnet(tmp_path / "c.safetensors", sd2.config.unet)
    save_file({"lora_controlnet": torch.zeros(1), "input_blocks.1.0.in_layers.2.up": torch.zeros(2, 2)},
              tmp_path / "control-lora.safetensors")
    with pytest.raises(CheckpointError, match="Control-LoRA"):
        load_controlnet(tmp_path / "control-lora.safetensors", sd.config.unet)
    save_file({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors", sd.config.unet)


def test_sdxl_original_layout_loads_where_diffusers_cannot(tmp_path):
    """The cldm layout with SDXL's added embedding (``label_emb``, as sgm's U-Net names it; ComfyUI reads such
    files). diffusers' converter maps every key but ``label_emb``, and its single-file loader takes the file for
    an SD 1.5 ControlNet: there is no from_single_file to compare with (docs/controlnet.md)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, infer_diffusers_model_type

    from sdxl_reference import random_sdxl

    xl = random_sdxl("sdxl")
    net = random_controlnet(xl)  # the real hint encoder's widths: its last conv is input_hint_block.14
    original = write_original(to_diffusers_keys(net.state_dict(), "unet"), xl.config.unet.num_res_blocks)
    assert {"label_emb.0.0.weight", "label_emb.0.2.bias"} <= original.keys()
    prefixed = {"control_model." + k: v.contiguous() for k, v in original.items()}
    save_file(prefixed, tmp_path / "controlnet_xl.safetensors")
    loaded = load_controlnet(tmp_path / "controlnet_xl.safetensors", xl.config.unet)
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    reference = from_diffusers_keys(convert_controlnet_checkpoint(original, {"layers_per_block": 2}), "unet")
    assert net.state_dict().keys() - reference.keys() == {f"add_embedding.linear_{n}.{p}" for n in (1, 2)
                                                          for p in ("weight", "bias")}
    assert all(torch.equal(reference[k], net.state_dict()[k]) for k in reference)
    assert infer_diffusers_model_type(prefixed) == "controlnet"  # diffusers' SD 1.5 ControlNet config
    with pytest.raises(CheckpointError, match="does not fit this SD 1"):
        load_controlnet(tmp_path / "controlnet_xl.safetensors", random_pipeline("sd1").config.unet)

"""SD 3 / 3.5 single files in Stability AI's layout (all-in-one with model.diffusion_model.,
first_stage_model. and text_encoders.*, or transformer-only): torchsd reads them to exactly what diffusers'
single-file conversion gives, writes them back, and tells Medium from Large from the tensors alone."""

import dataclasses

import pytest
import torch

from test_mmdit import CONFIGS, diffusers_mmdit
from torchsd.checkpoints import sd3_original
from torchsd.checkpoints.io import CheckpointError, load_state_dict, save_safetensors
from torchsd.checkpoints.mmdit import config_to_diffusers, from_diffusers, to_diffusers
from torchsd.config import MMDiTConfig


def original_from_diffusers(sd: dict) -> dict:
    """The test's own inverse of diffusers' conversion: SD3Transformer2DModel names -> Stability's layout."""
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    pairs = [("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
             ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
             ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
             ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
             ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")]
    for theirs, ours in pairs:
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = sd[f"{theirs}.{kind}"]

    def swapped(t):
        scale, shift = t.chunk(2)
        return torch.cat([shift, scale])

    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swapped(sd[f"norm_out.linear.{kind}"])
        for i in range(layers):
            d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            last = i == layers - 1
            out[f"{x}adaLN_modulation.1.{kind}"] = sd[f"{d}norm1.linear.{kind}"]
            context_mod = sd[f"{d}norm1_context.linear.{kind}"]
            out[f"{c}adaLN_modulation.1.{kind}"] = swapped(context_mod) if last else context_mod
            out[f"{x}attn.qkv.{kind}"] = torch.cat([sd[f"{d}attn.to_{q}.{kind}"] for q in "qkv"])
            out[f"{c}attn.qkv.{kind}"] = torch.cat([sd[f"{d}attn.add_{q}_proj.{kind}"] for q in "qkv"])
            out[f"{x}attn.proj.{kind}"] = sd[f"{d}attn.to_out.0.{kind}"]
            out[f"{x}mlp.fc1.{kind}"] = sd[f"{d}ff.net.0.proj.{kind}"]
            out[f"{x}mlp.fc2.{kind}"] = sd[f"{d}ff.net.2.{kind}"]
            if not last:
                out[f"{c}attn.proj.{kind}"] = sd[f"{d}attn.to_add_out.{kind}"]
                out[f"{c}mlp.fc1.{kind}"] = sd[f"{d}ff_context.net.0.proj.{kind}"]
                out[f"{c}mlp.fc2.{kind}"] = sd[f"{d}ff_context.net.2.{kind}"]
            if f"{d}attn2.to_q.{kind}" in sd:
                out[f"{x}attn2.qkv.{kind}"] = torch.cat([sd[f"{d}attn2.to_{q}.{kind}"] for q in "qkv"])
                out[f"{x}attn2.proj.{kind}"] = sd[f"{d}attn2.to_out.0.{kind}"]
    for i in range(layers):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for attn in ("attn", "attn2"):
            for q in "qk":
                if f"{d}{attn}.norm_{q}.weight" in sd:
                    out[f"{x}{attn}.ln_{q}.weight"] = sd[f"{d}{attn}.norm_{q}.weight"]
        for q in "qk":
            if f"{d}attn.norm_added_{q}.weight" in sd:
                out[f"{c}attn.ln_{q}.weight"] = sd[f"{d}attn.norm_added_{q}.weight"]
    return out


def diffusers_conversion(checkpoint: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))


@pytest.mark.parametrize("name", CONFIGS)
def test_transformer_only_file_reads_as_diffusers_converts_it_and_writes_back(tmp_path, name):
    config = CONFIGS[name]
    reference = diffusers_mmdit(config).state_dict()
    original = original_from_diffusers(reference)
    converted = diffusers_conversion(original)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)  # the test's inverse is right

    path = tmp_path / "sd3.safetensors"
    save_safetensors({k: v.contiguous() for k, v in original.items()}, path)
    tensors = load_state_dict(path)
    assert sd3_original.is_sd3(tensors)
    assert sd3_original.config_of(tensors, path, head_dim=8, sample_size=16) == config
    mine = to_diffusers(sd3_original.from_original(tensors, config, path), config)
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in reference)
    back = sd3_original.to_original(from_diffusers(reference, config), config, prefix="")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)


def test_all_in_one_file_gives_every_component(tmp_path):
    from diffusers import AutoencoderKL

    from reference import _perturb
    from torchsd.checkpoints import bfl
    from torchsd.checkpoints.diffusers import from_diffusers_keys, vae_config_to_diffusers
    from torchsd.config import VAEConfig

    config = CONFIGS["sd35_medium"]
    reference = diffusers_mmdit(config).state_dict()
    vae_config = dataclasses.replace(VAEConfig.sd3(), base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                     norm_groups=8)
    torch.manual_seed(1)
    vae = AutoencoderKL(**{k: v for k, v in vae_config_to_diffusers(vae_config, 32).items()
                           if not k.startswith("_")})
    _perturb(vae, 1)
    vae_state = from_diffusers_keys(vae.state_dict(), "vae")
    text = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
            "text_encoders.clip_g.transformer.text_projection.weight": torch.ones(8, 8),
            "text_encoders.t5xxl.transformer.shared.weight": torch.ones(5, 8)}
    tensors = {**{"model.diffusion_model." + k: v for k, v in original_from_diffusers(reference).items()},
               **{"first_stage_model." + k: v for k, v in bfl.vae_to_original(vae_state, vae_config).items()},
               **text}
    path = tmp_path / "sd3.5_medium.safetensors"
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
    tensors = load_state_dict(path)
    assert sd3_original.variant(tensors) == "sd35_medium"
    parts = sd3_original.read_all_in_one(tensors, path, config, vae_config)
    mine = to_diffusers(parts["transformer"], config)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    assert parts["vae"].keys() == vae_state.keys()
    assert all(torch.equal(parts["vae"][k], v) for k, v in vae_state.items())
    assert set(parts["clip_l"]) == {"text_model.final_layer_norm.weight"}
    assert set(parts["clip_g"]) == {"text_projection.weight"} and set(parts["t5xxl"]) == {"shared.weight"}
    assert diffusers_conversion(tensors).keys() == reference.keys()  # diffusers reads the same file
    written = sd3_original.all_in_one_tensors(parts["transformer"], config, parts["vae"], vae_config,
                                              {n: parts[n] for n in sd3_original.TEXT_ENCODERS})
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], tensors[k]) for k in tensors)


def test_wrong_file_names_the_file_and_the_keys():
    original = original_from_diffusers(diffusers_mmdit(CONFIGS["sd35_large"]).state_dict())
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*missing.*attn2"):
        sd3_original.from_original(original, CONFIGS["sd35_medium"], "m.safetensors")
    with pytest.raises(CheckpointError, match="not an SD 3"):
        sd3_original.config_of({"x": torch.zeros(1)}, "x.safetensors")


@pytest.mark.parametrize("preset,variant", [("sd35_medium", "sd35_medium"), ("sd35_large", "sd35_large")])
def test_full_size_key_set_on_meta(preset, variant):
    from diffusers import SD3Transformer2DModel

    config = getattr(MMDiTConfig, preset)()
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**config_to_diffusers(config)).state_dict()
    original = original_from_diffusers(reference)
    assert sd3_original.layout(config).expected_shapes() == {k: tuple(v.shape) for k, v in original.items()}
    converted = diffusers_conversion(original)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.items()}
    assert sd3_original.variant(original) == variant and sd3_original.config_of(original) == config

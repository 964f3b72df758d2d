"""FLUX.1 files in Black Forest Labs' layout (flux1-dev/schnell.safetensors, ComfyUI's model.diffusion_model.
saves) and ae.safetensors: torchsd reads them to exactly what diffusers' own single-file conversion gives,
writes them back bit for bit, and tells dev from schnell from the tensors alone."""

import dataclasses
import inspect

import pytest
import torch

from test_flux import CONFIGS, TINY, diffusers_flux
from torchsd.checkpoints import bfl
from torchsd.checkpoints.flux import from_diffusers, to_diffusers
from torchsd.checkpoints.io import CheckpointError, load_state_dict, save_safetensors
from torchsd.config import FluxConfig


def bfl_from_diffusers(sd: dict) -> dict:
    """The test's own inverse of diffusers' conversion: FluxTransformer2DModel names -> BFL's layout."""
    out = {}
    pairs = [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
             ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
             ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")]
    for theirs, bfl_name in pairs:
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in sd:
                out[f"{bfl_name}.{kind}"] = sd[f"{theirs}.{kind}"]
    for kind in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{kind}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in doubles:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat([sd[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            for stream, ours in (("img", ""), ("txt", "_context")):
                out[f"{b}{stream}_mod.lin.{kind}"] = sd[f"{d}norm1{ours}.linear.{kind}"]
                out[f"{b}{stream}_mlp.0.{kind}"] = sd[f"{d}ff{ours}.net.0.proj.{kind}"]
                out[f"{b}{stream}_mlp.2.{kind}"] = sd[f"{d}ff{ours}.net.2.{kind}"]
            out[f"{b}img_attn.proj.{kind}"] = sd[f"{d}attn.to_out.0.{kind}"]
            out[f"{b}txt_attn.proj.{kind}"] = sd[f"{d}attn.to_add_out.{kind}"]
        out[f"{b}img_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_added_k.weight"]
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}linear1.{kind}"] = torch.cat([sd[f"{d}attn.to_{x}.{kind}"] for x in "qkv"]
                                                  + [sd[f"{d}proj_mlp.{kind}"]])
            out[f"{b}linear2.{kind}"] = sd[f"{d}proj_out.{kind}"]
            out[f"{b}modulation.lin.{kind}"] = sd[f"{d}norm.linear.{kind}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


def diffusers_conversion(width: int):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers; its single-block split hard-codes the
    full model's 3072 width, so for tiny weights the same source runs with the tiny width."""
    from diffusers.loaders import single_file_utils as suf

    function = suf.convert_flux_transformer_checkpoint_to_diffusers
    if width == 3072:
        return function
    source = inspect.getsource(function)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(suf))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return namespace[function.__name__]


# FLUX.1 Fill: dev with the masked image's latents and the mask (a 2x VAE's: 4 channels) in its input tokens
FILES = {**CONFIGS, "fill": dataclasses.replace(TINY, condition_channels=TINY.latent_channels + 4)}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_file_reads_as_diffusers_converts_it_and_writes_back(tmp_path, name, prefix):
    config = FILES[name]
    reference = diffusers_flux(config).state_dict()
    original = bfl_from_diffusers(reference)
    converted = diffusers_conversion(config.width)({prefix + k: v.clone() for k, v in original.items()})
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)  # the test's inverse is right

    path = tmp_path / "flux1.safetensors"
    save_safetensors({prefix + k: v.contiguous() for k, v in original.items()}, path)
    tensors = load_state_dict(path)
    assert bfl.is_flux(tensors) and bfl.variant(tensors) == ("schnell" if name == "schnell" else "dev")
    assert bfl.config_of(tensors, path, axes_dims_rope=config.axes_dims_rope) == config
    ours = bfl.from_bfl(tensors, config, source=path)
    mine = to_diffusers(ours, config)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    back = bfl.to_bfl(from_diffusers(reference, config), config, prefix=prefix)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)


def test_loaded_model_runs_like_diffusers_model():
    from test_flux import run_diffusers

    reference = diffusers_flux(TINY)
    model = __import__("torchsd.models.flux", fromlist=["Flux"]).Flux(TINY).eval()
    model.load_state_dict(bfl.from_bfl(bfl_from_diffusers(reference.state_dict()), TINY), strict=True)
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 3, 24, generator=gen), \
        torch.randn(1, 12, generator=gen)
    t, guidance = torch.tensor([500.0]), torch.tensor([3.5])
    with torch.no_grad():
        from torchsd.models.flux import pack
        torch.testing.assert_close(pack(model(x, t, context, pooled, guidance=guidance), 2),
                                   run_diffusers(reference, x, t, context, pooled, guidance), atol=1e-5, rtol=1e-4)


def test_wrong_file_names_the_file_and_the_keys():
    original = bfl_from_diffusers(diffusers_flux(TINY).state_dict())
    del original["double_blocks.1.img_attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"my\.safetensors.*missing.*double_blocks\.1\.img_attn\.qkv\.weight"):
        bfl.from_bfl(original, TINY, source="my.safetensors")
    original = bfl_from_diffusers(diffusers_flux(TINY).state_dict())
    original["single_blocks.0.linear1.weight"] = original["single_blocks.0.linear1.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"linear1\.weight has shape"):
        bfl.from_bfl(original, TINY)
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        bfl.config_of(original)
    with pytest.raises(CheckpointError, match="not a FLUX.1"):
        bfl.config_of({"foo": torch.zeros(1)}, "x.safetensors")


@pytest.mark.parametrize("preset", ["flux_dev", "flux_schnell"])
def test_full_size_key_set_on_meta(preset):
    """FLUX.1 dev/schnell at full size: the BFL keys and shapes torchsd expects are those of diffusers' model
    mapped back to BFL's layout, and diffusers' own conversion of them gives its model's keys and shapes."""
    from diffusers import FluxTransformer2DModel

    from torchsd.checkpoints.flux import config_to_diffusers

    config = getattr(FluxConfig, preset)()
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**config_to_diffusers(config)).state_dict()
    original = bfl_from_diffusers(reference)
    assert bfl.layout(config).expected_shapes() == {k: tuple(v.shape) for k, v in original.items()}
    converted = diffusers_conversion(3072)(dict(original))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.items()}
    assert bfl.variant(original) == preset.removeprefix("flux_") and bfl.config_of(original) == config


def test_ae_safetensors_reads_as_diffusers_converts_it():
    from diffusers import AutoencoderKL as Reference
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from reference import _perturb
    from torchsd.checkpoints.diffusers import from_diffusers_keys, vae_config_to_diffusers
    from torchsd.config import VAEConfig
    from torchsd.models.vae import AutoencoderKL

    config = dataclasses.replace(VAEConfig.flux(), base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                 norm_groups=8)
    cfg = {k: v for k, v in vae_config_to_diffusers(config, 32).items() if not k.startswith("_")}
    torch.manual_seed(0)
    reference = Reference(**cfg)
    _perturb(reference, 0)
    original = bfl.vae_to_original(from_diffusers_keys(reference.state_dict(), "vae"), config)
    assert not any("quant_conv" in k for k in original) and "decoder.mid.attn_1.q.weight" in original
    theirs = convert_ldm_vae_checkpoint(dict(original), dict(reference.config))
    assert theirs.keys() == reference.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in reference.state_dict().items())
    ours = AutoencoderKL(config)
    ours.load_state_dict(bfl.vae_from_original(original, config), strict=True)
    assert all(torch.equal(ours.state_dict()[k], v)
               for k, v in from_diffusers_keys(reference.state_dict(), "vae").items())
    with pytest.raises(CheckpointError, match="latent channels"):
        bfl.vae_from_original(original, VAEConfig())


def test_fill_is_read_from_its_input_width_and_depth_is_refused_by_name():
    original = bfl_from_diffusers(diffusers_flux(TINY).state_dict())
    original["img_in.weight"] = torch.zeros(32, 16 + 80)  # FLUX.1 Fill: latents + masked image + mask
    fill = bfl.config_of(original, "flux1-fill-dev.safetensors", axes_dims_rope=TINY.axes_dims_rope)
    assert (fill.latent_channels, fill.condition_channels) == (4, 20)  # 80 features / 4 per patch: 4 latent + 16
    original["img_in.weight"] = torch.zeros(32, 16 + 16)  # FLUX.1 Depth / Canny: latents + a control's latents
    with pytest.raises(CheckpointError, match="Depth or Canny"):
        bfl.config_of(original, "flux1-depth-dev.safetensors", axes_dims_rope=TINY.axes_dims_rope)

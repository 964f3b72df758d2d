"""LoRAs on FLUX.1 and SD 3.5 transformers: diffusers/PEFT files (written by diffusers' save_lora_weights) and
kohya files (converted by diffusers' own kohya converter) give torchsd the outputs diffusers gives with the
adapter loaded; BFL-layout LoRAs merge into the fused tensors as hand-computed; on quantized weights the
LoRA runs as a side path with the same result as merging into the dequantized weights."""

import inspect

import pytest
import torch

from test_flux import TINY, diffusers_flux, run_diffusers
from test_mmdit import CONFIGS as MMDIT_CONFIGS
from test_mmdit import diffusers_mmdit
from torchsd.checkpoints import bfl, flux, mmdit
from torchsd.checkpoints.flow_lora import apply_lora, load_lora, loras_applied, read_lora
from torchsd.checkpoints.io import CheckpointError, save_safetensors
from torchsd.checkpoints.quantized import load_flux
from torchsd.models.flux import Flux, pack
from torchsd.models.mmdit import MMDiT
from torchsd.models.quantized import QuantizedLinear

pytest.importorskip("peft")
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.0.proj", "ff_context.net.2", "norm1.linear", "norm.linear",
                "x_embedder", "norm_out.linear"]


def inputs(config, latent_channels, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, latent_channels, 4, 6, generator=gen), torch.tensor([600.0]),
            torch.randn(1, 3, config.context_dim, generator=gen), torch.randn(1, config.pooled_dim, generator=gen))


def add_random_lora(model, targets, rank=4, alpha=8.0):
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # lora_B is not zero either
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.1)
    return config


def peft_state(model):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def test_diffusers_flux_lora_file_gives_diffusers_outputs(tmp_path):
    from diffusers import FluxPipeline

    reference = diffusers_flux(TINY)
    ours = Flux(TINY).eval()
    ours.load_state_dict(flux.from_diffusers(reference.state_dict(), TINY))
    config = add_random_lora(reference, FLUX_TARGETS)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=peft_state(reference),
                                   transformer_lora_adapter_metadata=config.to_dict())
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", "flux", TINY)
    assert len(lora.updates) > 30 and not lora.text_encoder_keys
    apply_lora(ours, lora)
    x, t, context, pooled = inputs(TINY, 4)
    guidance = torch.tensor([3.5])
    with torch.no_grad():
        torch.testing.assert_close(pack(ours(x, t, context, pooled, guidance=guidance), 2),
                                   run_diffusers(reference, x, t, context, pooled, guidance), atol=2e-5, rtol=1e-4)


def kohya_flux_lora(config, rank=4) -> dict:
    """A kohya (sd-scripts) FLUX.1 LoRA on BFL modules, alpha != rank, incl. fused qkv and linear1."""
    gen = torch.Generator().manual_seed(5)
    shapes = bfl.layout(config).expected_shapes()
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_attn.proj",
               "double_blocks.1.img_mlp.0", "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1",
               "single_blocks.1.linear2", "single_blocks.1.modulation.lin"]
    state = {}
    for module in modules:
        out, inp = shapes[module + ".weight"]
        name = "lora_unet_" + module.replace(".", "_")
        state[name + ".lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.2
        state[name + ".lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.2
        state[name + ".alpha"] = torch.tensor(2.0)
    return state


def diffusers_kohya_conversion(width, mlp):
    """diffusers' _convert_kohya_flux_lora_to_diffusers, with its full-size linear1 split set to the tiny one."""
    from diffusers.loaders import lora_conversion_utils as lcu

    function = lcu._convert_kohya_flux_lora_to_diffusers
    source = inspect.getsource(function)
    assert "dims=[3072, 3072, 3072, 12288]" in source
    namespace = dict(vars(lcu))
    exec(source.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{width}, {width}, {width}, {mlp}]"), namespace)
    return namespace[function.__name__]


def test_kohya_flux_lora_gives_diffusers_outputs():
    reference = diffusers_flux(TINY)
    ours = Flux(TINY).eval()
    ours.load_state_dict(flux.from_diffusers(reference.state_dict(), TINY))
    kohya = kohya_flux_lora(TINY)
    converted = diffusers_kohya_conversion(TINY.width, TINY.mlp_dim)({k: v.clone() for k, v in kohya.items()})
    reference.load_lora_adapter(converted, prefix="transformer")
    x, t, context, pooled = inputs(TINY, 4)
    guidance = torch.tensor([2.0])
    with torch.no_grad():
        without = ours(x, t, context, pooled, guidance=guidance)
    apply_lora(ours, read_lora(kohya, "flux", TINY, "kohya.safetensors"))
    with torch.no_grad():
        assert (ours(x, t, context, pooled, guidance=guidance) - without).abs().max() > 0.05  # the LoRA matters
        torch.testing.assert_close(pack(ours(x, t, context, pooled, guidance=guidance), 2),
                                   run_diffusers(reference, x, t, context, pooled, guidance), atol=2e-5, rtol=1e-4)


def test_bfl_layout_lora_merges_into_the_fused_tensors_as_hand_computed():
    torch.manual_seed(0)
    model = Flux(TINY).eval()
    before = bfl.to_bfl(model.state_dict(), TINY)
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for module, out, inp in [("double_blocks.0.img_attn.qkv", 96, 32), ("single_blocks.1.linear1", 224, 32),
                             ("final_layer.adaLN_modulation.1", 64, 32)]:
        lora[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    apply_lora(model, read_lora(lora, "flux", TINY), strength=0.5)
    after = bfl.to_bfl(model.state_dict(), TINY)
    for module in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"):
        expected = before[module + ".weight"] + 0.5 * lora[f"diffusion_model.{module}.lora_B.weight"] \
            @ lora[f"diffusion_model.{module}.lora_A.weight"]  # alpha = rank: scale 1
        torch.testing.assert_close(after[module + ".weight"], expected, atol=1e-5, rtol=1e-5)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{m}.weight" for m in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                                               "final_layer.adaLN_modulation.1")}


def test_lora_on_quantized_weights_is_a_side_path_equal_to_merging(tmp_path):
    torch.manual_seed(0)
    original = bfl.to_bfl(Flux(TINY).state_dict(), TINY)
    path = tmp_path / "fp8.safetensors"
    save_safetensors({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in original.items()}, path)
    quantized = load_flux(path, TINY, dtype=torch.float32)
    dense = Flux(TINY).eval()
    dense.load_state_dict(bfl.from_bfl({k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v
                                        for k, v in original.items()}, TINY))
    lora = read_lora(kohya_flux_lora(TINY), "flux", TINY)
    apply_lora(quantized, lora, strength=0.8)
    apply_lora(dense, lora, strength=0.8)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.quantized_weight().data.dtype == torch.float8_e4m3fn for m in layers)
    assert sum(len(m.loras) for m in layers) > 8
    x, t, context, pooled = inputs(TINY, 4)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x, t, context, pooled, guidance=3.0), dense(x, t, context, pooled,
                                                                                         guidance=3.0),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_diffusers_sd3_lora_file_gives_diffusers_outputs(tmp_path, name):
    from diffusers import StableDiffusion3Pipeline

    config = MMDIT_CONFIGS[name]
    reference = diffusers_mmdit(config)
    ours = MMDiT(config).eval()
    ours.load_state_dict(mmdit.from_diffusers(reference.state_dict(), config))
    lora_config = add_random_lora(reference, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out",
                                              "ff.net.2", "norm1_context.linear", "proj_out"])
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=peft_state(reference),
                                               transformer_lora_adapter_metadata=lora_config.to_dict())
    apply_lora(ours, load_lora(tmp_path / "pytorch_lora_weights.safetensors", "sd3", config))
    x, t, context, pooled = inputs(config, 4)
    with torch.no_grad():
        theirs = reference(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        torch.testing.assert_close(ours(x, t, context, pooled), theirs, atol=2e-5, rtol=1e-4)


def test_kohya_sd3_lora_on_the_last_block_swaps_shift_and_scale():
    config = MMDIT_CONFIGS["sd35_large"]
    torch.manual_seed(0)
    model = MMDiT(config).eval()
    module = f"joint_blocks.{config.num_layers - 1}.context_block.adaLN_modulation.1"
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, config.width, generator=gen), torch.randn(2 * config.width, 2, generator=gen)
    before = model.blocks[-1].text.modulation.weight.clone()
    key = "lora_unet_" + module.replace(".", "_")
    apply_lora(model, read_lora({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                 f"{key}.alpha": torch.tensor(1.0)}, "sd3", config))
    shift, scale = (up @ down * 0.5).chunk(2)  # the file's rows are (shift, scale); torchsd's (scale, shift)
    torch.testing.assert_close(model.blocks[-1].text.modulation.weight, before + torch.cat([scale, shift]))


def test_bad_loras_name_the_problem():
    with pytest.raises(CheckpointError, match=r"x\.safetensors: LoRA layers \['lora_unet_double_blocks_9"):
        read_lora({"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
                   "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)}, "flux", TINY,
                  "x.safetensors")
    with pytest.raises(CheckpointError, match=r"is \(95, 2\) @ \(2, 32\); the layer is \(96, 32\)"):
        read_lora({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(95, 2)}, "flux", TINY)
    with pytest.raises(CheckpointError, match="LoKr"):
        read_lora({"lora_unet_x.lokr_w1": torch.zeros(1)}, "flux", TINY)
    lora = read_lora({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)},
                     "flux", TINY)
    assert lora.updates == () and lora.text_encoder_keys == ("lora_te1_text_model_encoder_layers_0_mlp_fc1"
                                                             ".lora_down.weight",)


def test_bare_diffusers_and_onetrainer_names_reach_the_same_layer():
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    for key in ("transformer.transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_k"):
        (update,) = read_lora({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, "flux", TINY).updates
        assert update.module == "double_blocks.1.image.attn.k" and update.scale == 1.0
    key = "lora_transformer_transformer_blocks_1_attn_to_k"
    (update,) = read_lora({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                           f"{key}.alpha": torch.tensor(1.0)}, "flux", TINY).updates
    assert update.module == "double_blocks.1.image.attn.k" and update.scale == 0.5


def test_loras_applied_restores_the_weights_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    original = bfl.to_bfl(Flux(TINY).state_dict(), TINY)
    save_safetensors({k: v.to(torch.float8_e5m2) if k.startswith("single_blocks") and v.ndim == 2 else v
                      for k, v in original.items()}, tmp_path / "mixed.safetensors")
    model = load_flux(tmp_path / "mixed.safetensors", TINY, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_lora(kohya_flux_lora(TINY), "flux", TINY)
    x, t, context, pooled = inputs(TINY, 4)
    with torch.no_grad():
        plain = model(x, t, context, pooled, guidance=3.0)
        with loras_applied(model, [(lora, 1.0), (lora, -0.5)]):
            assert not torch.allclose(model(x, t, context, pooled, guidance=3.0), plain)
            assert any(m.loras for m in model.modules() if isinstance(m, QuantizedLinear))
        assert torch.equal(model(x, t, context, pooled, guidance=3.0), plain)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.loras for m in model.modules() if isinstance(m, QuantizedLinear))

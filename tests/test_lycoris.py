"""LyCORIS LoHa and LoKr, and DoRA, in the kohya/LyCORIS file layout: PEFT's adapters (the reference) on diffusers'
U-Net give the same output as torchsd's U-Net with the file merged. The files are written from PEFT's own
parameters by an independent writer below (diffusers module path with "_" -> ``lora_unet_<path>.<part>``)."""

import pytest
import torch
from safetensors.torch import save_file

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.lora import AppliedLora, load_lora, merged_loras

peft = pytest.importorskip("peft")
TOL = 1e-4
# attention projections (Linear), resnet convolutions (3x3) and the transformer's 1x1/linear proj_in
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1", seed=7)


def adapted(sd, config):
    """diffusers' U-Net with the same weights as ``sd``'s and a random PEFT adapter injected."""
    torch.manual_seed(3)
    unet = peft.inject_adapter_in_model(config, diffusers_unet(sd))
    with torch.no_grad():  # DoRA starts with magnitudes = the weights' norms: move them so that they matter
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))
    return unet.eval()


def kohya_file(unet, tmp_path, part_names):
    """The adapter's tensors under kohya names; ``part_names`` maps a PEFT attribute to the file's part name.
    Returns the path and how many layers were written."""
    state, layers = {}, 0
    for name, module in unet.named_modules():
        if not hasattr(module, "scaling") or "default" not in module.scaling:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        for attribute, part in part_names.items():
            store = getattr(module, attribute, {})
            if "default" in store:
                tensor = store["default"]
                tensor = tensor.weight if isinstance(tensor, torch.nn.Module) else tensor
                state[f"{key}.{part}"] = tensor.detach().clone().contiguous()
        state.update(extra_parts(module, key, state))
        layers += 1
    path = tmp_path / "adapter.safetensors"
    save_file(state, str(path))
    return path, layers


def extra_parts(module, key, state):
    """alpha, as LyCORIS writes it: scale = alpha / rank. A LoKr with both factors whole has no rank in the file
    (LyCORIS then uses scale 1), so PEFT's scale is folded into w1."""
    if f"{key}.lokr_w1" in state and f"{key}.lokr_w2" in state:
        state[f"{key}.lokr_w1"] = state[f"{key}.lokr_w1"] * module.scaling["default"]
        return {}
    extra = {f"{key}.alpha": torch.tensor(float(module.alpha["default"] if hasattr(module, "alpha")
                                                 else module.lora_alpha["default"]))}
    if f"{key}.dora_scale" in state:  # PEFT keeps one magnitude per output channel: (out,) -> (out, 1[, 1, 1])
        weight = module.get_base_layer().weight
        extra[f"{key}.dora_scale"] = state[f"{key}.dora_scale"].reshape(-1, *[1] * (weight.ndim - 1))
    return extra


def compare(sd, unet, path, layers):
    lora = load_lora(path, sd)
    assert len(lora.layers) == layers > 20
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([999, 17])
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=context).sample
        plain = sd.unet(x, t, context)
        with merged_loras(sd, [AppliedLora(lora, 1.0, 1.0)]):
            ours = sd.unet(x, t, context)
    assert max_rel_error(plain, theirs) > 100 * TOL  # the adapter changes the output
    assert max_rel_error(ours, theirs) < TOL
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())  # restored exactly


LOHA_PARTS = {f"hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
LOKR_PARTS = {f"lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}


@pytest.mark.parametrize("effective_conv2d", [False, True], ids=["flat", "tucker"])
def test_loha_matches_peft(sd, tmp_path, effective_conv2d):
    config = peft.LoHaConfig(r=4, alpha=3, target_modules=TARGETS, init_weights=False,
                             use_effective_conv2d=effective_conv2d)
    unet = adapted(sd, config)
    path, layers = kohya_file(unet, tmp_path, LOHA_PARTS)
    if effective_conv2d:
        assert any(layer.update.t1 is not None for layer in load_lora(path, sd).layers)  # Tucker cores exercised
    compare(sd, unet, path, layers)


@pytest.mark.parametrize("options", [dict(r=2, decompose_both=True), dict(r=2, decompose_both=False),
                                     dict(r=64), dict(r=2, use_effective_conv2d=True)],
                         ids=["both-low-rank", "w1-whole", "both-whole", "tucker"])
def test_lokr_matches_peft(sd, tmp_path, options):
    config = peft.LoKrConfig(alpha=3, target_modules=TARGETS, init_weights=False, **options)
    unet = adapted(sd, config)
    path, layers = kohya_file(unet, tmp_path, LOKR_PARTS)
    compare(sd, unet, path, layers)


def test_dora_matches_peft(sd, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    unet = adapted(sd, config)
    parts = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
    path, layers = kohya_file(unet, tmp_path, parts)
    compare(sd, unet, path, layers)


def test_dora_in_the_peft_layout_matches_peft(sd, tmp_path):
    """As diffusers' save_lora_weights writes it: PEFT's own state dict (…lora_magnitude_vector) under "unet."."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    unet = adapted(sd, config)
    state = {f"unet.{k}": v.contiguous() for k, v in peft.get_peft_model_state_dict(unet).items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in state)
    save_file(state, str(tmp_path / "dora.safetensors"))
    layers = sum(1 for k in state if k.endswith(".lora_A.weight"))
    compare(sd, unet, tmp_path / "dora.safetensors", layers)


def test_loha_through_a_prompt_tag_changes_the_image_and_restores_weights(sd, tmp_path):
    unet = adapted(sd, peft.LoHaConfig(r=4, alpha=4, target_modules=TARGETS, init_weights=False))
    path, _ = kohya_file(unet, tmp_path, LOHA_PARTS)
    sd.loras.add_dir(tmp_path)
    options = dict(steps=2, width=32, height=32, seed=1)
    plain = sd.generate("a cat", **options)
    with_loha = sd.generate("a cat <lora:adapter:0.7>", **options)
    assert not torch.equal(plain.latents, with_loha.latents)
    assert "adapter" in with_loha.infotexts[0]
    assert torch.equal(sd.generate("a cat", **options).latents, plain.latents)


@pytest.mark.parametrize("state, message", [
    ({"lora_unet_x.lokr_w2": torch.zeros(2, 2)}, "needs lokr_w1 or lokr_w1_a"),
    ({"lora_unet_x.oft_blocks": torch.zeros(2, 2)}, "OFT, BOFT, GLoRA"),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa layer lora_unet_x lacks hada_w1_b"),
])
def test_unknown_or_incomplete_lycoris_layers_are_refused(sd, tmp_path, state, message):
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_lora(tmp_path / "odd.safetensors", sd)


def test_factors_that_do_not_fit_the_layer_name_the_shapes(sd, tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{key}.hada_{p}": torch.ones(*shape) for p, shape in
             (("w1_a", (5, 2)), ("w1_b", (2, 7)), ("w2_a", (5, 2)), ("w2_b", (2, 7)))}
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"Hadamard layer .*w1_a \(5, 2\).*another model family"):
        load_lora(tmp_path / "wrong.safetensors", sd)

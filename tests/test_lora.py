"""LoRA: kohya and PEFT files give diffusers' latents (load_lora_weights, not fused); the model's weights are
bit-identical after a run; names resolve from LoRA folders; foreign files are refused."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from reference import max_rel_error, random_pipeline
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.lora import lora_shorthash

TOL = 1e-4
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1", seed=4)


@pytest.fixture(scope="module")
def diffusers_pipe(sd, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("model")
    sd.save(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_layers(pipe):
    """(component, diffusers/transformers module name, module) of every Linear and Conv2d, read from the
    reference models themselves (so the names do not come from the code under test)."""
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and "lora_" not in name:
                yield component, name.removesuffix(".base_layer"), module  # in case a LoRA is still loaded


def random_down_up(module, rank, gen):
    if isinstance(module, nn.Linear):
        return (torch.randn(rank, module.in_features, generator=gen) * 0.1,
                torch.randn(module.out_features, rank, generator=gen) * 0.1)
    return (torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) * 0.1,
            torch.randn(module.out_channels, rank, 1, 1, generator=gen) * 0.1)


def kohya_lora(pipe, rank=4, seed=0):
    gen, state = torch.Generator().manual_seed(seed), {}
    for component, name, module in lora_layers(pipe):
        if component == "text_encoder" and not name.startswith("text_model."):
            name = "text_model." + name  # kohya names keep transformers' old nesting
        key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
        down, up = random_down_up(module, rank, gen)
        state[key + ".lora_down.weight"], state[key + ".lora_up.weight"] = down, up
        if len(state) % 3:  # most layers with an alpha, some without (alpha = rank)
            state[key + ".alpha"] = torch.tensor(float(rank) / 2)
    return state


def peft_lora(pipe, rank=4, seed=1):
    gen, state = torch.Generator().manual_seed(seed), {}
    for component, name, module in lora_layers(pipe):
        down, up = random_down_up(module, rank, gen)
        state[f"{component}.{name}.lora_A.weight"], state[f"{component}.{name}.lora_B.weight"] = down, up
    return state


def weights_of(sd):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(sd, c).state_dict().items()}


def assert_weights_equal(sd, before):
    after = weights_of(sd)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def diffusers_latents(pipe, noise):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, latents=noise.clone(),
                height=16, width=16, output_type="latent").images


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def run_parity(sd, pipe, tmp_path, state, noise, metadata=None):
    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "style.safetensors"
    save_file(state, str(path), metadata=metadata)
    sd.loras.dirs[:] = [tmp_path / "loras"]
    before = weights_of(sd)
    try:
        pipe.load_lora_weights(str(path), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.8])
        theirs = diffusers_latents(pipe, noise)
        pipe.set_adapters(["style"], adapter_weights=[0.0])
        theirs_without = diffusers_latents(pipe, noise)
    finally:
        pipe.unload_lora_weights()
    options = dict(steps=3, guidance_scale=7.5, latents=noise.clone(), width=16, height=16)
    ours = sd.generate(f"{PROMPT} <lora:style:0.8>", NEGATIVE, **options)
    assert_weights_equal(sd, before)
    ours_without = sd.generate(PROMPT, NEGATIVE, **options).latents
    assert max_rel_error(ours_without, theirs_without) < TOL
    assert max_rel_error(ours.latents, theirs) < TOL
    assert max_rel_error(ours.latents, ours_without) > 100 * TOL  # the LoRA did change the picture
    return ours


def test_kohya_lora_matches_diffusers(sd, diffusers_pipe, tmp_path, noise):
    state = kohya_lora(diffusers_pipe)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in state.values())  # conv LoRA on 3x3 convs
    result = run_parity(sd, diffusers_pipe, tmp_path, state, noise)
    data = (tmp_path / "loras" / "style.safetensors").read_bytes()
    addnet = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    assert f'Lora hashes: "style: {addnet}"' in result.infotexts[0]


def test_peft_lora_matches_diffusers(sd, diffusers_pipe, tmp_path, noise):
    run_parity(sd, diffusers_pipe, tmp_path, peft_lora(diffusers_pipe), noise)


def test_peft_lora_alpha_from_diffusers_metadata_matches_diffusers(sd, diffusers_pipe, tmp_path, noise):
    state = peft_lora(diffusers_pipe, seed=2)
    config = {}
    for component in ("unet", "text_encoder"):
        targets = sorted({k.split(".lora_A.")[0][len(component) + 1:] for k in state if k.startswith(component)})
        config.update({f"{component}.r": 4, f"{component}.lora_alpha": 2 if component == "unet" else 8,
                       f"{component}.target_modules": targets})
    run_parity(sd, diffusers_pipe, tmp_path, state, noise,
               metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


@pytest.fixture()
def lora_dir(sd, diffusers_pipe, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(kohya_lora(diffusers_pipe, seed=3), str(folder / "style.safetensors"))
    sd.loras.dirs[:] = [folder]
    yield folder
    sd.loras.dirs[:] = []


OPTIONS = dict(steps=2, width=16, height=16, seed=2)


def test_api_loras_equal_prompt_tags_and_are_written_as_tags(sd, lora_dir):
    by_tag = sd.generate("a cat <lora:style:0.6>", **OPTIONS)
    by_api = sd.generate("a cat", loras=[(lora_dir / "style.safetensors", 0.6)], **OPTIONS)
    by_name = sd.generate("a cat", loras=[("style", 0.6)], **OPTIONS)
    assert torch.equal(by_tag.latents, by_api.latents) and torch.equal(by_tag.latents, by_name.latents)
    assert by_api.infotexts[0].startswith("a cat <lora:style:0.6>\n")


def test_zero_scale_is_no_lora_and_scales_split_by_component(sd, lora_dir):
    plain = sd.generate("a cat", **OPTIONS).latents
    assert torch.equal(sd.generate("a cat <lora:style:0>", **OPTIONS).latents, plain)
    unet_only = sd.generate("a cat <lora:style:0:1>", **OPTIONS).latents
    both = sd.generate("a cat <lora:style:1>", **OPTIONS).latents
    assert not torch.equal(unet_only, plain) and not torch.equal(unet_only, both)
    assert torch.equal(sd.encode_prompt(["a cat"]), sd.encode_prompt(["a cat"]))


def test_weights_are_restored_when_a_run_fails(sd, lora_dir):
    before = weights_of(sd)

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sd.generate("a cat <lora:style:1>", callback=stop, **OPTIONS)
    assert_weights_equal(sd, before)


def test_unknown_lora_names_list_the_available_ones(sd, lora_dir):
    with pytest.raises(ValueError, match=r"unknown LoRA 'nope'; available in .*: style"):
        sd.generate("a cat <lora:nope:1>", **OPTIONS)
    sd.loras.dirs[:] = []
    with pytest.raises(ValueError, match="no LoRA folder is set"):
        sd.generate("a cat <lora:style:1>", **OPTIONS)


def test_lora_for_another_model_family_is_refused(sd, tmp_path):
    sd2 = random_pipeline("sd2")
    state = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4)}
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit the weight"):
        sd2.generate("a cat", loras=[(tmp_path / "narrow.safetensors", 1.0)], **OPTIONS)
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_foo_bar.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="none of its 1 LoRA layers belong to this model"):
        sd.generate("a cat", loras=[(tmp_path / "xl.safetensors", 1.0)], **OPTIONS)


@pytest.mark.parametrize("key, kind", [("lora_unet_x.oft_blocks", "OFT"), ("lora_unet_x.lora_mid.weight", "Tucker"),
                                       ("lora_unet_x.hada_w1_a", "LoHa layer lora_unet_x lacks hada_w1_b"),
                                       ("model.weight", "not a LoRA file")])
def test_other_adapter_files_are_refused(sd, tmp_path, key, kind):
    save_file({key: torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=kind):
        sd.generate("a cat", loras=[(tmp_path / "other.safetensors", 1.0)], **OPTIONS)


def test_bad_lora_arguments_are_refused():
    from torchsd.pipeline import GenerationRequest

    with pytest.raises(ValueError, match=r"loras must be \(name or path, scale\) pairs"):
        GenerationRequest(prompt="x", loras=[("style",)])
    with pytest.raises(ValueError, match="loras must be"):
        GenerationRequest(prompt="x", loras=[("style", float("nan"))])


def test_shorthash_of_other_files_is_the_file_sha256(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"not really a pickle")
    assert lora_shorthash(path) == hashlib.sha256(b"not really a pickle").hexdigest()[:12]


def test_load_pipeline_takes_lora_and_embedding_folders(sd, lora_dir, tmp_path):
    from torchsd import load_pipeline

    sd.save(tmp_path / "model")
    (tmp_path / "embeddings").mkdir()
    loaded = load_pipeline(tmp_path / "model", lora_dirs=[lora_dir], embedding_dirs=[tmp_path / "embeddings"],
                           dtype=torch.float32)
    assert list(loaded.loras.files()) == ["style"] and loaded.embeddings.dirs == [tmp_path / "embeddings"]
    with pytest.raises(ValueError, match="LoRA folder '/no/such' does not exist"):
        load_pipeline(tmp_path / "model", lora_dirs=["/no/such"], dtype=torch.float32)


@pytest.mark.parametrize("text, expected", [("style", ("style", 1.0)), ("style:0.5", ("style", 0.5)),
                                            ("/loras/a.safetensors:-0.7", ("/loras/a.safetensors", -0.7)),
                                            (r"C:\loras\a.safetensors", (r"C:\loras\a.safetensors", 1.0))])
def test_lora_flag_reads_an_optional_scale(text, expected):
    from torchsd.pipeline.features.lora import parse_lora

    assert parse_lora(text) == expected

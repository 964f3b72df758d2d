"""LoRAs on whole SD 3 and FLUX.1 runs, text encoders included: a file written by diffusers' own
save_lora_weights (transformer + CLIP-L, and SD 3's bigG) changes torchsd's run exactly as it changes
diffusers' pipeline with load_lora_weights; kohya's text-encoder names (lora_te1_/lora_te2_, and lora_te3_ for
T5, checked against PEFT on transformers' T5) reach the same layers; the CLI's --lora and <lora:…> tags."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import flow_reference as ref
import torchsd
from reference import max_rel_error

pytest.importorskip("peft")
PROMPT = "an astronaut riding a horse"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("flow_lora")


@pytest.fixture(scope="module")
def folders(work):
    return {"dev": ref.saved(ref.flux_pipeline(work), work / "dev"),
            "sd3": ref.saved(ref.sd3_pipeline(work), work / "sd3")}


@pytest.fixture(scope="module")
def lora_files(work):
    """name -> the LoRA file diffusers wrote for the tiny model of that name (the same weights as ``folders``)."""
    return {"dev": ref.save_lora(ref.flux_pipeline(work), work / "lora_dev"),
            "sd3": ref.save_lora(ref.sd3_pipeline(work), work / "lora_sd3", seed=3)}


def ours(folder):
    return torchsd.load_pipeline(folder, "cpu", torch.float32)


def run_diffusers(name, folder, lora):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if name == "dev" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    kw = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=3,
              generator=[torch.Generator().manual_seed(3)], output_type="latent")
    kw.update(guidance_scale=2.5) if name == "dev" else kw.update(negative_prompt="zebra", guidance_scale=4.5)
    with torch.no_grad():
        latents = pipe(**kw).images
    return FluxPipeline._unpack_latents(latents, 32, 32, 2) if name == "dev" else latents


def run_ours(pipe, name, prompt=PROMPT, **options):
    guidance = dict(distilled_cfg_scale=2.5) if name == "dev" else dict(negative_prompt="zebra", guidance_scale=4.5)
    return pipe.generate(prompt, width=32, height=32, steps=3, seed=3, **guidance, **options)


@pytest.mark.parametrize("name", ["dev", "sd3"])
def test_diffusers_lora_file_with_text_encoder_parts_gives_diffusers_run(folders, lora_files, name):
    from safetensors import safe_open

    with safe_open(lora_files[name], "pt") as f:
        text_keys = [k for k in f.keys() if k.startswith("text_encoder")]
    assert text_keys and (name == "dev" or any(k.startswith("text_encoder_2.") for k in text_keys))
    theirs = run_diffusers(name, folders[name], lora_files[name])
    pipe = ours(folders[name])
    plain = run_ours(pipe, name)
    result = run_ours(pipe, name, loras=[(lora_files[name], 1.0)])
    assert max_rel_error(result.latents, theirs) < 1e-4
    assert max_rel_error(result.latents, plain.latents) > 0.05  # the LoRA matters
    pipe.loras.add_dir(lora_files[name].parent)
    # A1111's tag <lora:name:te:unet>; the prompt the encoders read keeps the space before the tag (the tiny T5
    # tokenizer, unlike T5's own, does not drop it)
    tagged = run_ours(pipe, name, f"{PROMPT} <lora:pytorch_lora_weights:1>")
    assert torch.equal(tagged.latents, run_ours(pipe, name, PROMPT + " ", loras=[(lora_files[name], 1.0)]).latents)
    without_text = run_ours(pipe, name, f"{PROMPT} <lora:pytorch_lora_weights:0:1>")
    assert max_rel_error(without_text.latents, tagged.latents) > 0.01  # the text encoders' part is applied
    assert torch.equal(run_ours(pipe, name).latents, plain.latents)  # the weights are restored after each run


def kohya_text_lora(peft_state: dict, encoder_prefixes: dict) -> dict:
    """diffusers' text_encoder.<module>.lora_A/B keys renamed as sd-scripts writes them: lora_te1_text_model_
    <module with _>.lora_down/lora_up, with an alpha (8, the adapter's lora_alpha)."""
    state = {}
    for key, value in peft_state.items():
        component, _, rest = key.partition(".")
        if component not in encoder_prefixes:
            continue
        module, _, part = rest.rpartition(".lora_")
        module = module if module.startswith("text_model.") else "text_model." + module
        name = encoder_prefixes[component] + module.replace(".", "_")
        state[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(8.0)
    return state


def test_kohya_clip_lora_equals_diffusers_conversion_of_it(folders, lora_files, tmp_path):
    """The CLIP-L part alone, in kohya's names: diffusers' own kohya reader loads it into its pipeline."""
    from safetensors.torch import load_file, save_file

    kohya = kohya_text_lora(load_file(lora_files["dev"]), {"text_encoder": "lora_te1_"})
    assert any(k.startswith("lora_te1_text_model_encoder_layers_1_mlp_fc2") for k in kohya)
    save_file(kohya, tmp_path / "kohya.safetensors")
    theirs = run_diffusers("dev", folders["dev"], tmp_path / "kohya.safetensors")
    result = run_ours(ours(folders["dev"]), "dev", loras=[(tmp_path / "kohya.safetensors", 1.0)])
    assert max_rel_error(result.latents, theirs) < 1e-4
    assert max_rel_error(result.latents, run_diffusers("dev", folders["dev"], None)) > 0.01


def test_kohya_t5_lora_equals_peft_on_transformers_t5(folders, tmp_path):
    """lora_te3_ (sd-scripts' T5 prefix for FLUX.1 and SD 3), on T5's attention and gated FFN: torchsd's T5
    with the file applied gives transformers' T5EncoderModel with the same adapter injected by PEFT."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from torchsd.checkpoints.flow_lora import loras_applied

    reference = ref.flux_pipeline(tmp_path).text_encoder_2  # T5, the same weights as the dev folder's
    ref.random_adapter(reference, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], seed=4, alpha=2.0)
    kohya, peft_names = {}, {}
    for key, value in get_peft_model_state_dict(reference).items():
        peft_names[f"text_encoder_2.{key}"] = value  # as diffusers would name FluxPipeline's T5 part
        module, _, part = key.rpartition(".lora_")
        name = "lora_te3_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0.alpha" in kohya
    save_file(kohya, tmp_path / "t5.safetensors")
    save_file(peft_names, tmp_path / "t5_peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(
        {"text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 2.0})})
    pipe = ours(folders["dev"])
    ids = pipe.tokenizers["t5"](["a cat on the moon"])
    t5 = pipe.text_encoder("t5")  # read now: on a CPU the pipeline leaves T5 for the first prompt
    encoders = {"clip_l": pipe.text_encoder("clip_l"), "t5": t5}
    with torch.no_grad():
        theirs = reference(input_ids=ids).last_hidden_state
        plain = t5(ids)
        from torchsd.checkpoints.flow_lora import load_lora

        lora = load_lora(tmp_path / "t5.safetensors", "flux", pipe.config.transformer, encoders)
        assert len(lora.text_updates) == 14 and not lora.updates
        with loras_applied(t5, [(lora, 1.0)], "t5"):
            mine = t5(ids)
    assert max_rel_error(mine, theirs) < 1e-4 and max_rel_error(plain, theirs) > 0.01
    same = load_lora(tmp_path / "t5_peft.safetensors", "flux", pipe.config.transformer, encoders)
    assert [(u.module, u.scale) for u in same.text_updates] == [(u.module, u.scale) for u in lora.text_updates]
    # and in a run: the same as the run without it, but for the T5 context
    assert not torch.equal(run_ours(pipe, "dev", loras=[(tmp_path / "t5.safetensors", 1.0)]).latents,
                           run_ours(pipe, "dev").latents)


def test_t5_part_is_skipped_with_a_warning_where_the_model_has_no_t5(work, tmp_path):
    from safetensors.torch import save_file

    folder = ref.saved(ref.sd3_pipeline(work, t5=False), tmp_path / "sd3_no_t5")
    pipe = ours(folder)
    down, up = torch.full((2, 192), 0.01), torch.full((192, 2), 0.01)
    clip = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": down,
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": up,
               f"{clip}.lora_down.weight": torch.ones(2, 128), f"{clip}.lora_up.weight": torch.ones(128, 2)},
              tmp_path / "both.safetensors")
    with pytest.warns(UserWarning, match="2 LoRA weights are for a text encoder this model runs without"):
        with_lora = run_ours(pipe, "sd3", loras=[(tmp_path / "both.safetensors", 1.0)])
    assert not torch.equal(with_lora.latents, run_ours(pipe, "sd3").latents)  # bigG's part is applied


def test_every_layout_names_the_same_text_encoder_layers(folders):
    """SD 3's bigG in kohya's, diffusers' (with and without transformers 4's text_model.) and ComfyUI's names."""
    from torchsd.checkpoints.flow_lora import read_lora

    pipe = ours(folders["sd3"])
    down, up = torch.randn(2, 128), torch.randn(96, 2)
    found = set()
    for name in ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
                 "text_encoder_2.encoder.layers.1.mlp.fc1", "text_encoders.clip_g.transformer.text_model.encoder."
                 "layers.1.mlp.fc1"):
        kind = ("lora_down", "lora_up") if name.startswith(("lora_te", "text_encoders")) else ("lora_A", "lora_B")
        state = {f"{name}.{kind[0]}.weight": down, f"{name}.{kind[1]}.weight": up}
        (update,) = read_lora(state, "sd3", pipe.config.transformer, text_encoders=pipe.text_encoders).text_updates
        found.add((update.component, update.module, update.scale))
    assert found == {("clip_g", "text.layers.1.mlp.fc1", 1.0)}


def test_text_encoder_lora_for_another_model_is_refused(folders, tmp_path):
    from safetensors.torch import save_file

    from torchsd.checkpoints.io import CheckpointError

    save_file({"lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
               "lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_up.weight": torch.zeros(80, 2)},
              tmp_path / "deep.safetensors")
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(80, 2)},
              tmp_path / "wide.safetensors")
    pipe = ours(folders["dev"])
    with pytest.raises(CheckpointError, match="lora_te1_text_model_encoder_layers_5_mlp_fc1 names no linear layer"):
        run_ours(pipe, "dev", loras=[(tmp_path / "deep.safetensors", 1.0)])
    with pytest.raises(CheckpointError, match=r"is \(80, 2\) @ \(2, 768\); the clip_l layer is \(80, 64\)"):
        run_ours(pipe, "dev", loras=[(tmp_path / "wide.safetensors", 1.0)])


def test_cli_lora_flag_and_prompt_tag(folders, lora_files, tmp_path):
    from torchsd.cli import main

    model = ["--model", str(folders["dev"]), "--dtype", "fp32", "--device", "cpu", "--steps", "3", "--seed", "3",
             "--size", "32x32", "--distilled-cfg", "2.5"]
    path = lora_files["dev"]
    assert main(["generate", PROMPT, "--lora", f"{path}:0.7", "-o", str(tmp_path / "flag.png"), *model]) == 0
    assert main(["generate", f"{PROMPT} <lora:pytorch_lora_weights:0.7>", "--lora-dir", str(path.parent),
                 "-o", str(tmp_path / "tag.png"), *model]) == 0
    pipe = ours(folders["dev"])
    flag, tag = (Image.open(tmp_path / f"{n}.png") for n in ("flag", "tag"))
    assert np.array_equal(np.asarray(flag), np.asarray(run_ours(pipe, "dev", loras=[(path, 0.7)]).images[0]))
    expected = run_ours(pipe, "dev", PROMPT + " ", loras=[(path, 0.7)])  # the prompt, its tag taken out
    assert np.array_equal(np.asarray(tag), np.asarray(expected.images[0]))
    assert "<lora:pytorch_lora_weights:0.7>" in tag.text["parameters"] and "Lora hashes" in tag.text["parameters"]

"""Model folders and files as people have them: saved by the installed diffusers and transformers (fp16
variants with or without the full-precision files, shards, .bin), in transformers 4's layouts, written by
torchsd for other tools, and SD 1 single files in the older text-key layout. torchsd reads each and gives
StableDiffusionPipeline's latents from the same starting latents; what it cannot read is refused by name.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchsd
from ldm_reference import original_checkpoint
from reference import diffusers_unet, diffusers_vae, max_rel_error, random_pipeline, transformers_text_encoder
from test_checkpoints_single_file import inferable_config
from test_pipeline_parity import NEGATIVE, PROMPT, diffusers_pipeline, initial_latents
from torchsd.checkpoints.diffusers import from_diffusers_keys, schedule_config_to_diffusers
from torchsd.checkpoints.io import CheckpointError
from torchsd.cli import main

TOL = 1e-4  # float32, a 12-step guided DDIM run
FP16_TOL = 1e-2  # fp16-rounded weights against the float32 ones (4e-4 measured on these tiny models)
SHARD_SIZE = "1MB"  # splits every tiny component in two or more shards
COMPONENTS = ("unet", "vae", "text_encoder")
CASES = [("sd1", "epsilon"), ("sd2", "v_prediction")]


def reference_pipeline(sd, tokenizer_folder):
    """diffusers' StableDiffusionPipeline holding ``sd``'s weights and transformers' own tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    sd.tokenizer.save_pretrained(tokenizer_folder)  # the vocabulary: offline, only torchsd ships one
    schedule = {k: v for k, v in schedule_config_to_diffusers(sd.config.schedule).items() if not k.startswith("_")}
    return StableDiffusionPipeline(
        vae=diffusers_vae(sd), text_encoder=transformers_text_encoder(sd), unet=diffusers_unet(sd),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder), scheduler=DDIMScheduler(**schedule),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module", params=CASES, ids=["sd1-eps", "sd2-v"])
def saved(request, tmp_path_factory):
    """(torchsd pipeline, folder of layouts) — each layout written by diffusers' ``save_pretrained``."""
    family, prediction = request.param
    sd = random_pipeline(family, prediction)
    root = tmp_path_factory.mktemp(f"wild-{family}")
    pipe = reference_pipeline(sd, root / "tokenizer-source")
    pipe.save_pretrained(root / "plain")
    pipe.save_pretrained(root / "sharded", max_shard_size=SHARD_SIZE)
    pipe.save_pretrained(root / "bin", safe_serialization=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(root / "fp16", variant="fp16")
    pipe.save_pretrained(root / "sharded-fp16", variant="fp16", max_shard_size=SHARD_SIZE)
    shutil.copytree(root / "plain", root / "both")
    pipe.save_pretrained(root / "both", variant="fp16")  # beside the float32 files, as hub repos have them
    return sd, root


def weight_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "config.json")


def test_save_pretrained_writes_the_layouts_under_test(saved):
    """What the installed diffusers and transformers actually write (so that each test below tests it)."""
    _, root = saved
    assert sorted(os.listdir(root / "plain" / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    assert weight_files(root / "plain" / "text_encoder") == ["model.safetensors"]
    text_keys = load_file(root / "plain" / "text_encoder" / "model.safetensors")
    assert "embeddings.token_embedding.weight" in text_keys  # transformers 5: no text_model. prefix
    assert weight_files(root / "fp16" / "unet") == ["diffusion_pytorch_model.fp16.safetensors"]
    assert weight_files(root / "fp16" / "text_encoder") == ["model.fp16.safetensors"]
    assert weight_files(root / "both" / "vae") == ["diffusion_pytorch_model.fp16.safetensors",
                                                   "diffusion_pytorch_model.safetensors"]
    assert weight_files(root / "bin" / "unet") == ["diffusion_pytorch_model.bin"]
    for layout, index in (("sharded", "{}.safetensors.index.json"), ("sharded-fp16", "{}.safetensors.index.fp16.json")):
        for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):
            files = weight_files(root / layout / name)
            assert index.format(stem) in files and len(files) >= 3, (layout, name, files)  # index + 2 shards or more


def _weights(sd):
    return {name: module.state_dict() for name, module in
            (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder))}


def assert_weights(loaded, expected, dtype=torch.float32):
    """Bit for bit: ``expected``'s weights, rounded to ``dtype`` and back."""
    got, want = _weights(loaded), _weights(expected)
    for name in COMPONENTS:
        assert got[name].keys() == want[name].keys()
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value.to(dtype).float()), (name, key)


@pytest.mark.parametrize("layout,variant,dtype", [
    ("plain", None, torch.float32), ("sharded", None, torch.float32), ("bin", None, torch.float32),
    ("fp16", "fp16", torch.float16), ("sharded-fp16", "fp16", torch.float16),
    ("both", None, torch.float32), ("both", "fp16", torch.float16)])
def test_folder_saved_by_diffusers_loads_its_weights(saved, layout, variant, dtype):
    sd, root = saved
    loaded = torchsd.load_pipeline(root / layout, variant=variant, dtype=torch.float32)
    assert loaded.config == sd.config  # pad 0 for SD 2, from tokenizer_config.json
    assert_weights(loaded, sd, dtype)


def generate_both(folder, variant=None, steps=12, guidance=6.0):
    """Final latents of torchsd and of diffusers (float32 compute on the file's weights) from one start."""
    sd = torchsd.load_pipeline(folder, variant=variant, dtype=torch.float32)
    ours = sd.generate(PROMPT, NEGATIVE, steps=steps, guidance_scale=guidance, sampler="ddim", width=32, height=32,
                       latents=initial_latents(), seed=0)
    pipe = diffusers_pipeline(folder, variant=variant, dtype=torch.float32)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, width=32,
                  height=32, latents=initial_latents(), output_type="latent").images
    return ours.latents, theirs


@pytest.mark.parametrize("layout,variant", [("plain", None), ("sharded", None), ("bin", None), ("fp16", "fp16"),
                                            ("sharded-fp16", "fp16"), ("both", "fp16")])
def test_folder_saved_by_diffusers_gives_its_latents(saved, layout, variant):
    ours, theirs = generate_both(saved[1] / layout, variant)
    assert max_rel_error(ours, theirs) < TOL


def test_fp16_variant_stays_within_fp16_tolerance_of_the_full_precision_run(saved):
    _, root = saved
    half, _ = generate_both(root / "fp16", "fp16", steps=4, guidance=3.0)
    full, _ = generate_both(root / "plain", steps=4, guidance=3.0)
    assert 0 < max_rel_error(half, full) < FP16_TOL


def test_variant_fallback_is_diffusers_own(saved, tmp_path):
    """A component without the variant's files reads its plain ones (diffusers' per-component rule)."""
    sd, root = saved
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "plain", mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(root / "fp16" / "unet", mixed / "unet")
    loaded = torchsd.load_pipeline(mixed, variant="fp16", dtype=torch.float32)
    assert torch.equal(loaded.unet.conv_in.weight, sd.unet.conv_in.weight.half().float())
    assert torch.equal(loaded.vae.encoder.conv_in.weight, sd.vae.encoder.conv_in.weight)  # plain: no fp16 file
    ours, theirs = generate_both(mixed, "fp16", steps=4, guidance=3.0)
    assert max_rel_error(ours, theirs) < TOL


# --- transformers 4's files: slow tokenizer, pytorch_model.bin with text_model. and position_ids, shards ---

def transformers4_folder(saved, family, target):
    """The folder as diffusers ≤ 0.2x with transformers 4 (< 4.31) wrote it: the text encoder's keys under
    ``text_model.`` with the ``position_ids`` buffer, here in two pickled shards with their index; the
    tokenizer as the slow CLIPTokenizer's files (special tokens as AddedToken dicts, as SD 1.5 ships them)."""
    _, root = saved
    shutil.copytree(root / "bin", target)
    text = target / "text_encoder"
    state = {"text_model." + k: v for k, v in load_file(text / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(state["text_model.embeddings.position_embedding.weight"]
                                                               .shape[0])[None]
    (text / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        torch.save({k: state[k] for k in names}, text / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (text / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_slow_tokenizer(root / "plain" / "tokenizer" / "tokenizer.json", target / "tokenizer",
                         pad="!" if family == "sd2" else "<|endoftext|>")
    return target


def write_slow_tokenizer(tokenizer_json, folder, pad):
    """vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json from transformers' own
    tokenizer.json, in the form transformers 4's slow CLIPTokenizer saved them."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model = json.loads(tokenizer_json.read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"), "pad_token": pad,
               "unk_token": added("<|endoftext|>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {k: (v | {"__type": "AddedToken"} if isinstance(v, dict) else v) for k, v in special.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer"}))


def test_transformers4_folder_loads_and_gives_diffusers_latents(saved, tmp_path):
    sd, _ = saved
    folder = transformers4_folder(saved, sd.config.family, tmp_path / "old")
    loaded = torchsd.load_pipeline(folder, dtype=torch.float32)
    assert loaded.config == sd.config
    assert_weights(loaded, sd)
    ours, theirs = generate_both(folder)
    assert max_rel_error(ours, theirs) < TOL


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
@pytest.mark.parametrize("layout", ["as-saved", "transformers4"])
def test_text_encoder_keys_of_both_transformers_classes_and_versions(cls_name, layout):
    """transformers 5 saves CLIPTextModel flat and CLIPTextModelWithProjection under text_model.; transformers
    4 nested both and (before 4.31) saved position_ids. Every form gives torchsd's keys; the projection
    keeps its name for the models that use it."""
    import transformers

    sd = random_pipeline("sd1")
    model = getattr(transformers, cls_name)(transformers_text_encoder(sd).config)
    state = model.state_dict()
    if layout == "transformers4":
        state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                 for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ours = from_diffusers_keys(state, "text_encoder")
    projection = ours.pop("text_projection.weight", None)
    assert (projection is not None) == (cls_name == "CLIPTextModelWithProjection")
    assert ours.keys() == sd.text_encoder.state_dict().keys()


def test_text_encoder_keys_that_mix_both_layouts_are_refused():
    state = from_diffusers_keys({"text_model.embeddings.token_embedding.weight": torch.zeros(1)}, "text_encoder")
    assert list(state) == ["token_embedding.weight"]
    with pytest.raises(CheckpointError, match="mixes keys with and without the 'text_model.' prefix"):
        from_diffusers_keys({"text_model.embeddings.token_embedding.weight": torch.zeros(1),
                             "final_layer_norm.weight": torch.zeros(1)}, "text_encoder")


# --- what torchsd writes ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=CASES, ids=["sd1-eps", "sd2-v"])
def written(request, tmp_path_factory):
    family, prediction = request.param
    sd = random_pipeline(family, prediction, seed=2)
    folder = tmp_path_factory.mktemp(f"written-{family}") / "model"
    sd.save(folder)
    return sd, folder


def test_written_folder_has_the_files_old_and_new_readers_need(written):
    sd, folder = written
    assert sorted(os.listdir(folder / "tokenizer")) == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                                                        "tokenizer_config.json", "vocab.json"]
    assert all(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_written_folder_gives_the_same_latents_in_diffusers(written):
    ours, theirs = generate_both(written[1])
    assert max_rel_error(ours, theirs) < TOL


@pytest.mark.parametrize("reader", ["transformers", "transformers-slow-files", "tokenizers"])
def test_written_tokenizer_reads_the_same_in_every_reader(written, tmp_path, reader):
    """transformers 5 reads tokenizer.json; without it (as transformers 4's CLIPTokenizer) the slow files;
    transformers 4's fast tokenizer is the ``tokenizers`` library on tokenizer.json."""
    sd, folder = written
    ours = torchsd.load_pipeline(folder, dtype=torch.float32).tokenizer
    texts = [PROMPT, "wow!!! what a CAT, isn't it?", "naïve café 🐱 <|endoftext|> x"]
    if reader == "tokenizers":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))
        for text in texts:
            assert backend.encode(text).ids == [ours.bos_token_id, *ours.encode(text), ours.eos_token_id]
        return
    from transformers import CLIPTokenizer

    source = folder / "tokenizer"
    if reader == "transformers-slow-files":
        source = tmp_path / "slow"
        shutil.copytree(folder / "tokenizer", source)
        (source / "tokenizer.json").unlink()
    ref = CLIPTokenizer.from_pretrained(source)
    assert ref.pad_token_id == ours.pad_token_id == (0 if sd.config.family == "sd2" else 49407)
    expected = ref(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(texts).tolist() == expected


# --- SD 1 single files whose text encoder lacks the text_model. level --------------------------------

@pytest.mark.parametrize("layout", ["flat", "flat-with-position-ids", "flat-with-nested-position-ids",
                                    "nested-with-position-ids"])
def test_sd1_single_file_in_the_older_text_layout_equals_the_usual_one(tmp_path, layout):
    config = inferable_config("sd1")
    state, _ = original_checkpoint(config, seed=6)  # the usual layout: cond_stage_model.transformer.text_model.*
    nested, flat = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    other = {k.replace(nested, flat, 1) if layout.startswith("flat") else k: v for k, v in state.items()}
    positions = torch.arange(config.text.max_positions)[None]
    if layout in ("flat-with-position-ids", "nested-with-position-ids"):
        other[(flat if layout.startswith("flat") else nested) + "embeddings.position_ids"] = positions
    elif layout == "flat-with-nested-position-ids":  # the file the issue reported refused at detection
        other[nested + "embeddings.position_ids"] = positions
    save_file(state, str(tmp_path / "usual.safetensors"))
    save_file(other, str(tmp_path / "other.safetensors"))
    usual = torchsd.load_pipeline(tmp_path / "usual.safetensors", dtype=torch.float32)
    loaded = torchsd.load_pipeline(tmp_path / "other.safetensors", dtype=torch.float32)
    assert loaded.config == usual.config == config  # inferred from the tensors: no metadata in either file
    assert_weights(loaded, usual)


# --- clear errors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_and_fp16(tmp_path_factory):
    sd = random_pipeline("sd1", seed=3)
    root = tmp_path_factory.mktemp("errors")
    pipe = reference_pipeline(sd, root / "tokenizer-source")
    pipe.save_pretrained(root / "plain")
    pipe.to(torch.float16).save_pretrained(root / "fp16", variant="fp16", max_shard_size=SHARD_SIZE)
    return root


def copy(root, layout, tmp_path):
    shutil.copytree(root / layout, tmp_path / layout)
    return tmp_path / layout


def test_missing_tokenizer_files_are_named(plain_and_fp16, tmp_path):
    folder = copy(plain_and_fp16, "plain", tmp_path)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer: no tokenizer files; expected tokenizer\.json .* or "
                                              r"vocab\.json and merges\.txt .* holds: tokenizer_config\.json"):
        torchsd.load_pipeline(folder, dtype=torch.float32)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer: no such folder"):
        torchsd.load_pipeline(folder, dtype=torch.float32)


def test_absent_variant_is_refused_as_diffusers_refuses_it(plain_and_fp16):
    from diffusers import StableDiffusionPipeline

    with pytest.raises(ValueError, match="no such modeling files are available"):  # diffusers' own refusal
        StableDiffusionPipeline.from_pretrained(plain_and_fp16 / "plain", variant="fp16")
    with pytest.raises(CheckpointError, match="no component has 'fp16' weights .* load it without a variant"):
        torchsd.load_pipeline(plain_and_fp16 / "plain", variant="fp16", dtype=torch.float32)


def test_variant_files_alone_need_the_variant_as_in_diffusers(plain_and_fp16, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    folder = plain_and_fp16 / "fp16"
    with pytest.raises(OSError, match="no file named"):  # diffusers reads no variant unless asked
        StableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"unet: holds only fp16 variant weights, no plain ones; load it with "
                                              r"variant='fp16' \(--variant fp16\)"):
        torchsd.load_pipeline(folder, dtype=torch.float32)
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", str(folder), "--steps", "1", "--size", "16x16", "--seed", "1",
            "--output", str(out)]
    assert main(args) == 2 and "--variant fp16" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--variant", "fp16"]) == 0 and out.exists()


def test_variant_on_a_single_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torchsd.checkpoints.save_pipeline(random_pipeline("sd1"), path, format="single-file")
    with pytest.raises(CheckpointError, match="a single file has none: load it without a variant"):
        torchsd.load_pipeline(path, variant="fp16", dtype=torch.float32)


def test_broken_shard_index_is_named(plain_and_fp16, tmp_path):
    folder = copy(plain_and_fp16, "fp16", tmp_path)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (folder / "unet" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"index.fp16.json: names the shard '{shard}', which is not in "
                                              f".*unet; the download is incomplete"):
        torchsd.load_pipeline(folder, variant="fp16", dtype=torch.float32)
    index.write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"index.fp16.json: not a shard index \(JSONDecodeError"):
        torchsd.load_pipeline(folder, variant="fp16", dtype=torch.float32)
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../secrets.safetensors"}}))
    with pytest.raises(CheckpointError, match="names the shard '../../secrets.safetensors'"):
        torchsd.load_pipeline(folder, variant="fp16", dtype=torch.float32)


def test_shard_that_lacks_a_listed_tensor_is_named(plain_and_fp16, tmp_path):
    folder = copy(plain_and_fp16, "fp16", tmp_path)
    index = folder / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    data = json.loads(index.read_text())
    data["weight_map"]["decoder.extra.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"1 tensors it lists are in none of its shards \(first: "
                                              r"decoder.extra.weight in"):
        torchsd.load_pipeline(folder, variant="fp16", dtype=torch.float32)


def test_missing_weights_and_config_entries_are_named(plain_and_fp16, tmp_path):
    folder = copy(plain_and_fp16, "plain", tmp_path)
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder: no weights file; expected diffusion_pytorch_model"
                                              r"\.safetensors \(diffusers\) or model\.safetensors \(transformers\)"):
        torchsd.load_pipeline(folder, dtype=torch.float32)
    shutil.copy(plain_and_fp16 / "plain" / "text_encoder" / "model.safetensors", folder / "text_encoder")
    config = json.loads((folder / "unet" / "config.json").read_text())
    del config["block_out_channels"]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unet/config.json: lacks the entry 'block_out_channels'"):
        torchsd.load_pipeline(folder, dtype=torch.float32)


def test_pickled_folder_weights_that_run_code_are_refused(plain_and_fp16, tmp_path):
    from test_checkpoints_errors import RunsCode

    folder = copy(plain_and_fp16, "plain", tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"decoder.conv_in.weight": torch.zeros(1), "x": RunsCode(marker)},
               folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load: the pickle holds more than tensors"):
        torchsd.load_pipeline(folder, dtype=torch.float32)
    assert not marker.exists()

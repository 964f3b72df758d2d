"""Every tokenizer/ layout transformers has written gives the ids, pad, BOS and EOS of transformers' own
CLIPTokenizer loaded from the same folder, for SD 1 (pads with the end token) and SD 2 (pads with "!",
which transformers then also cuts out of the text as the special token 0)."""

import json
import shutil

import pytest

from test_tokenizer import CORPUS
from torchsd.text.tokenizer import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PADS = {"sd1": EOS, "sd2": "!"}
ADDED = "<cat-toy>"
TEXTS = CORPUS + ["wow!!! really?! yes!", f"a {ADDED} and <CAT-TOY>, x{ADDED}y"]
# Left out: upper-case "<|ENDOFTEXT|>". transformers 5 BPEs its lower-cased text; CLIP's own tokenizer, transformers 4
# and torchsd map it to the end token.


def added_token(content, normalized=False, special=True):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": special}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def reference(request, tmp_path_factory):
    """(family, folder holding transformers 5's own save: tokenizer.json + tokenizer_config.json)."""
    from transformers import CLIPTokenizer as Reference

    family = request.param
    root = tmp_path_factory.mktemp(f"tokenizer-{family}")
    CLIPTokenizer(pad_token_id=0 if family == "sd2" else 49407).save_pretrained(root / "source")  # the vocabulary
    Reference.from_pretrained(root / "source").save_pretrained(root / "transformers5")
    with_added = Reference.from_pretrained(root / "source")
    with_added.add_tokens([ADDED])  # what textual-inversion training scripts do before saving the pipeline
    with_added.save_pretrained(root / "transformers5-added")
    return family, root


def slow_files(source, folder):
    """vocab.json + merges.txt taken from transformers' tokenizer.json."""
    folder.mkdir()
    model = json.loads((source / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_layout(layout, family, root, folder):
    pad = PADS[family]
    source = root / "transformers5"
    if layout == "transformers5":  # tokenizer.json + tokenizer_config.json
        shutil.copytree(source, folder)
    elif layout == "transformers5-added":
        shutil.copytree(root / "transformers5-added", folder)
    elif layout == "tokenizer-json-alone":  # no config: transformers' defaults (pad = end token)
        folder.mkdir()
        shutil.copy(source / "tokenizer.json", folder)
    elif layout == "tokenizer-json-string-merges":  # tokenizers < 0.20 wrote merges as "a b"
        shutil.copytree(source, folder)
        data = json.loads((folder / "tokenizer.json").read_text())
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        (folder / "tokenizer.json").write_text(json.dumps(data))
    elif layout == "slow-special-tokens-map":  # transformers 4's slow CLIPTokenizer, as SD 1.5 and 2.1 ship it
        slow_files(source, folder)
        special = {"bos_token": added_token(BOS, normalized=True), "eos_token": added_token(EOS, normalized=True),
                   "unk_token": added_token(EOS, normalized=True), "pad_token": pad}
        for value in special.values():
            if isinstance(value, dict):
                value.pop("special")
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
        config = {k: (v | {"__type": "AddedToken"} if isinstance(v, dict) else v) for k, v in special.items()}
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {
            "do_lower_case": True, "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    elif layout == "slow-config-only":  # transformers >= 4.34: special tokens in tokenizer_config.json only
        slow_files(source, folder)
        decoder = {"49406": added_token(BOS), "49407": added_token(EOS)}
        if family == "sd2":
            decoder["0"] = added_token(pad)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "added_tokens_decoder": decoder, "bos_token": BOS, "eos_token": EOS, "pad_token": pad, "unk_token": EOS,
            "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    elif layout == "slow-added-tokens-json":  # a token added before transformers 4.34: added_tokens.json
        slow_files(source, folder)
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}))
        (folder / "added_tokens.json").write_text(json.dumps({ADDED: 49408}))
    elif layout == "fast-all-files":  # transformers 4's CLIPTokenizerFast: slow files and tokenizer.json
        slow_files(source, folder)
        shutil.copy(source / "tokenizer.json", folder)
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}))
        shutil.copy(source / "tokenizer_config.json", folder)
    elif layout == "torchsd":
        CLIPTokenizer.from_pretrained(root / "transformers5-added").save_pretrained(folder)
    return folder


LAYOUTS = ["transformers5", "transformers5-added", "tokenizer-json-alone", "tokenizer-json-string-merges",
           "slow-special-tokens-map", "slow-config-only", "slow-added-tokens-json", "fast-all-files", "torchsd"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_transformers_ids(reference, tmp_path, layout):
    from transformers import CLIPTokenizer as Reference

    family, root = reference
    folder = build_layout(layout, family, root, tmp_path / layout)
    ref, ours = Reference.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == \
        (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id)
    if layout != "tokenizer-json-alone":  # with no config, transformers (and torchsd) pad with the end token
        assert ours.pad_token_id == (0 if family == "sd2" else 49407)
    for text in TEXTS:
        expected = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours([text])[0].tolist() == expected, text
    if "added" in layout or layout == "torchsd":
        assert ours.encode(ADDED) == [49408] and ours.decode(ours.encode(f"a {ADDED}")) == f"a {ADDED}"


def test_unreadable_tokenizer_files_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty: no tokenizer files; expected tokenizer\.json .* The folder holds: "
                                         r"tokenizer_config\.json"):
        CLIPTokenizer.from_pretrained(empty)
    (tmp_path / "wordpiece").mkdir()
    (tmp_path / "wordpiece" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a CLIP tokenizer: model\.type must be \"BPE\""):
        CLIPTokenizer.from_pretrained(tmp_path / "wordpiece")
    CLIPTokenizer().save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"bad/tokenizer\.json: not valid JSON"):
        CLIPTokenizer.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").unlink()
    (tmp_path / "bad" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match=r"the pad_token '<pad>' is neither in vocab\.json nor an added token"):
        CLIPTokenizer.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "special_tokens_map.json").unlink()
    (tmp_path / "bad" / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n")
    with pytest.raises(ValueError, match=r"merges\.txt: a merge must be two tokens"):
        CLIPTokenizer.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "merges.txt").write_text("#version: 0.2\nt h\ni n\n")
    with pytest.raises(ValueError, match="does not match the CLIP byte-level BPE layout"):
        CLIPTokenizer.from_pretrained(tmp_path / "bad")

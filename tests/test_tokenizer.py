"""The CLIP tokenizer gives the same ids as transformers' CLIPTokenizer built from the same vocabulary."""

import pytest
import torch

from torchsd.text.tokenizer import CLIPTokenizer

CORPUS = [
    "", " ", "a photo of a cat", "A Photo   Of A CAT!!!", "a red circle at the top left on a blue background",
    "it's what they'd've said, isn't it? I'll go; you're late.", "price: $12.50 (approx.) — 3x faster, 2026-11-26",
    "naïve café déjà vu, Ünïcödé façade", "日本語のテキストと中文", "emoji 🐱🚀👍🏽 and flags 🇫🇷",
    "hyper-realistic, 8k, trending on artstation, (masterpiece:1.2), [blurry]", "tab\tand\nnewlines\r\n here",
    "0123456789 3.14159 1e-5", "<|startoftext|>special<|endoftext|>", "über-long " * 60, "x" * 300,
    "\u00e9 composed vs e\u0301 decomposed", "ALL CAPS SHOUTING", "snake_case and camelCase and kebab-case",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer as Reference

    ours = CLIPTokenizer()
    folder = tmp_path_factory.mktemp("tok")
    ours.save_pretrained(folder)
    return ours, Reference.from_pretrained(folder)


def test_vocabulary_layout():
    tok = CLIPTokenizer()
    assert tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert len(tok.merges) == 48894


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(tokenizers, text):
    ours, ref = tokenizers
    expected = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours([text])[0].tolist() == expected


def test_untruncated_encoding_matches_transformers(tokenizers):
    ours, ref = tokenizers
    text = " ".join(CORPUS)
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids


def test_sd2_pads_with_zero_and_sd1_with_end_token():
    sd1, sd2 = CLIPTokenizer(pad_token_id=49407), CLIPTokenizer(pad_token_id=0)
    a, b = sd1(["a cat"])[0], sd2(["a cat"])[0]
    assert a[:4].tolist() == b[:4].tolist() == [49406, 320, 2368, 49407]
    assert set(a[4:].tolist()) == {49407} and set(b[4:].tolist()) == {0}


def test_long_text_is_truncated_with_an_end_token():
    ids = CLIPTokenizer()(["word " * 200])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and ids.dtype == torch.long


def test_decode_roundtrip():
    tok = CLIPTokenizer()
    assert tok.decode(tok.encode("a red circle, at the top-left!")) == "a red circle , at the top - left !"

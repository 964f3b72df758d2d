"""AUTOMATIC1111's prompt syntax, long prompts in 75-token chunks, weighting with the mean restored, clip skip."""

import pytest
import torch

from reference import random_pipeline
from torchsd.diffusion.denoisers import classifier_free_guidance, repeat_to_common_length
from torchsd.text.conditioning import CHUNK_LENGTH, Conditioning, split_into_chunks
from torchsd.text.prompts import extract_extra_networks, parse_prompt_attention


def pairs(text):
    return [("BREAK", None) if f.is_break else (f.text, f.weight) for f in parse_prompt_attention(text)]


def assert_pairs(text, expected):
    got = pairs(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert w == pytest.approx(e, rel=1e-12) if e is not None else w is None


# --- the parser ------------------------------------------------------------------------------------

def test_reference_example_gives_exactly_the_documented_weights():
    assert_pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)])


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]] b", [("a", 1 / 1.21), (" b", 1.0)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("( a : 0.5 )", [(" a ", 0.5)]),
    ("((a:1.5))", [("a", 1.65)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[open and (round", [("open and ", 1 / 1.1), ("round", 1.0)]),  # 1/1.1 * 1.1 for "round"
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),  # a colon without a number is text
    ("closing) only]", [("closing) only]", 1.0)]),  # brackets that close nothing are text
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", None), ("b", 1.1)]),  # A1111 would turn this BREAK into text
    ("BREAKfast break", [("BREAKfast break", 1.0)]),  # only the upper-case word
    ("", [("", 1.0)]),
])
def test_parser_edge_cases(text, expected):
    assert_pairs(text, expected)


def test_lora_tags_are_removed_from_the_text():
    text, tags = extract_extra_networks("a cat <lora:myStyle:0.8>, <lora:other> sitting <lora:x:0.5:1.2>")
    assert text == "a cat ,  sitting "  # removed as AUTOMATIC1111 does; the tokenizer collapses spaces
    assert [(t.name, t.text_encoder_scale, t.unet_scale) for t in tags] == [
        ("myStyle", 0.8, 0.8), ("other", 1.0, 1.0), ("x", 0.5, 1.2)]


@pytest.mark.parametrize("text, message", [
    ("<hypernet:x:1>", "unknown extra network kind 'hypernet'"),
    ("<lora:x:heavy>", "weights must be numbers"),
    ("<lora::1>", "the LoRA name is empty"),
    ("<lora:x:1:2:3>", "too many values"),
])
def test_bad_extra_network_tags_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        extract_extra_networks(text)


# --- chunking --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.mark.parametrize("n_tokens, n_chunks", [(0, 1), (74, 1), (75, 1), (76, 2), (150, 2), (300, 4)])
def test_chunk_counts_and_contents(sd, n_tokens, n_chunks):
    tok = sd.tokenizer
    prompt = " ".join(["cat"] * n_tokens)
    cat = tok.encode("cat")
    assert len(cat) == 1
    chunks = split_into_chunks(prompt, tok)
    assert len(chunks) == n_chunks
    flat = [t for c in chunks for t in c.tokens]
    assert all(len(c.tokens) == CHUNK_LENGTH and len(c.weights) == CHUNK_LENGTH for c in chunks)
    assert flat[:n_tokens] == cat * n_tokens
    assert flat[n_tokens:] == [tok.eos_token_id] * (len(flat) - n_tokens)
    context = sd.encode_prompt([prompt])
    assert context.shape == (1, 77 * n_chunks, sd.config.text.width)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_long_prompt_is_each_chunk_encoded_alone_and_concatenated(family):
    sd = random_pipeline(family)
    tok = sd.tokenizer
    words = [f"w{i}" for i in range(60)]  # "w12" is several tokens: a varied sequence
    prompt = " ".join(words)
    ids = tok.encode(prompt)
    assert 150 < len(ids) <= 225
    expected = []
    for start in range(0, len(ids), 75):  # no commas: plain cuts every 75 tokens
        piece = ids[start:start + 75]
        row = [tok.bos_token_id] + piece + [tok.eos_token_id]
        row += [tok.pad_token_id] * (77 - len(row))  # SD 1 pads with EOS, SD 2 with 0
        expected.append(sd.text_encoder(torch.tensor([row])))
    assert torch.equal(sd.encode_prompt([prompt]), torch.cat(expected, dim=1))


def test_cut_moves_back_to_a_comma_within_20_tokens(sd):
    tok = sd.tokenizer
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = split_into_chunks(prompt, tok)
    comma, dog = tok.encoder[",</w>"], tok.encode("dog")[0]
    assert first.tokens[:71] == tok.encode("cat") * 70 + [comma]
    assert first.tokens[71:] == [tok.eos_token_id] * 4  # the 4 dogs after the comma moved on
    assert second.tokens[:10] == [dog] * 10
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)  # comma 25 tokens back: a plain cut
    first, second = split_into_chunks(far, tok)
    assert first.tokens[-1] == dog and second.tokens[:6] == [dog] * 6


def test_break_starts_a_new_chunk(sd):
    chunks = split_into_chunks("a red cat BREAK a blue dog", sd.tokenizer)
    assert len(chunks) == 2
    assert chunks[0].tokens[:3] == sd.tokenizer.encode("a red cat")
    assert chunks[1].tokens[:3] == sd.tokenizer.encode("a blue dog")


# --- encoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_prompt_is_exactly_the_plain_encoder_call(family):
    sd = random_pipeline(family)
    prompt = "a red circle at the top left on a blue background"
    with torch.no_grad():
        plain = sd.text_encoder(sd.tokenizer([prompt]))
        skipped = sd.text_encoder(sd.tokenizer([prompt]), clip_skip=2)
    assert torch.equal(sd.encode_prompt([prompt]), plain)
    assert torch.equal(sd.encode_prompt([prompt], clip_skip=2), skipped)
    assert torch.equal(sd.encode_prompt([""]), sd.text_encoder(sd.tokenizer([""])))


def test_plain_prompt_gives_the_foundation_pipelines_latents(sd, monkeypatch):
    prompt, negative = "a red circle", "blurry"
    options = dict(steps=2, width=16, height=16, seed=3)
    ours = sd.generate(prompt, negative, **options).latents

    def foundation_condition(prompts, clip_skip=None):  # the foundation's encode_prompt
        ids = sd.tokenizer(prompts)
        return Conditioning(sd.text_encoder(ids, clip_skip=clip_skip or sd.config.clip_skip), [])

    monkeypatch.setattr(sd, "condition", foundation_condition)
    assert torch.equal(ours, sd.generate(prompt, negative, **options).latents)


def test_weights_scale_token_vectors_and_restore_the_mean(sd):
    tok = sd.tokenizer
    with torch.no_grad():
        plain = sd.text_encoder(sd.tokenizer(["a red circle"]))
    weighted = sd.encode_prompt(["a (red:1.5) [circle]"])
    red = 2  # position: BOS, a, red
    weights = torch.ones(77)
    weights[red], weights[red + 1] = 1.5, 1 / 1.1
    assert tok.encode("a red circle")[1:3] == [tok.encode("red")[0], tok.encode("circle")[0]]
    scaled = plain * weights[None, :, None]
    expected = scaled * (plain.mean() / scaled.mean())
    assert torch.allclose(weighted, expected, rtol=1e-5, atol=1e-6)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_clip_skip_applies_to_every_chunk(sd):
    prompt = " ".join(["cat"] * 80)
    chunks = split_into_chunks(prompt, sd.tokenizer)
    rows = [[sd.tokenizer.bos_token_id] + c.tokens + [sd.tokenizer.eos_token_id] for c in chunks]
    with torch.no_grad():
        expected = torch.cat([sd.text_encoder(torch.tensor([r]), clip_skip=2) for r in rows], dim=1)
    assert torch.equal(sd.encode_prompt([prompt], clip_skip=2), expected)


def test_prompts_of_different_lengths_in_one_batch_are_padded_with_empty_chunks(sd):
    long = " ".join(["cat"] * 80)
    both = sd.encode_prompt(["a dog", long])
    assert both.shape[1] == 154
    assert torch.equal(both[0, :77], sd.encode_prompt(["a dog"])[0])
    assert torch.equal(both[0, 77:], sd.encode_prompt([""])[0])
    assert torch.equal(both[1], sd.encode_prompt([long])[0])


def test_cond_and_uncond_of_different_lengths_equal_two_separate_calls(sd):
    cond = sd.encode_prompt([" ".join(["cat"] * 80)])  # 2 chunks
    uncond = sd.encode_prompt(["blurry"])  # 1 chunk
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        batched = classifier_free_guidance(sd.denoiser, cond, uncond, 7.5)(x, sigma)
        separate_cond, separate_uncond = sd.denoiser(x, sigma, cond), sd.denoiser(x, sigma, uncond)
    expected = separate_uncond + 7.5 * (separate_cond - separate_uncond)
    assert torch.allclose(batched, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    a, b = repeat_to_common_length(torch.zeros(1, 154, 4), torch.zeros(1, 231, 4))
    assert a.shape[1] == b.shape[1] == 462
    a, b = repeat_to_common_length(torch.zeros(1, 77 * 7, 4), torch.zeros(1, 77 * 8, 4))
    assert (a.shape[1], b.shape[1]) == (77 * 7, 77 * 8)  # too long a common multiple: left for two calls
    with torch.no_grad():
        two_calls = classifier_free_guidance(sd.denoiser, torch.cat([cond] * 4, 1)[:, :77 * 7], cond, 2.0)(x, sigma)
    assert torch.isfinite(two_calls).all()


def test_long_prompt_generation_runs_and_differs_from_truncation(sd):
    first_75 = " ".join(["cat"] * 70) + " with a red hat on"
    assert len(sd.tokenizer.encode(first_75)) == 75
    options = dict(steps=2, width=16, height=16, seed=1)
    full = sd.generate(first_75 + " a blue chair", **options).latents
    assert not torch.equal(full, sd.generate(first_75, **options).latents)


def test_malformed_tags_are_refused_when_the_request_is_made():
    from torchsd.pipeline import GenerationRequest

    with pytest.raises(ValueError, match="weights must be numbers"):
        GenerationRequest(prompt="a cat", negative_prompt="<lora:x:strong>")

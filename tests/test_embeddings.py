"""Textual-inversion embeddings: three file layouts, used by file name, never split across chunks, a wrong
width refused by name, hashes in the infotext."""

import copy
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from reference import random_pipeline
from torchsd.checkpoints.embeddings import load_embedding
from torchsd.checkpoints.io import CheckpointError
from torchsd.text.conditioning import EmbeddingMatcher, split_into_chunks


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture()
def vectors():
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def emb_dir(sd, tmp_path, vectors):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "ignored",
                "step": 1000}, folder / "shinyStyle.pt")
    save_file({"emb_params": vectors[:1]}, str(folder / "badhands.safetensors"))
    sd.embeddings.dirs[:] = [folder]
    yield folder
    sd.embeddings.dirs[:] = []


def test_the_three_layouts_load_the_same_vectors(tmp_path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}}, tmp_path / "a.pt")
    save_file({"emb_params": vectors}, str(tmp_path / "b.safetensors"))
    torch.save({"<my-token>": vectors[0]}, tmp_path / "learned_embeds.bin")  # diffusers: one vector
    assert torch.equal(load_embedding(tmp_path / "a.pt").vectors, vectors)
    assert torch.equal(load_embedding(tmp_path / "b.safetensors").vectors, vectors)
    diffusers = load_embedding(tmp_path / "learned_embeds.bin")
    assert torch.equal(diffusers.vectors, vectors[:1]) and diffusers.name == "learned_embeds"


def text_encoder_with_new_tokens(sd, vectors, first_id):
    """The reference way: a copy of the encoder whose vocabulary holds the vectors at new ids."""
    encoder = copy.deepcopy(sd.text_encoder)
    with torch.no_grad():
        encoder.token_embedding.weight[first_id:first_id + len(vectors)] = vectors
    return encoder


def test_embedding_vectors_replace_the_name_in_the_prompt(sd, emb_dir, vectors):
    tok = sd.tokenizer
    context = sd.encode_prompt(["a shinystyle cat"])  # matched by tokens: case does not matter
    new_id = 40000  # ids taken over in the reference copy; none of them occur in the prompt
    ids = [tok.bos_token_id] + tok.encode("a") + [new_id, new_id + 1, new_id + 2] + tok.encode("cat") + \
        [tok.eos_token_id]
    ids += [tok.eos_token_id] * (77 - len(ids))
    with torch.no_grad():
        expected = text_encoder_with_new_tokens(sd, vectors, new_id)(torch.tensor([ids]))
    assert torch.allclose(context, expected, atol=1e-6)


def test_embeddings_in_negative_prompts_and_weights(sd, emb_dir):
    result = sd.generate("a cat", "(badhands:1.2)", steps=1, width=16, height=16, seed=1)
    assert "TI hashes" in result.infotexts[0]
    plain = sd.generate("a cat", "(badhands:1.2)", steps=1, width=16, height=16, seed=1)
    assert torch.equal(result.latents, plain.latents)
    sd.embeddings.dirs[:] = []
    assert not torch.equal(sd.generate("a cat", "(badhands:1.2)", steps=1, width=16, height=16, seed=1).latents,
                           result.latents)


def test_an_embedding_is_never_split_across_chunks(sd, emb_dir):
    matcher = EmbeddingMatcher(sd.tokenizer, sd.embeddings)
    chunks = split_into_chunks(" ".join(["cat"] * 73) + " shinystyle dog", sd.tokenizer, matcher)
    assert len(chunks) == 2
    assert chunks[0].fixes == [] and chunks[0].tokens[73:] == [sd.tokenizer.eos_token_id] * 2
    (position, embedding), = chunks[1].fixes
    assert position == 0 and embedding.name == "shinyStyle"
    assert chunks[1].tokens[3] == sd.tokenizer.encode("dog")[0]


def test_infotext_has_ti_hashes(sd, emb_dir):
    result = sd.generate("shinyStyle, a cat", "badhands", steps=1, width=16, height=16, seed=1)
    hashes = {name: hashlib.sha256((emb_dir / file).read_bytes()).hexdigest()[:10]
              for name, file in (("shinyStyle", "shinyStyle.pt"), ("badhands", "badhands.safetensors"))}
    assert f'TI hashes: "shinyStyle: {hashes["shinyStyle"]}, badhands: {hashes["badhands"]}"' in result.infotexts[0]


def test_wrong_width_is_refused_by_name(sd, tmp_path):
    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "sd2style.safetensors"))
    sd.embeddings.dirs[:] = [tmp_path]
    try:
        with pytest.raises(ValueError, match=r"embedding 'sd2style' \(sd2style.safetensors\) has vectors of width "
                                             r"1024, but this model's text encoder is 64 wide"):
            sd.encode_prompt(["a sd2style cat"])
        sd.encode_prompt(["a cat"])  # unused files are never read
    finally:
        sd.embeddings.dirs[:] = []


@pytest.mark.parametrize("content, message", [
    ({"clip_g": torch.zeros(1, 1280)}, "an SDXL embedding needs both"),  # whole SDXL files load since issue 20
    ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "neither an AUTOMATIC1111 embedding"),
])
def test_foreign_files_are_refused(tmp_path, content, message):
    save_file(content, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_embedding(tmp_path / "x.safetensors")


def test_pickles_holding_objects_are_refused(tmp_path):
    # old AUTOMATIC1111 files hold an nn.ParameterDict: a module, which a weights-only load refuses
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 64))})
    torch.save({"string_to_param": params}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="refused to load.*ParameterDict"):
        load_embedding(tmp_path / "old.pt")


def test_missing_embeddings_folder_is_refused(sd):
    with pytest.raises(ValueError, match="embeddings folder '/no/such' does not exist"):
        sd.embeddings.add_dir("/no/such")


def test_an_embedding_moved_to_the_next_chunk_at_a_comma_keeps_its_vectors(sd, emb_dir):
    matcher = EmbeddingMatcher(sd.tokenizer, sd.embeddings)
    # 60 cats, a comma, then the 3-vector embedding and dogs: the cut at 75 moves back to the comma
    chunks = split_into_chunks(" ".join(["cat"] * 60) + ", shinystyle " + " ".join(["dog"] * 20), sd.tokenizer,
                               matcher)
    assert chunks[0].fixes == [] and chunks[0].tokens[61:] == [sd.tokenizer.eos_token_id] * 14
    (position, embedding), = chunks[1].fixes
    assert position == 0 and embedding.name == "shinyStyle" and chunks[1].tokens[:3] == [0, 0, 0]

"""torchsd's T5 v1.1 encoder equals transformers' T5EncoderModel on the same random weights."""

import pytest
import torch

from reference import max_rel_error
from torchsd.checkpoints.t5 import config_to_transformers, from_transformers, to_transformers
from torchsd.config import T5Config
from torchsd.models.t5 import T5Encoder

TINY = T5Config(vocab_size=99, width=32, num_layers=3, num_heads=4, head_dim=12, ffn_dim=40, num_buckets=8,
                max_distance=20)


def transformers_t5(config: T5Config, seed: int = 0):
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(HFConfig(**config_to_transformers(config))).eval()
    with torch.no_grad():  # norms away from 1, every weight of a similar scale
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_transformers(with_mask):
    reference = transformers_t5(TINY)
    ours = T5Encoder(TINY).eval()
    ours.load_state_dict(from_transformers(reference.state_dict(), TINY), strict=True)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, TINY.vocab_size, (2, 37), generator=gen)  # offsets beyond max_distance too
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        theirs = reference(ids, attention_mask=mask if with_mask else None).last_hidden_state
        mine = ours(ids, attention_mask=mask if with_mask else None)
    assert mine.shape == (2, 37, TINY.width)
    assert max_rel_error(mine, theirs) < 1e-5


def test_keys_round_trip_and_errors_name_the_key():
    reference = transformers_t5(TINY)
    state = from_transformers(reference.state_dict(), TINY)
    back = to_transformers(state, TINY)
    assert set(back) | {"encoder.embed_tokens.weight"} == set(reference.state_dict())
    bad = dict(reference.state_dict())
    bad.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    with pytest.raises(ValueError, match="wo.weight"):
        from_transformers(bad, TINY)
    bad = dict(reference.state_dict())
    bad["encoder.final_layer_norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="final_layer_norm"):
        from_transformers(bad, TINY)


def test_xxl_preset_parameter_count_equals_transformers():
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    config = T5Config.xxl()
    with torch.device("meta"):
        ours = T5Encoder(config)
        theirs = T5EncoderModel(HFConfig(**config_to_transformers(config)))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == 4_762_310_656  # google/t5-v1_1-xxl's encoder


def test_bad_config_says_how_to_fix_it():
    with pytest.raises(ValueError, match="multiple of 4"):
        T5Config(num_buckets=30)


PROMPTS = ["a cat riding the moon, zebra!", "", "A Photo  of a horse on a red chair at dawn; an astronaut " * 3,
           "ÄÖ ﬁ ½ unknown 🙂 words"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A tiny SentencePiece-style Unigram model trained here, saved as tokenizer.json (T5's layout: <pad> 0,
    </s> 1, <unk> 2, Metaspace pieces, NFKC, "$A </s>" post-processing)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    text = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
            "a watercolor painting of mountains at dawn", "zebra stripes and photos of horses"] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("t5tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("max_length", [8, 32])
def test_tokenizer_ids_equal_transformers(tokenizer_file, max_length):
    from transformers import T5TokenizerFast

    from torchsd.text.t5_tokenizer import T5Tokenizer

    reference = T5TokenizerFast(tokenizer_file=str(tokenizer_file), extra_ids=0)
    expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids
    ours = T5Tokenizer(tokenizer_file.parent, max_length=max_length)
    assert torch.equal(ours(PROMPTS), expected)
    assert (ours.pad_token_id, ours.eos_token_id) == (0, 1)


def test_tokenizer_missing_file_says_how_to_convert(tmp_path):
    from torchsd.text.t5_tokenizer import T5Tokenizer

    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        T5Tokenizer(tmp_path)


def test_bfloat16_runs_close_to_float32():
    import copy

    from reference import _perturb

    model = T5Encoder(TINY).eval()
    _perturb(model, 0, scale=0.1)
    ids = torch.randint(0, TINY.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, half = model(ids), copy.deepcopy(model).bfloat16()(ids)
    assert half.dtype == torch.bfloat16 and max_rel_error(half, full) < 5e-2

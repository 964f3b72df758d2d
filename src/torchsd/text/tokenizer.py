"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with the vocabulary shipped as package data.

Text is cleaned (ftfy, whitespace, lower case), split by a regex into words, each word's UTF-8 bytes are
mapped to printable characters, and byte pairs are merged by rank; a word ends with ``</w>``.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from importlib import resources
from pathlib import Path

import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # merges are lines 1 … 48894 of the file (line 0 is a version header)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters (no whitespace or
    control characters, so BPE never has to merge across them)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_text(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """``tokenizer(["a cat", ...]) -> LongTensor (B, max_length)``: BOS, up to max_length-2 tokens, EOS, pad."""

    def __init__(self, merges: list[tuple[str, str]] | None = None, *, pad_token_id: int = 49407,
                 max_length: int = 77):
        if merges is None:
            merges = load_merges()
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merges = merges
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = self.encoder[BOS]
        self.eos_token_id = self.encoder[EOS]
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = self.merges[rank]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        ids = []
        for word in _SPLIT.findall(clean_text(text)):
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(chars))
        return ids

    def decode(self, ids: list[int]) -> str:
        raw = bytearray()
        for i in ids:
            if i in (self.bos_token_id, self.eos_token_id):
                continue
            token = self.decoder[i]
            word_end = token.endswith("</w>")
            raw.extend(self.byte_decoder[c] for c in token.removesuffix("</w>"))
            if word_end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def pad(self, ids: list[int], length: int | None = None) -> list[int]:
        """BOS + ids (truncated) + EOS, padded to ``length``."""
        length = length or self.max_length
        ids = [self.bos_token_id] + ids[: length - 2] + [self.eos_token_id]
        return ids + [self.pad_token_id] * (length - len(ids))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.pad(self.encode(t)) for t in texts], dtype=torch.long)

    # --- the files of transformers' CLIPTokenizer (diffusers' tokenizer/ folder) -------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n",
                                           encoding="utf-8")
        pad = self.decoder[self.pad_token_id]
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "bos_token": BOS,
             "eos_token": EOS, "unk_token": EOS, "pad_token": pad, "do_lower_case": True}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Read a tokenizer/ folder. Its merges must be CLIP's: ids are then laid out as CLIP lays them."""
        folder = Path(folder)
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        tok = cls(merges)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if vocab != tok.encoder:
            raise ValueError(f"{folder}: vocab.json does not match the CLIP byte-level BPE layout of merges.txt; "
                             "torchsd reads CLIP tokenizers only")
        special = json.loads((folder / "special_tokens_map.json").read_text()) \
            if (folder / "special_tokens_map.json").exists() else {}
        pad = special.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad
        config = json.loads((folder / "tokenizer_config.json").read_text()) \
            if (folder / "tokenizer_config.json").exists() else {}
        tok.pad_token_id = tok.encoder.get(pad, tok.eos_token_id)
        tok.max_length = min(int(config.get("model_max_length", 77)), 77)
        return tok


@functools.lru_cache(maxsize=1)
def load_merges() -> list[tuple[str, str]]:
    data = resources.files("torchsd.assets").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1: NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]

"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with the vocabulary shipped as package data.

Text is cleaned (ftfy, whitespace, lower case), split by a regex into words, each word's UTF-8 bytes are
mapped to printable characters, and byte pairs are merged by rank; a word ends with ``</w>``.

A tokenizer read from a diffusers ``tokenizer/`` folder also has the folder's added tokens: its special
tokens (BOS, EOS, pad, unk) and any tokens added to it (textual inversion). transformers cuts these out
of the text before BPE, so SD 2's pad token "!" is always the single token 0 there ("wow!!" is wow, !, !);
torchsd does the same for a tokenizer read from files. Every layout transformers has written is read:
``vocab.json`` + ``merges.txt`` (+ ``added_tokens.json``), or ``tokenizer.json``; special tokens from
``special_tokens_map.json`` or ``tokenizer_config.json``.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # merges are lines 1 … 48894 of the file (line 0 is a version header)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# the names transformers gives the special tokens in its files, and CLIPTokenizer's defaults for them
SPECIAL_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}

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


@dataclass(frozen=True)
class AddedToken:
    """A token cut out of the text before BPE, as transformers' added and special tokens are: a
    ``normalized`` one is matched in the cleaned, lower-cased text, the others in the text as written."""

    content: str
    id: int
    normalized: bool = False
    special: bool = True


class CLIPTokenizer:
    """``tokenizer(["a cat", ...]) -> LongTensor (B, max_length)``: BOS, up to max_length-2 tokens, EOS, pad."""

    def __init__(self, merges: list[tuple[str, str]] | None = None, *, pad_token_id: int = 49407,
                 max_length: int = 77, added_tokens: Sequence[AddedToken] = (), bos_token: str = BOS,
                 eos_token: str = EOS):
        if merges is None:
            merges = load_merges()
        vocab = clip_vocabulary(merges)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.added_tokens = tuple(added_tokens)
        for token in self.added_tokens:
            if self.encoder.setdefault(token.content, token.id) != token.id:
                raise ValueError(f"added token {token.content!r} has id {token.id}, but the vocabulary gives it "
                                 f"{self.encoder[token.content]}")
            self.decoder.setdefault(token.id, token.content)
        self._added_ids = {t.id for t in self.added_tokens if t.id >= len(vocab)}
        self._raw_split = _alternation([t.content for t in self.added_tokens if not t.normalized])
        self._cleaned_split = _alternation([clean_text(t.content) for t in self.added_tokens if t.normalized])
        self.merges = merges
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = self.encoder[bos_token]
        self.eos_token_id = self.encoder[eos_token]
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
        for piece, is_added in _cut(text, self._raw_split):
            if is_added:
                ids.append(self.encoder[piece])
                continue
            for part, is_added in _cut(clean_text(piece), self._cleaned_split):
                ids.extend([self.encoder[part]] if is_added else self._encode_words(part))
        return ids

    def _encode_words(self, text: str) -> list[int]:
        ids = []
        for word in _SPLIT.findall(text):
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(chars))
        return ids

    def decode(self, ids: list[int]) -> str:
        raw = bytearray()
        for i in ids:
            if i in (self.bos_token_id, self.eos_token_id):
                continue
            token = self.decoder[i]
            if i in self._added_ids:  # added tokens are text, not byte-level symbols
                raw.extend(token.encode("utf-8") + b" ")
                continue
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
        """Every file transformers has read a CLIP tokenizer from, so that each version finds its own:
        ``vocab.json`` + ``merges.txt`` (transformers 4's CLIPTokenizer), ``tokenizer.json`` (the fast
        tokenizer and transformers 5), ``special_tokens_map.json`` + ``tokenizer_config.json``, and
        ``added_tokens.json`` when tokens were added beyond the vocabulary."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base = {token: i for token, i in self.encoder.items() if i not in self._added_ids}
        (folder / "vocab.json").write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n",
                                           encoding="utf-8")
        special = {"bos_token": self.decoder[self.bos_token_id], "eos_token": self.decoder[self.eos_token_id],
                   "unk_token": EOS, "pad_token": self.decoder[self.pad_token_id]}
        (folder / "tokenizer.json").write_text(json.dumps(self._tokenizer_json(base, special), ensure_ascii=False),
                                               encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special,
             "do_lower_case": True}, ensure_ascii=False), encoding="utf-8")
        extra = {t.content: t.id for t in self.added_tokens if t.id in self._added_ids}
        if extra:
            (folder / "added_tokens.json").write_text(json.dumps(extra, ensure_ascii=False), encoding="utf-8")

    def _tokenizer_json(self, vocab: dict[str, int], special: dict[str, str]) -> dict:
        """The ``tokenizers`` library's serialization of this tokenizer (merges as "a b" strings, which every
        version of it reads; newer ones write [a, b] pairs)."""
        added = {t.id: t for t in self.added_tokens}
        for name in ("pad_token", "bos_token", "eos_token"):  # special tokens are cut out of the text
            token_id = self.encoder[special[name]]
            added.setdefault(token_id, AddedToken(special[name], token_id))
        split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": t.normalized, "special": t.special} for _, t in sorted(added.items())],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": split}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
            "post_processor": {"type": "RobertaProcessing", "sep": [EOS, self.eos_token_id],
                               "cls": [BOS, self.bos_token_id], "trim_offsets": False, "add_prefix_space": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": EOS, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": [" ".join(m) for m in self.merges]},
        }

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Read a tokenizer/ folder in any layout transformers has written (see the module's docstring).
        Its merges must be CLIP's: ids are then laid out as CLIP lays them. Raises ``ValueError`` naming the
        file for anything it cannot read."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder; a diffusers model keeps its tokenizer files there")
        config = _read_json_file(folder / "tokenizer_config.json")
        # transformers 4 wrote the special tokens to both files and let special_tokens_map.json win
        special = {name: config.get(name, default) for name, default in SPECIAL_DEFAULTS.items()}
        special |= {name: value for name, value in _read_json_file(folder / "special_tokens_map.json").items()
                    if name in SPECIAL_DEFAULTS and value is not None}
        vocab, merges, added, source = _read_vocabulary(folder, {_content(v) for v in special.values()})
        added = _added_from_config(config, folder / "tokenizer_config.json") | added
        known = {t.content: t.id for t in added.values()} | vocab
        for name, value in special.items():  # transformers cuts every special token out of the text
            if _content(value) not in known:
                raise ValueError(f"{folder}: the {name} {_content(value)!r} is neither in {source} nor an added "
                                 f"token; these files are not a CLIP tokenizer torchsd can read")
            token_id = known[_content(value)]
            normalized = isinstance(value, dict) and bool(value.get("normalized", False))
            added.setdefault(token_id, AddedToken(_content(value), token_id, normalized=normalized))
        special = {name: _content(value) for name, value in special.items()}
        layout = {token: i for i, token in enumerate(clip_vocabulary(merges))}
        if {token: i for token, i in vocab.items() if i < len(layout)} != layout:
            raise ValueError(f"{folder}: the vocabulary in {source} does not match the CLIP byte-level BPE layout of "
                             f"its merges; torchsd reads CLIP tokenizers only")
        try:
            tok = cls(merges, added_tokens=sorted(added.values(), key=lambda t: t.id),
                      bos_token=special["bos_token"], eos_token=special["eos_token"])
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        tok.pad_token_id = tok.encoder[special["pad_token"]]
        tok.max_length = min(int(config.get("model_max_length", 77)), 77)
        return tok


def clip_vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's tokens in id order: the 256 byte symbols, the same ending a word, one per merge, BOS, EOS."""
    byte_chars = list(bytes_to_unicode().values())
    return byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]


def _alternation(contents: list[str]) -> "regex.Pattern | None":
    """One pattern matching any of ``contents``, longest first (as transformers matches added tokens)."""
    contents = sorted({c for c in contents if c}, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(c) for c in contents) + ")") if contents else None


def _cut(text: str, pattern: "regex.Pattern | None") -> Iterator[tuple[str, bool]]:
    """``text`` as (piece, is an added token) in order."""
    if pattern is None:
        yield text, False
        return
    for i, piece in enumerate(pattern.split(text)):
        if piece:
            yield piece, i % 2 == 1


def _read_json_file(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _content(value: object) -> str:
    """A special token as the files write it: a string, or an AddedToken dict with its ``content``."""
    return value["content"] if isinstance(value, dict) else str(value)


def _read_vocabulary(folder: Path, special: set[str]
                     ) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, AddedToken], str]:
    """(vocab, merges, added tokens by id, the file they came from) from tokenizer.json when there is one
    (transformers prefers it too), else from vocab.json + merges.txt (+ added_tokens.json). ``special``:
    the special tokens' contents."""
    if (folder / "tokenizer.json").is_file():
        return _read_tokenizer_json(folder / "tokenizer.json")
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(f"{folder}: no tokenizer files; expected tokenizer.json (as transformers 5 writes it) or "
                         f"vocab.json and merges.txt (earlier versions). The folder holds: {there}")
    vocab = _read_json_file(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [_merge(line, folder / "merges.txt") for line in lines if line.strip() and not line.startswith("#version")]
    added = {}
    for content, token_id in _read_json_file(folder / "added_tokens.json").items():
        # transformers' rule for this legacy file: a special token is matched as written, the rest normalized
        is_special = content in special
        added[int(token_id)] = AddedToken(content, int(token_id), normalized=not is_special, special=is_special)
    return vocab, merges, added, "vocab.json"


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, AddedToken], str]:
    data = _read_json_file(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{path}: not a CLIP tokenizer: model.type must be \"BPE\" with end_of_word_suffix "
                         f"\"</w>\"; torchsd reads CLIP tokenizers only")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{path}: model.vocab (a token -> id object) or model.merges (a list) is missing")
    # merges are "a b" strings in files from tokenizers < 0.20 and [a, b] pairs in newer ones
    merges = [_merge(m, path) for m in model["merges"]]
    added = {}
    for entry in data.get("added_tokens") or []:
        try:
            added[int(entry["id"])] = AddedToken(entry["content"], int(entry["id"]),
                                                 normalized=bool(entry.get("normalized", not entry.get("special"))),
                                                 special=bool(entry.get("special", False)))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: an added_tokens entry lacks its id or content: {entry!r}") from None
    return model["vocab"], merges, added, "tokenizer.json"


def _merge(entry: object, path: Path) -> tuple[str, str]:
    parts = entry.split(" ") if isinstance(entry, str) else entry
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{path}: a merge must be two tokens (\"a b\" or [\"a\", \"b\"]); found {entry!r}")
    return parts[0], parts[1]


def _added_from_config(config: dict, path: Path) -> dict[int, AddedToken]:
    """``added_tokens_decoder`` of tokenizer_config.json (transformers >= 4.34): {id: AddedToken dict}."""
    added = {}
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            added[int(token_id)] = AddedToken(entry["content"], int(token_id),
                                              normalized=bool(entry.get("normalized", not entry.get("special"))),
                                              special=bool(entry.get("special", False)))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: added_tokens_decoder entry {token_id!r} is not an id with a content") from None
    return added


@functools.lru_cache(maxsize=1)
def load_merges() -> list[tuple[str, str]]:
    data = resources.files("torchsd.assets").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1: NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]

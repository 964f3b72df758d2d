"""T5's SentencePiece Unigram tokenizer, read from the ``tokenizer.json`` that diffusers folders ship
(SD 3.5's ``tokenizer_3/``, FLUX.1's ``tokenizer_2/``) through the ``tokenizers`` package.

Why a dependency here when CLIP's BPE is written out in ``tokenizer.py``: Unigram segmentation is a Viterbi
search over a scored vocabulary with SentencePiece's normalisation rules (NFKC, precompiled character maps)
serialised inside the file; reproducing those byte for byte is a project of its own, and ``tokenizers`` is
the library transformers' fast tokenizer runs, so its ids are transformers' ids by construction. It is
imported only when a T5 tokenizer is built. A folder with only ``spiece.model`` (SentencePiece's protobuf)
needs converting once: ``transformers.T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)``.

Prompts are encoded as transformers pads them for SD 3.5 and FLUX.1: the pieces, cut to ``max_length - 1``,
then ``</s>``, then ``<pad>`` up to ``max_length`` (256 for SD 3.5 and FLUX.1-schnell, 512 for -dev).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


class T5Tokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int = 256):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("reading T5's tokenizer needs the 'tokenizers' package: pip install tokenizers") \
                from None
        path = Path(tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            spiece = path.parent / "spiece.model"
            hint = (f" (found {spiece}: convert it once with transformers' "
                    "T5TokenizerFast.from_pretrained(folder).save_pretrained(folder))") if spiece.is_file() else ""
            raise FileNotFoundError(f"no T5 tokenizer.json at {path}{hint}")
        if max_length < 1:
            raise ValueError(f"T5Tokenizer max_length must be positive; got {max_length}")
        self.backend = Tokenizer.from_file(str(path))
        self.max_length = max_length
        self.eos_token_id = self._id("</s>", path)
        self.pad_token_id = self._id("<pad>", path)

    def _id(self, token: str, path: Path) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{path} is not a T5 tokenizer: it has no {token!r} token")
        return token_id

    def encode(self, prompt: str) -> list[int]:
        """The pieces' ids, then ``</s>``, unpadded and uncut."""
        return self.backend.encode(prompt, add_special_tokens=False).ids + [self.eos_token_id]

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, max_length) token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            ids = self.backend.encode(prompt, add_special_tokens=False).ids[:self.max_length - 1]
            ids.append(self.eos_token_id)
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

"""Prompts -> text context for the U-Net, as AUTOMATIC1111 builds it.

The CLIP text encoder sees 77 positions: BOS + 75 tokens + EOS. A longer prompt is cut into chunks of 75
tokens (at the last comma when one is within 20 tokens of the cut, and at every BREAK); each chunk is
encoded on its own and the results are concatenated along the sequence, giving (1, 77·k, width).
Attention weights multiply each token's output vector, then the whole chunk is rescaled so that its mean
equals the unweighted mean. Textual-inversion embeddings replace the token vectors of their name at the
encoder input and are never split across chunks.

A prompt of at most 75 tokens without weights is exactly one plain encoder call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.clip import CLIPTextModel
from .embedding import Embedding, EmbeddingSource
from .prompts import parse_prompt_attention
from .tokenizer import CLIPTokenizer

CHUNK_LENGTH = 75  # tokens between BOS and EOS
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default: a cut moves back to a comma at most this many tokens away


@dataclass
class PromptChunk:
    """75 token ids with their weights; ``fixes`` are (position, embedding) of embeddings to splice in."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


class EmbeddingMatcher:
    """Finds embedding names in a token sequence; longer names win where several start at one token."""

    def __init__(self, tokenizer: CLIPTokenizer, library: EmbeddingSource | None):
        self.library = library
        self.by_first_token: dict[int, list[tuple[list[int], str, object]]] = {}
        if library is None:
            return
        for name, path in library.files().items():
            ids = tokenizer.encode(name)
            if ids:
                self.by_first_token.setdefault(ids[0], []).append((ids, name, path))
        for candidates in self.by_first_token.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def match(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        for ids, name, path in self.by_first_token.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return self.library.load(name, path), len(ids)
        return None


def split_into_chunks(prompt: str, tokenizer: CLIPTokenizer, matcher: EmbeddingMatcher | None = None,
                      comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """Parse the attention syntax and pack the tokens into chunks of exactly 75 (padded with EOS)."""
    comma = tokenizer.encoder[",</w>"]
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        missing = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens += [tokenizer.eos_token_id] * missing
        chunk.weights += [1.0] * missing
        chunks.append(chunk)
        chunk, last_comma = PromptChunk(), -1

    for fragment in parse_prompt_attention(prompt):
        if fragment.is_break:
            close_chunk()
            continue
        tokens = tokenizer.encode(fragment.text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                # the chunk is full and a comma is near: move the words after it to the next chunk
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                moved_fixes = [(p - cut, e) for p, e in chunk.fixes if p >= cut]  # embeddings move along
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.fixes = [(p, e) for p, e in chunk.fixes if p < cut]
                close_chunk()
                chunk.tokens, chunk.weights, chunk.fixes = moved_tokens, moved_weights, moved_fixes
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()

            found = matcher.match(tokens, position) if matcher is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(fragment.weight)
                position += 1
                continue
            embedding, name_length = found
            if embedding.num_vectors > CHUNK_LENGTH:
                raise ValueError(f"embedding {embedding.name!r} has {embedding.num_vectors} vectors, more than "
                                 f"the {CHUNK_LENGTH} one prompt chunk holds")
            if len(chunk.tokens) + embedding.num_vectors > CHUNK_LENGTH:
                close_chunk()  # an embedding is never split across chunks
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.num_vectors  # placeholders: their vectors are replaced
            chunk.weights += [fragment.weight] * embedding.num_vectors
            position += name_length

    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77·k, width)
    embeddings: list[Embedding]  # the embeddings the prompts used, in order of first use
    pooled: torch.Tensor | None = None  # SDXL: the last encoder's projected pooled output of the first chunk


def encode_chunk(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, chunk: PromptChunk, clip_skip: int,
                 device: torch.device) -> torch.Tensor:
    """One chunk -> (1, 77, width): BOS + tokens + EOS, embeddings spliced in, weights applied."""
    token_ids, token_embeddings = chunk_input(text_encoder, tokenizer, chunk, tokenizer.pad_token_id, device)
    z = text_encoder(token_ids, clip_skip=clip_skip, token_embeddings=token_embeddings)
    return apply_weights(z, chunk)


def chunk_input(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, chunk: PromptChunk, pad_token_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's input for one chunk: token ids (1, 77), and token vectors where embeddings are spliced in."""
    ids = [tokenizer.bos_token_id] + chunk.tokens + [tokenizer.eos_token_id]
    if pad_token_id != tokenizer.eos_token_id:  # SD 2 and SDXL's bigG pad with 0 after the first end token
        first_end = ids.index(tokenizer.eos_token_id)
        ids = ids[:first_end + 1] + [pad_token_id] * (len(ids) - first_end - 1)
    token_ids = torch.tensor([ids], device=device)
    token_embeddings = None
    if chunk.fixes:
        token_embeddings = text_encoder.token_embedding(token_ids).clone()
        for position, embedding in chunk.fixes:
            vectors = embedding.vectors_for(token_embeddings.shape[-1])
            if vectors is None:
                raise ValueError(f"embedding {embedding.name!r} ({embedding.path.name}) has vectors of width "
                                 f"{' and '.join(map(str, embedding.widths))}, but this model's text encoder is "
                                 f"{token_embeddings.shape[-1]} wide: it was made for another model family (SD 1.x "
                                 f"is 768, SD 2.x is 1024, SDXL files hold 768 and 1280)")
            start = position + 1  # after BOS
            token_embeddings[0, start:start + embedding.num_vectors] = vectors.to(token_embeddings)
    return token_ids, token_embeddings


def apply_weights(z: torch.Tensor, chunk: PromptChunk) -> torch.Tensor:
    """Each token's output times its weight, then the chunk rescaled to its unweighted mean."""
    weights = [1.0] + chunk.weights + [1.0]
    if any(w != 1.0 for w in weights):
        original_mean = z.float().mean()
        z = z * torch.tensor(weights, device=z.device, dtype=z.dtype)[None, :, None]
        z = z * (original_mean / z.float().mean()).to(z.dtype)
    return z


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str], clip_skip: int,
                   embeddings: EmbeddingSource | None = None, device: torch.device | None = None) -> Conditioning:
    """Each distinct prompt is encoded once; prompts of fewer chunks are padded with empty-prompt chunks
    (what AUTOMATIC1111 does within a batch) so that the batch has one sequence length. ``device``: where
    the encoder runs, by default where its weights are (under offload they wait in CPU memory)."""
    device = device or next(text_encoder.parameters()).device
    matcher = EmbeddingMatcher(tokenizer, embeddings) if embeddings is not None and embeddings.dirs else None
    encoded: dict[str, torch.Tensor] = {}
    used: dict[str, Embedding] = {}
    for prompt in dict.fromkeys(prompts):
        chunks = split_into_chunks(prompt, tokenizer, matcher)
        for chunk in chunks:
            for _, embedding in chunk.fixes:
                used.setdefault(embedding.name, embedding)
        encoded[prompt] = torch.cat([encode_chunk(text_encoder, tokenizer, c, clip_skip, device) for c in chunks],
                                    dim=1)
    longest = max(z.shape[1] for z in encoded.values())
    if any(z.shape[1] != longest for z in encoded.values()):
        empty = encode_chunk(text_encoder, tokenizer, split_into_chunks("", tokenizer)[0], clip_skip, device)
        for prompt, z in encoded.items():
            missing = (longest - z.shape[1]) // empty.shape[1]
            encoded[prompt] = torch.cat([z] + [empty] * missing, dim=1)
    return Conditioning(torch.cat([encoded[p] for p in prompts]), list(used.values()))


def encode_chunk_sdxl(text_encoders: tuple[CLIPTextModel, ...], tokenizer: CLIPTokenizer, chunk: PromptChunk,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: one chunk through every encoder (each padded as its config says), each one's penultimate states
    weighted on their own as AUTOMATIC1111 does, concatenated per token -> (1, 77, sum of widths); and the
    last encoder's projected pooled output (1, projection_dim), which weights do not touch."""
    states, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        token_ids, token_embeddings = chunk_input(encoder, tokenizer, chunk, encoder.config.pad_token_id, device)
        last = i == len(text_encoders) - 1
        hidden, pooled_output = encoder.penultimate(token_ids, token_embeddings, pooled=last)
        states.append(apply_weights(hidden, chunk))
        pooled = pooled_output if last else pooled
    return torch.cat(states, dim=-1), pooled


def encode_prompts_sdxl(text_encoders: tuple[CLIPTextModel, ...], tokenizer: CLIPTokenizer, prompts: list[str],
                        embeddings: EmbeddingSource | None = None, device: torch.device | None = None
                        ) -> Conditioning:
    """``encode_prompts`` for SDXL: long prompts in 75-token chunks through both encoders, the pooled output
    from each prompt's first chunk (AUTOMATIC1111's choice)."""
    device = device or next(text_encoders[0].parameters()).device
    matcher = EmbeddingMatcher(tokenizer, embeddings) if embeddings is not None and embeddings.dirs else None
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: dict[str, Embedding] = {}
    for prompt in dict.fromkeys(prompts):
        chunks = split_into_chunks(prompt, tokenizer, matcher)
        for chunk in chunks:
            for _, embedding in chunk.fixes:
                used.setdefault(embedding.name, embedding)
        parts = [encode_chunk_sdxl(text_encoders, tokenizer, c, device) for c in chunks]
        encoded[prompt] = torch.cat([z for z, _ in parts], dim=1), parts[0][1]
    longest = max(z.shape[1] for z, _ in encoded.values())
    if any(z.shape[1] != longest for z, _ in encoded.values()):
        empty, _ = encode_chunk_sdxl(text_encoders, tokenizer, split_into_chunks("", tokenizer)[0], device)
        for prompt, (z, pooled) in encoded.items():
            encoded[prompt] = torch.cat([z] + [empty] * ((longest - z.shape[1]) // empty.shape[1]), dim=1), pooled
    return Conditioning(torch.cat([encoded[p][0] for p in prompts]), list(used.values()),
                        torch.cat([encoded[p][1] for p in prompts]))

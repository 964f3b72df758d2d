"""T5 encoder weights between torchsd's names and transformers' ``T5EncoderModel`` (what diffusers folders
hold in text_encoder_3/ and FLUX.1's text_encoder_2/), with exact key and shape checks."""

from __future__ import annotations

import torch

from ..config import T5Config

_BLOCK = [  # torchsd suffix, transformers suffix inside encoder.block.N.
    ("attention_norm.weight", "layer.0.layer_norm.weight"),
    ("attention.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attention.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attention.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attention.o.weight", "layer.0.SelfAttention.o.weight"),
    ("ffn_norm.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.up.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.down.weight", "layer.1.DenseReluDense.wo.weight"),
]
_TOP = [
    ("token_embedding.weight", "shared.weight"),
    ("relative_attention_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("final_norm.weight", "encoder.final_layer_norm.weight"),
]


def key_map(config: T5Config) -> dict[str, str]:
    """torchsd name -> transformers name, for every parameter."""
    names = dict(_TOP)
    for i in range(config.num_layers):
        names.update({f"blocks.{i}.{ours}": f"encoder.block.{i}.{theirs}" for ours, theirs in _BLOCK})
    return names


def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    inner, c = config.num_heads * config.head_dim, config
    block = {"attention_norm.weight": (c.width,), "attention.q.weight": (inner, c.width),
             "attention.k.weight": (inner, c.width), "attention.v.weight": (inner, c.width),
             "attention.o.weight": (c.width, inner), "ffn_norm.weight": (c.width,),
             "ffn.gate.weight": (c.ffn_dim, c.width), "ffn.up.weight": (c.ffn_dim, c.width),
             "ffn.down.weight": (c.width, c.ffn_dim)}
    shapes = {"token_embedding.weight": (c.vocab_size, c.width),
              "relative_attention_bias.weight": (c.num_buckets, c.num_heads), "final_norm.weight": (c.width,)}
    for i in range(c.num_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def from_transformers(state: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
    """transformers' T5EncoderModel state dict -> torchsd's. ``encoder.embed_tokens.weight`` (tied to
    ``shared``) is accepted in place of or beside ``shared.weight``; any other stray or missing key, or a
    wrong shape, is an error that names it."""
    state = dict(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.pop("encoder.embed_tokens.weight", None)
    inverse = {theirs: ours for ours, theirs in key_map(config).items()}
    missing = sorted(set(inverse) - set(state))
    unexpected = sorted(set(state) - set(inverse))
    if missing or unexpected:
        raise ValueError(f"T5 encoder weights do not match T5Config(num_layers={config.num_layers}): "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    shapes = expected_shapes(config)
    out = {}
    for theirs, ours in inverse.items():
        if tuple(state[theirs].shape) != shapes[ours]:
            raise ValueError(f"T5 weight {theirs} has shape {tuple(state[theirs].shape)}; "
                             f"T5Config gives {shapes[ours]}")
        out[ours] = state[theirs]
    return out


def to_transformers(state: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
    names = key_map(config)
    if set(state) != set(names):
        raise ValueError(f"not a torchsd T5 encoder state dict: {sorted(set(state) ^ set(names))[:5]}")
    return {names[k]: v for k, v in state.items()}


def config_to_transformers(config: T5Config) -> dict:
    return dict(vocab_size=config.vocab_size, d_model=config.width, d_kv=config.head_dim, d_ff=config.ffn_dim,
                num_layers=config.num_layers, num_heads=config.num_heads,
                relative_attention_num_buckets=config.num_buckets,
                relative_attention_max_distance=config.max_distance, layer_norm_epsilon=config.norm_eps,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False)



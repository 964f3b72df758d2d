"""Watch one generation of a flow-matching model (SD 3 / 3.5, FLUX.1): what ``trace.py`` does for the U-Net,
through the same explicit hooks and the same ``Explanation``.

There is no cross-attention in these transformers: text and image tokens attend jointly, over their
concatenation. The part that plays cross-attention's role is one block of the joint attention matrix: the
image-patch queries' weights on the text keys. ``watch_joint_attention`` hooks every joint attention (MMDiT's
joint blocks, FLUX.1's double- and single-stream blocks), takes the q and k each block's projections return
(after QK-norm; FLUX.1's rotary positions applied as its attention applies them) and computes
softmax(q k^T / sqrt(d)) over all keys, text and image, keeping the image rows and text columns. Those rows
do not sum to one: the rest of each patch's attention goes to image keys. MMDiT-X's second, image-only
attention has no text keys and is left out.

What the run shows comes from ``callback`` (each sampler ``Step``), ``observer`` (each guided call's two
halves) and the pipeline's own stages (``encode_image``, ``decode_latents``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..images import pil_to_tensor
from ..models.flux import DoubleBlock, SingleBlock
from ..models.mmdit import JointBlock, apply_rope
from ..noise import make_generators, randn
from ..pipeline import GenerationRequest
from ..pipeline.flow_run import FLOW_SAMPLERS, resolve
from .trace import FORWARD_TIMESTEPS, Explanation, GuidanceRecord, NoisedLatent, StepRecord, _decode_snapshots

Record = Callable[[str, torch.Tensor, int, int], None]


def image_text_attention(q_image: torch.Tensor, keys: torch.Tensor, text: slice) -> torch.Tensor:
    """q_image (N, heads, d), keys (T, heads, d) -> (N, L): softmax over all T keys per head, the ``text``
    columns kept, averaged over heads. One head at a time: (N, T) scores per head, never all heads at once."""
    N, heads, d = q_image.shape
    total = None
    for h in range(heads):
        scores = q_image[:, h].float() @ keys[:, h].float().T / math.sqrt(d)  # (N, T)
        part = scores.softmax(dim=-1)[:, text]
        total = part if total is None else total + part
    return total / heads


@contextmanager
def watch_joint_attention(transformer: torch.nn.Module, record: Record) -> Iterator[None]:
    """Inside the block, each joint attention of ``transformer`` hands ``record`` its block's name, the image
    queries' attention on the text keys (N, L) of the last batch row (the prompt's, under guidance: the rows are
    [uncond, cond]) averaged over heads, and the patch grid's height and width. Calls that skip blocks
    (skip-layer guidance's extra call) are not recorded. Hooks are removed on exit."""
    call: dict = {}
    handles = []

    def on_call(module, args, kwargs) -> None:
        x = args[0] if args else kwargs["x"]
        context = args[2] if len(args) > 2 else kwargs["context"]
        p = transformer.config.patch_size
        call.update(text=context.shape[1], grid=(x.shape[-2] // p, x.shape[-1] // p),
                    skipping=bool(kwargs.get("skip_blocks")))

    handles.append(transformer.register_forward_pre_hook(on_call, with_kwargs=True))
    for name, block in transformer.named_modules():
        if isinstance(block, (JointBlock, DoubleBlock)):
            streams = {"image": block.image.attn, "text": block.text.attn}
        elif isinstance(block, SingleBlock):
            streams = {"all": block.attn}  # text tokens first, then the image's
        else:
            continue
        seen: dict = {}
        for stream, qkv in streams.items():
            handles.append(qkv.register_forward_hook(
                lambda m, args, out, stream=stream, seen=seen: seen.__setitem__(stream, (out[0][-1], out[1][-1]))))
        rotary = isinstance(block, (DoubleBlock, SingleBlock))  # FLUX.1's blocks take the rotations last

        def remember_rope(module, args, seen=seen, rotary=rotary) -> None:
            seen.clear()
            seen["rope"] = args[-1] if rotary else None

        def done(module, args, out, name=name, seen=seen) -> None:
            if not call.get("skipping"):
                record(name, _text_attention(seen, call["text"]), *call["grid"])
            seen.clear()

        handles.append(block.register_forward_pre_hook(remember_rope))
        handles.append(block.register_forward_hook(done))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _text_attention(seen: dict, L: int) -> torch.Tensor:
    """(N, L) from one block's q and k (each (T, heads, d), the last batch row)."""
    rope = seen["rope"]
    if "all" in seen:  # FLUX.1 single-stream: [text, image] in one sequence
        q, k = seen["all"]
    elif rope is not None:  # FLUX.1 double-stream: rotated as the concatenation [text, image]
        q, k = (torch.cat([seen["text"][i], seen["image"][i]]) for i in range(2))
    else:  # MMDiT: no positions in attention; the keys' order does not change the softmax
        q = torch.cat([seen["text"][0], seen["image"][0]])
        k = torch.cat([seen["text"][1], seen["image"][1]])
    if rope is not None:
        q, k = apply_rope(q[None], rope)[0], apply_rope(k[None], rope)[0]
    return image_text_attention(q[L:], k, slice(0, L)).cpu()


def prompt_tokens(pipe, prompt: str, limit: int) -> tuple[list[str], list[int]]:
    """Labels and context positions of the tokens shown: SD 3's context is CLIP's 77 positions, then T5's;
    FLUX.1's is T5's. CLIP: the start token, the first words, the end token; T5: the first pieces and ``</s>``."""
    tokens, positions = [], []
    offset = 0
    if pipe.family == "sd3":
        clip = pipe.tokenizers["clip_l"]
        ids = clip.encode(prompt)[: clip.max_length - 2]
        shown = list(range(1, 1 + min(len(ids), max(limit - 2, 0))))
        tokens += ["CLIP <start>"] + [f"CLIP {clip.decode([ids[p - 1]]) or '?'}" for p in shown] + ["CLIP <end>"]
        positions += [0] + shown + [len(ids) + 1]
        offset = clip.max_length
    t5 = pipe.tokenizers.get("t5")
    if t5 is not None:
        ids = t5.encode(prompt)[: t5.max_length]  # the pieces, then </s>
        words = ids[:-1][: max(limit - 1, 0)]
        tokens += [f"T5 {t5.backend.id_to_token(i)}" for i in words] + ["T5 </s>"]
        positions += [offset + i for i in range(len(words))] + [offset + len(ids) - 1]
    return tokens, positions


@torch.no_grad()
def explain_flow(pipe, request: GenerationRequest, *, snapshots: int = 6, max_tokens: int = 8,
                 forward_times: tuple[int, ...] = FORWARD_TIMESTEPS) -> Explanation:
    """Run ``request`` on an SD 3 / FLUX.1 pipeline once and keep what every stage produced (``trace.explain``'s
    counterpart). Steps are kept in the flow variable: z = x_t after the step, t from 1 down to 0."""
    if request.batch_size != 1:
        raise ValueError(f"explain follows one image; got batch_size={request.batch_size} — use batch_size=1")
    if snapshots < 1:
        raise ValueError(f"snapshots must be at least 1; got {snapshots}")
    resolved = resolve(pipe, request)
    in_ve = FLOW_SAMPLERS[resolved.sampler] == "ve"  # DPM++ 2M, UniPC: y = x_t / (1 - t), sigma = t / (1 - t)

    steps: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    guidance: list[GuidanceRecord] = []
    attention_sum: dict[tuple[int, int], torch.Tensor] = {}
    attention_calls: dict[tuple[int, int], int] = {}
    attention_blocks: dict[tuple[int, int], list[str]] = {}

    def on_step(step) -> None:
        t = step.sigma / (1 + step.sigma) if in_ve else step.sigma
        steps.append((t, step.x[0].float().cpu(), step.x0[0].float().cpu()))

    def on_guidance(t: torch.Tensor, x0_cond: torch.Tensor, x0_uncond: torch.Tensor) -> None:
        guidance.append(GuidanceRecord(float(t[0]), x0_cond[0].float().cpu(), x0_uncond[0].float().cpu()))

    def on_attention(block: str, probs: torch.Tensor, h: int, w: int) -> None:
        maps = probs.reshape(h, w, -1).permute(2, 0, 1)  # (L, h, w)
        attention_sum[(h, w)] = attention_sum.get((h, w), 0) + maps
        attention_calls[(h, w)] = attention_calls.get((h, w), 0) + 1
        if block not in attention_blocks.setdefault((h, w), []):
            attention_blocks[(h, w)].append(block)

    with watch_joint_attention(pipe.transformer, on_attention):
        result = pipe.run(request, callback=on_step, observer=on_guidance)

    records = []
    for i, (t, x, x0) in enumerate(steps):
        t_next = steps[i + 1][0] if i + 1 < len(steps) else 0.0
        records.append(StepRecord(i, t, t_next, x * (1 - t_next) if in_ve else x, x0))

    # the forward process from the clean latents, with the run's draws replayed: the init image's posterior
    # sample (if any), then the noise
    generator = make_generators(result.seeds)
    init_image = init_latents = None
    if request.init_image is not None:
        width, height = result.images[0].size
        init_image = pil_to_tensor(request.init_image, width, height)[0]
        init_latents = pipe.encode_image(init_image[None], generator)[0].cpu()
    z0 = init_latents if init_latents is not None else result.latents[0].float().cpu()
    noise = randn((1, *z0.shape), generator)[0]
    times = [min(t, 1000) / 1000 for t in forward_times]
    noising = [NoisedLatent(round(t * 1000), (1 - t) ** 2, (1 - t) * z0 + t * noise) for t in times]

    tokens, positions = prompt_tokens(pipe, request.prompt, max_tokens)
    explanation = Explanation(
        request=resolved, result=result, tokens=tokens, token_positions=positions, init_image=init_image,
        init_latents=init_latents, noising=noising, steps=records, guidance=guidance,
        attention={size: total / attention_calls[size] for size, total in attention_sum.items()},
        attention_layers=attention_blocks, image=pil_to_tensor(result.images[0])[0], model_kind="flow")
    _decode_snapshots(pipe, explanation, snapshots)
    return explanation

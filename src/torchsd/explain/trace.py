"""Watch one real generation: every stage of the seed's pipeline, seen through explicit hooks.

Nothing here re-implements a stage. The run is ``StableDiffusion.run``; what it shows comes from
  - ``callback``: each sampler ``Step`` (the sample x and the denoiser's prediction x0),
  - ``observer``: each guided denoiser call (x0 of the conditional and unconditional halves),
  - ``watch_cross_attention``: the ``observer`` slot of every cross-attention layer of the U-Net,
    which then also computes its softmax(Q K^T / sqrt(d)) (SDPA never materialises it),
  - ``watch_control_residuals``: a forward pre-hook on the U-Net that sees the ControlNet residuals each
    call receives (the units' scaled sum, as the U-Net adds them to its skips and middle block) and the
    T2I-Adapter features (scaled and summed, as the U-Net adds them to its levels),
and the stages the run is made of (``encode_image``, ``decode_latents``, ``schedules.q_sample``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..diffusion.samplers import Step, build_sigmas, resolve_sampler
from ..diffusion.schedules import alphas_cumprod, q_sample
from ..images import pil_to_tensor
from ..models.unet import SpatialTransformer, UNet
from ..noise import make_generators, randn
from ..pipeline import GenerationRequest, GenerationResult, StableDiffusion

FORWARD_TIMESTEPS = (0, 100, 250, 500, 750, 999)  # as fractions of a 1000-step schedule


@contextmanager
def watch_cross_attention(unet: UNet, record: Callable[[str, torch.Tensor, int, int], None]) -> Iterator[None]:
    """Inside the block, every cross-attention layer (``attn2``) of ``unet`` hands ``record`` its name,
    its probabilities (B, H*W, T) averaged over heads, and the height and width of its feature map.

    The size comes from a forward pre-hook on each ``SpatialTransformer`` (the layers themselves see
    only a token sequence). Hooks and observers are removed on exit: no cost outside the block."""
    handles, layers = [], []
    try:
        for name, transformer in unet.named_modules():
            if not isinstance(transformer, SpatialTransformer):
                continue
            size: dict[str, tuple[int, int]] = {}

            def remember_size(module, args, size=size) -> None:
                size["hw"] = tuple(args[0].shape[-2:])

            handles.append(transformer.register_forward_pre_hook(remember_size))
            for j, block in enumerate(transformer.transformer_blocks):
                if block.attn2.observer is not None:
                    raise RuntimeError("cross-attention is already being watched; watch_cross_attention does not nest")
                layer_name = f"{name}.transformer_blocks.{j}.attn2"
                block.attn2.observer = lambda probs, size=size, n=layer_name: record(n, probs, *size["hw"])
                layers.append(block.attn2)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.observer = None


ControlObserver = Callable[[float, list[torch.Tensor] | None, torch.Tensor | None, list[torch.Tensor] | None], None]


@contextmanager
def watch_control_residuals(unet: UNet, record: ControlObserver) -> Iterator[None]:
    """Inside the block, every U-Net call that receives ControlNet residuals or T2I-Adapter features hands
    ``record`` its timestep, ``down_residuals`` (one per skip connection), ``mid_residual`` and
    ``level_residuals`` (one per place ``adapter_labels`` names); None for what the call did not get. The hook
    is removed on exit."""
    def hook(module, args, kwargs) -> None:
        down, levels = kwargs.get("down_residuals"), kwargs.get("level_residuals")
        if down is not None or levels is not None:
            timesteps = args[1] if len(args) > 1 else kwargs["timesteps"]
            record(float(torch.as_tensor(timesteps).flatten()[0]), down, kwargs.get("mid_residual"), levels)

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def skip_labels(unet: UNet) -> list[str]:
    """A name per skip connection, in the order the U-Net makes them: the input conv, then per level its
    res blocks and (all but the last level) its downsampler."""
    c = unet.config
    labels = ["conv_in"]
    for level in range(len(c.channel_mult)):
        labels += [f"level {level} res {j}" for j in range(c.num_res_blocks)]
        if level < len(c.channel_mult) - 1:
            labels.append(f"level {level} down")
    return labels


def adapter_labels(unet: UNet, count: int) -> list[str]:
    """Where ``UNet.forward`` adds each of ``count`` T2I-Adapter features, named as the activation it lands on
    (``skip_labels``' names): in a level with transformers its last ResBlock's (and transformer's) output, in a
    level without, its output after the downsampler (or the last ResBlock's where it has none); a feature past
    the down levels goes to the middle block's output, "mid". Unlike a ControlNet residual, which only the
    skip connection carries, a feature changes everything the U-Net computes after that point."""
    c = unet.config
    labels = []
    for level in range(len(c.channel_mult)):
        last = level == len(c.channel_mult) - 1
        after_down = not c.attention_levels[level] and not last
        labels.append(f"level {level} down" if after_down else f"level {level} res {c.num_res_blocks - 1}")
    return (labels + ["mid"])[:count]


@dataclass
class ControlRecord:
    """What a ControlNet (its residuals) or a T2I-Adapter (its features) added to the U-Net, on the prompt's
    (conditional) row, scaled and summed over the units of that kind as the U-Net received them."""

    labels: list[str]  # one per residual: the skips' (``skip_labels``), then "mid"; an adapter's: adapter_labels
    timesteps: list[float]  # one per U-Net call that received residuals
    means: torch.Tensor  # (calls, residuals): mean |residual| over channels and positions
    maps: list[torch.Tensor]  # per residual, (h, w): mean |residual| over channels and calls
    kind: str = "ControlNet"  # or "T2I-Adapter"
    units: list[str] = field(default_factory=list)  # the units of that kind: "name (weight w)"

    def level_means(self) -> dict[str, float]:
        """Mean |residual| per down level (its skips together, weighted by their sizes) and for the middle
        block, over all calls."""
        out: dict[str, list[float]] = {}
        for label, m in zip(self.labels, self.maps):
            key = "mid" if label == "mid" else ("level 0" if label == "conv_in" else " ".join(label.split()[:2]))
            out.setdefault(key, []).extend(m.flatten().tolist())
        return {k: sum(v) / len(v) for k, v in out.items()}


@dataclass
class NoisedLatent:
    timestep: int
    alpha_bar: float
    z: torch.Tensor  # (C, h, w) z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps


@dataclass
class StepRecord:
    index: int
    sigma: float  # the level the step started from
    sigma_next: float  # the level it ended at
    z: torch.Tensor  # (C, h, w) the sample after the step, as the U-Net sees latents (VP scale)
    x0: torch.Tensor  # (C, h, w) the (guided) prediction of the clean latents at ``sigma``


@dataclass
class GuidanceRecord:
    sigma: float
    x0_cond: torch.Tensor  # (C, h, w) prediction given the prompt
    x0_uncond: torch.Tensor  # (C, h, w) prediction given the negative (or empty) prompt


@dataclass
class Explanation:
    """What one generation of one image went through, stage by stage (tensors on the CPU, float32)."""

    request: GenerationRequest
    result: GenerationResult
    tokens: list[str]  # what each context position in ``token_positions`` holds, for labels
    token_positions: list[int]
    init_image: torch.Tensor | None  # (3, H, W) in [-1, 1]
    init_latents: torch.Tensor | None  # (C, h, w) scaled latents of the init image
    noising: list[NoisedLatent]  # the forward process from z0 at a few timesteps
    steps: list[StepRecord]
    guidance: list[GuidanceRecord]  # one per guided denoiser call; empty when guidance_scale == 1
    attention: dict[tuple[int, int], torch.Tensor]  # (H, W) -> (T, H, W): mean over heads, layers, calls
    attention_layers: dict[tuple[int, int], list[str]]  # (H, W) -> the attn2 layers working at that size
    image: torch.Tensor  # (3, H, W) the final decode in [-1, 1]
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)  # decoded latents, by a name the report uses
    control: ControlRecord | None = None  # with ControlNet units: the residuals the U-Net received
    adapter: ControlRecord | None = None  # with T2I-Adapter units: the features the U-Net received
    # "unet", or "flow" (SD 3 / FLUX.1, ``flow_trace.py``): steps and noising in flow time t (sigma = t,
    # alpha_bar = (1 - t)^2), attention = the joint attention's image-query x text-key block
    model_kind: str = "unet"

    @property
    def latents(self) -> torch.Tensor:
        """(C, h, w) the final latents."""
        return self.result.latents[0].float().cpu()

    def token_maps(self, size: tuple[int, int]) -> torch.Tensor:
        """(len(token_positions), H, W): where each shown token is attended from, each map summing to 1."""
        maps = self.attention[size][self.token_positions]
        return maps / maps.sum(dim=(1, 2), keepdim=True)


def prompt_tokens(sd: StableDiffusion, prompt: str, limit: int,
                  only: tuple[str, ...] | None = None) -> tuple[list[str], list[int]]:
    """Labels and context positions of the start token, the prompt's first tokens (or, given ``only``, its
    tokens that spell one of those words, in prompt order) and the end token."""
    ids = sd.tokenizer.encode(prompt)[: sd.tokenizer.max_length - 2]
    words = [sd.tokenizer.decode([i]) or "?" for i in ids]
    if only is None:
        shown = list(range(1, 1 + min(len(ids), max(limit - 2, 0))))
    else:
        shown = [p + 1 for p, word in enumerate(words) if word.strip() in only]
        missing = set(only) - {words[p - 1].strip() for p in shown}
        if missing:
            raise ValueError(f"words to show {sorted(missing)} are not tokens of the prompt {prompt!r}: "
                             f"its tokens are {[w.strip() for w in words]}")
    return ["<start>"] + [words[p - 1] for p in shown] + ["<end>"], [0] + shown + [len(ids) + 1]


@torch.no_grad()
def explain(sd: StableDiffusion, request: GenerationRequest, *, snapshots: int = 6, max_tokens: int = 8,
            words: tuple[str, ...] | None = None,
            forward_timesteps: tuple[int, ...] = FORWARD_TIMESTEPS) -> Explanation:
    """Run ``request`` once and keep what every stage produced. ``snapshots`` sampler steps (evenly
    spaced, the last included) are decoded to pixels; every step keeps its latents. The attention maps are
    kept for the prompt's first ``max_tokens`` tokens, or for the tokens spelling ``words``."""
    if request.batch_size != 1:
        raise ValueError(f"explain follows one image; got batch_size={request.batch_size} — use batch_size=1")
    if snapshots < 1:
        raise ValueError(f"snapshots must be at least 1; got {snapshots}")
    tokens, positions = prompt_tokens(sd, request.prompt, max_tokens, words)  # a word not in the prompt: before the run

    steps: list[tuple[Step, torch.Tensor]] = []
    guidance: list[GuidanceRecord] = []
    attention_sum: dict[tuple[int, int], torch.Tensor] = {}
    attention_calls: dict[tuple[int, int], int] = {}
    attention_layers: dict[tuple[int, int], list[str]] = {}

    def on_step(step: Step) -> None:
        steps.append((step, step.x[0].float().cpu()))

    def on_guidance(sigma: torch.Tensor, x0_cond: torch.Tensor, x0_uncond: torch.Tensor) -> None:
        guidance.append(GuidanceRecord(float(sigma[0]), x0_cond[0].float().cpu(), x0_uncond[0].float().cpu()))

    def on_attention(layer: str, probs: torch.Tensor, H: int, W: int) -> None:
        # with guidance the U-Net batch is [uncond, cond]: the prompt's half is the last
        maps = probs[-1].reshape(H, W, -1).permute(2, 0, 1).float().cpu()  # (T, H, W)
        attention_sum[(H, W)] = attention_sum.get((H, W), 0) + maps
        attention_calls[(H, W)] = attention_calls.get((H, W), 0) + 1
        if layer not in attention_layers.setdefault((H, W), []):
            attention_layers[(H, W)].append(layer)

    control_calls: list[tuple[float, list[torch.Tensor]]] = []
    adapter_calls: list[tuple[float, list[torch.Tensor]]] = []

    def on_control(timestep: float, down: list[torch.Tensor] | None, mid: torch.Tensor | None,
                   levels: list[torch.Tensor] | None) -> None:
        # the last row is the prompt's (with guidance the rows are [uncond, cond]; shared rows: one)
        if down is not None:
            control_calls.append((timestep, [r[-1].float().abs().mean(dim=0).cpu() for r in [*down, mid]]))
        if levels is not None:
            adapter_calls.append((timestep, [f[-1].float().abs().mean(dim=0).cpu() for f in levels]))

    with watch_cross_attention(sd.unet, on_attention), watch_control_residuals(sd.unet, on_control):
        result = sd.run(request, callback=on_step, observer=on_guidance)

    # sigmas of the levels visited, to put each x back on the U-Net's scale z = x / sqrt(1 + sigma^2)
    sigmas = build_sigmas(sd.config.schedule, request.steps, *resolve_sampler(request.sampler, request.scheduler))
    sigmas = sigmas[len(sigmas) - 1 - len(steps):].tolist() if steps else []
    records = [StepRecord(s.index, s.sigma, sigmas[i + 1], x / (1 + sigmas[i + 1] ** 2) ** 0.5, s.x0[0].float().cpu())
               for i, (s, x) in enumerate(steps)]

    # Replay the run's generator: first the posterior draw of the init image's latents (if any), then
    # the noise, so the forward process below adds exactly the noise the run started from.
    generator = make_generators(result.seeds)
    init_image = init_latents = None
    if request.init_image is not None:
        width, height = result.images[0].size
        init_image = pil_to_tensor(request.init_image, width, height)[0]
        init_latents = sd.encode_image(init_image[None], generator)[0].cpu()

    # the forward process from the clean latents: the init image's, or else the generated image's
    z0 = init_latents if init_latents is not None else result.latents[0].float().cpu()
    n_train = sd.config.schedule.num_train_timesteps
    timesteps = torch.tensor([min(round(t * n_train / 1000), n_train - 1) for t in forward_timesteps])
    noise = randn((1, *z0.shape), generator)
    noised = q_sample(sd.config.schedule, z0.expand(len(timesteps), -1, -1, -1), timesteps, noise)

    units = control_units(sd, request) if control_calls or adapter_calls else {"ControlNet": [], "T2I-Adapter": []}
    explanation = Explanation(
        request=request, result=result, tokens=tokens, token_positions=positions, init_image=init_image,
        init_latents=init_latents, steps=records,
        noising=[NoisedLatent(t, float(alphas_cumprod(sd.config.schedule)[t]), z)
                 for t, z in zip(timesteps.tolist(), noised)],
        guidance=guidance,
        attention={size: total / attention_calls[size] for size, total in attention_sum.items()},
        attention_layers=attention_layers,
        image=pil_to_tensor(result.images[0])[0],
        control=_control_record(skip_labels(sd.unet) + ["mid"], control_calls, "ControlNet", units["ControlNet"]),
        adapter=_control_record(adapter_labels(sd.unet, len(adapter_calls[0][1])) if adapter_calls else [],
                                adapter_calls, "T2I-Adapter", units["T2I-Adapter"]))
    _decode_snapshots(sd, explanation, snapshots)
    return explanation


def control_units(sd: StableDiffusion, request: GenerationRequest) -> dict[str, list[str]]:
    """The request's control units by kind, "name (weight w)" each (their models, as the run loaded them)."""
    from ..pipeline.features.control import control_models

    out: dict[str, list[str]] = {"ControlNet": [], "T2I-Adapter": []}
    for unit in getattr(request, "control", ()) or ():
        net = control_models(sd).load(sd, unit.model)  # kept from the run: no second load
        kind = "ControlNet" if hasattr(net, "controlnet_down_blocks") else "T2I-Adapter"
        out[kind].append(f"{unit.model_name} (weight {unit.weight:g})")
    return out


def _control_record(labels: list[str], calls: list[tuple[float, list[torch.Tensor]]], kind: str,
                    units: list[str]) -> ControlRecord | None:
    if not calls:
        return None
    maps = [torch.stack([residuals[i] for _, residuals in calls]) for i in range(len(calls[0][1]))]  # (calls, h, w)
    return ControlRecord(labels=labels, timesteps=[t for t, _ in calls],
                         means=torch.stack([m.mean(dim=(1, 2)) for m in maps], dim=1),
                         maps=[m.mean(dim=0) for m in maps], kind=kind, units=units)


def snapshot_indices(total: int, snapshots: int) -> list[int]:
    """``snapshots`` step indices spread evenly over 0 … total-1, always ending at the last step."""
    if total == 0:
        return []
    count = min(snapshots, total)
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def _decode_snapshots(sd: StableDiffusion, explanation: Explanation, snapshots: int) -> None:
    """Decode to pixels what the report shows: noised latents, x and x0 at a few steps, guidance halves."""
    wanted: dict[str, torch.Tensor] = {}
    for noised in explanation.noising:
        wanted[f"noised/{noised.timestep}"] = noised.z
    for i in snapshot_indices(len(explanation.steps), snapshots):
        step = explanation.steps[i]
        wanted[f"z/{i}"], wanted[f"x0/{i}"] = step.z, step.x0
    for i in snapshot_indices(len(explanation.guidance), min(snapshots, 3)):
        g = explanation.guidance[i]
        wanted[f"cond/{i}"], wanted[f"uncond/{i}"] = g.x0_cond, g.x0_uncond
    if explanation.init_latents is not None:
        wanted["reconstruction"] = explanation.init_latents
    names = list(wanted)
    for start in range(0, len(names), 4):  # a few at a time: full-size decodes are large
        chunk = names[start:start + 4]
        images = sd.decode_latents(torch.stack([wanted[n] for n in chunk]).to(sd.device)).clamp(-1, 1).cpu()
        explanation.decoded.update(zip(chunk, images))

"""One run of a flow-matching model (SD 3 / 3.5, FLUX.1), step by step: what ``FlowPipeline.run(request)`` does.
It reads like ``run.py`` and shares its steps where they are the same (the plan, the prompts' expansion,
the decode, the finish and infotext).

1. resolve the plan: the model's defaults written into the request (sampler, guidance), sampler and
   features checked, seeds and generators, size; the flow times t from 1 to 0 (SD 3: shifted; FLUX.1-dev:
   shifted by the image's token count)
2. encode the prompts (and the negatives where guidance uses them)
3. prepare the starting latents: noise at t = 1, or an image's latents mixed with noise at the level
   ``strength`` picks: (1 - t) x0 + t noise (the last ceil(strength * steps) steps, diffusers' flow count)
4. build the denoiser: the transformer's velocity as x0 (``FlowDenoiser``), classifier-free guidance
   (SD 3; FLUX.1 only with a negative prompt, as diffusers' true_cfg_scale) and FLUX.1-dev's embedded guidance;
   inpainting pins x0 to the image's latents outside the mask (FLUX.1 Fill also sees the masked image and
   the mask as input channels, ``features/inpaint.fill_condition``)
5. sample: Euler and Heun on the flow times (diffusers' FlowMatchEuler/Heun schedulers), DPM++ 2M and
   UniPC in the VE variable of ``flow_as_ve`` (diffusers' flow DPM-Solver/UniPC); then inpainting's last blend
   and the hires pass (a flow image-to-image pass at the larger size)
6. decode: z = latents / scaling + shift, then the VAE
7. finish: images (inpainting's composite) and infotexts (run.py's)

Inpainting and hires fix are the U-Net run's features (``features/inpaint.py``, ``hires.py``) with their hooks
called here as run.py calls them; what differs for flow models is handed to them on the ``Run``: the levels
(``levels``), the strength's count (``img2img_start``) and the noising ((1 - t) x0 + t eps, ``noised``). Pinning
x0 outside the mask is diffusers' SD 3 / FLUX.1 inpainting exactly for Euler: with x0 = the image's latents there,
Euler's step x' = x0 + (t'/t)(x - x0) takes (1 - t) x0 + t eps to (1 - t') x0 + t' eps, the re-noised latents
that diffusers blends back after each step (and DPM++ 2M / UniPC keep them too: x0 is the same at every step).

Samplers that add fresh noise (the ancestral and SDE ones, DDPM, LCM, TCD) assume x = x0 + sigma * eps and are
refused. DDIM's deterministic step on flow times is Euler's exactly (both give x' = x0 + (t'/t)(x - x0)), so a
request for DDIM, the request's default, runs and is written as Euler.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

from ..config import FlowScheduleConfig
from ..diffusion.flow import (
    FlowDenoiser,
    SkipLayerGuidance,
    flow_as_ve,
    flow_guidance,
    flow_img2img_start,
    flow_noise,
    flow_sigmas,
    ve_sigmas_of_flow,
)
from ..diffusion.samplers import Step, get_sampler, sampler_options
from ..diffusion.schedulers import get_scheduler
from ..text.prompts import extract_extra_networks
from .features import FEATURES, Run
from .features.flow import FLOW, default_distilled_cfg
from .features.hires import HIRES
from .features.img2img import IMG2IMG
from .features.inpaint import INPAINT
from .features.lora import LORA
from .features.styles import STYLES
from .features.variation import VARIATION
from .infotext import infotext_for
from .request import GenerationRequest, GenerationResult
from .run import decode, expand_prompts, finish, plan, run_sampler

# sampler -> the variable it integrates in: "flow" (x_t, t) or "ve" (x_t / (1 - t), t / (1 - t))
FLOW_SAMPLERS = {"euler": "flow", "heun": "flow", "dpmpp_2m": "ve", "unipc": "ve"}
SAME_AS = {"ddim": "euler"}  # DDIM's deterministic step is Euler's on flow times
TEXT_LORAS = "flow_text_loras"  # run.state: the LoRAs with a text-encoder part, (lora, path, text scale)
SUPPORTED_FEATURES = (STYLES, IMG2IMG, INPAINT, VARIATION, HIRES, LORA, FLOW)
# the features whose run hooks (prepare, wrap_denoiser, after_sampling, …) are called here as run.py calls them;
# the others' hooks do U-Net things (the LoRA merge, the U-Net-only refusal), and this run does their part itself
HOOKED = (INPAINT, HIRES)


def run(pipe, request: GenerationRequest, *, progress: bool = False,
        callback: Callable[[Step], None] | None = None, observer=None) -> GenerationResult:
    request = resolve(pipe, request)  # 1.
    state = plan(pipe, request)
    hooked = hooked_features(request)
    with flow_loras(pipe, request, state), ExitStack() as stack:
        for feature in hooked:  # hires: the upscaler's name checked before the first pass
            stack.enter_context(feature.model_context(pipe, request, state))
        for feature in hooked:  # inpainting: the canvas, which may change the size
            feature.prepare(pipe, request, state)
        schedule(pipe, request, state)
        prompt, negative_prompt = expand_prompts(pipe, request, state)
        encode_prompts(pipe, request, state, [prompt] * request.batch_size,  # 2.
                       [negative_prompt] * request.batch_size)
        x = start_latents(pipe, request, state)  # 3.
        state.sample = lambda x, sigmas, **kw: sample(pipe, request, state, x, sigmas, **kw)  # the hires pass's
        latents = x
        if len(state.sigmas) > 1:  # image-to-image at strength 0 keeps the image
            latents = sample(pipe, request, state, x, progress=progress, callback=callback,  # 4.-5.
                             observer=observer)
            for feature in hooked:  # inpainting's last blend, the hires pass
                latents = feature.after_sampling(latents, pipe, request, state, progress=progress, callback=callback)
        images = decode(pipe, latents)  # 6.
    return finish(pipe, request, state, latents, images)  # 7.


# --- 1. the plan ---------------------------------------------------------------------------------------------

def resolve(pipe, request: GenerationRequest) -> GenerationRequest:
    """The request with the model's choices written in, so that the infotext tells what ran: the sampler
    (DDIM as Euler), FLUX.1-dev's distilled guidance (3.5 unless given), and FLUX.1's CFG scale 1 where there
    is no negative prompt (FLUX.1 guides only when given one). Refuses what flow models do not run."""
    for feature in request.active():
        if feature not in SUPPORTED_FEATURES:
            raise ValueError(f"{feature.name} is not available for {pipe.config.label} models in torchsd; these "
                             f"options apply: {', '.join(f.name for f in SUPPORTED_FEATURES)}")
    changes: dict = {}
    spec = get_sampler(request.sampler)
    name = SAME_AS.get(spec.name, spec.name)
    if name not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {spec.label!r} does not run on flow-matching models (SD 3 / FLUX.1): it adds "
                         f"fresh noise or steps on a U-Net's noise schedule. Use one of "
                         f"{', '.join(get_sampler(n).label for n in FLOW_SAMPLERS)}")
    if name != spec.name:
        changes["sampler"] = name
    if request.eta is not None:  # no flow sampler adds noise: an eta (webuiapi always sends one) changes nothing
        changes["eta"] = None
    if get_scheduler(request.scheduler).name != "automatic":
        raise ValueError(f"schedule type {request.scheduler!r}: flow models step on their own shifted schedule; "
                         f"leave the schedule type automatic (change the shift with flow_shift / --shift)")
    distilled = request.options(FLOW).distilled_cfg_scale
    if pipe.config.guidance_embedded:
        if distilled is None:
            changes["distilled_cfg_scale"] = default_distilled_cfg(pipe.config)
    elif distilled is not None:
        raise ValueError(f"distilled_cfg_scale is FLUX.1-dev's embedded guidance; {pipe.config.label} has none "
                         f"(use guidance_scale for classifier-free guidance)")
    if pipe.config.is_inpainting and not INPAINT.active(request.options(INPAINT)):
        raise ValueError(f"{pipe.config.label}: a Fill model repaints the masked part of an image; give init_image "
                         f"and mask (img2img with a mask), or load FLUX.1-dev for text to image")
    if pipe.family == "flux" and not request.negative_prompt and request.guidance_scale != 1.0:
        changes["guidance_scale"] = 1.0
    check_skip_layers(pipe, request.replace(**changes) if changes else request)
    side = pipe.config.multiple
    for axis in ("width", "height"):
        value = getattr(request, axis)
        if value is not None and value % side:
            lower, upper = max(side, value // side * side), value // side * side + side
            raise ValueError(f"{axis} {value}: {pipe.config.label} images are multiples of {side} pixels (the VAE's "
                             f"{pipe.config.vae.downscale_factor}x times 2x2 patches) — try {lower} or {upper}")
    return request.replace(**changes) if changes else request


def check_skip_layers(pipe, request: GenerationRequest) -> None:
    """Skip-layer guidance: SD 3's joint blocks, on top of classifier-free guidance."""
    layers = request.options(FLOW).skip_guidance_layers
    if not layers:
        return
    if pipe.family != "sd3":
        raise ValueError(f"skip-layer guidance (skip_guidance_layers) is SD 3.5's; {pipe.config.label} has no "
                         f"classifier-free guidance to add it to: drop it")
    blocks = pipe.config.transformer.num_layers
    if max(layers) >= blocks:
        raise ValueError(f"skip_guidance_layers {list(layers)}: {pipe.config.label} has joint blocks 0 to "
                         f"{blocks - 1} (SD 3.5 Medium's SLG: 7, 8, 9)")
    if not guided(request):
        raise ValueError(f"skip-layer guidance adds to classifier-free guidance, which runs only with a guidance "
                         f"scale above 1; got {request.guidance_scale} (SD 3.5: 4.5; drop skip_guidance_layers for "
                         f"a Turbo model)")


def hooked_features(request: GenerationRequest) -> list:
    """The active features whose run hooks this run calls, in the registry's order."""
    return [feature for feature in request.active() if feature in HOOKED]


def flow_schedule(pipe, request: GenerationRequest) -> FlowScheduleConfig:
    """The model's schedule, with ``flow_shift`` (a fixed shift, in place of FLUX.1-dev's size-dependent one)."""
    config = pipe.config.schedule
    shift = request.options(FLOW).flow_shift
    if shift is None:
        return config
    from dataclasses import replace

    return replace(config, shift=shift, dynamic_shift=False)


def schedule(pipe, request: GenerationRequest, run: Run) -> None:
    """Flow times, the latent shape, the initial noise, and how image-to-image starts (for the features)."""
    f = pipe.config.vae.downscale_factor
    run.shape = (run.batch_size, pipe.config.vae.latent_channels, run.height // f, run.width // f)
    if run.width % pipe.config.multiple or run.height % pipe.config.multiple:
        raise ValueError(f"{run.width}x{run.height}: {pipe.config.label} images are multiples of "
                         f"{pipe.config.multiple} pixels; give a size that is")
    run.levels = lambda steps: flow_levels(pipe, request, run, steps)  # also the hires pass's, at its size
    run.img2img_start, run.noised = flow_img2img_start, flow_noise
    run.sigmas = run.levels(request.steps)
    if request.latents is not None and tuple(request.latents.shape) != run.shape:
        raise ValueError(f"latents must have shape {run.shape} for {run.width}x{run.height}; "
                         f"got {tuple(request.latents.shape)}")
    run.scheduler = get_scheduler("automatic")  # the infotext's schedule type: the model's own

    def noise() -> torch.Tensor:
        drawn = request.latents if request.latents is not None else VARIATION.noise(run.shape, request, run, f)
        return drawn.to(pipe.device, torch.float32)

    run.noise = noise


def flow_levels(pipe, request: GenerationRequest, run: Run, steps: int) -> torch.Tensor:
    """The flow times of a loop of ``steps`` at ``run.shape`` (FLUX.1-dev's shift follows its token count). For
    the samplers in the VE variable they start just below 1 (t = 1 is an infinite VE level), as diffusers' flow
    DPM-Solver and UniPC schedules do."""
    tokens = (run.shape[2] // pipe.config.patch_size) * (run.shape[3] // pipe.config.patch_size)
    config = flow_schedule(pipe, request)
    if FLOW_SAMPLERS[run.spec.name] == "ve":
        return flow_sigmas_below_one(config, steps, tokens)
    return flow_sigmas(config, steps, tokens)


def flow_sigmas_below_one(config: FlowScheduleConfig, steps: int, image_seq_len: int) -> torch.Tensor:
    """steps + 1 flow times from just below 1 to 0, as diffusers' DPMSolverMultistep/UniPCMultistep with
    use_flow_sigmas set them: the shift (or FLUX.1's size-dependent one) of 1 - 1/N ... 0, evenly spaced."""
    from ..diffusion.flow import dynamic_shift_mu, shift_times, time_shift_exponential

    t = torch.linspace(1 - 1 / config.num_train_timesteps, 0, steps + 1, dtype=torch.float64)
    if config.dynamic_shift:
        shifted = time_shift_exponential(dynamic_shift_mu(config, image_seq_len), t[:-1])
        return torch.cat([shifted, t.new_zeros(1)])
    return shift_times(t, config.shift)


@contextmanager
def flow_loras(pipe, request: GenerationRequest, run: Run) -> Iterator[None]:
    """The request's LoRAs (``loras=`` and ``<lora:name:te:unet>`` tags) on the transformer and the text
    encoders for the run, each part at its scale (A1111's tag: text encoders first); restored afterwards
    (``checkpoints/flow_lora.py``). A part for an encoder this model runs without (SD 3's T5) is skipped, warned."""
    wanted = [(source, scale, scale) for source, scale in request.loras]
    for text in (request.prompt, request.negative_prompt):
        wanted += [(tag.name, tag.text_encoder_scale, tag.unet_scale) for tag in extract_extra_networks(text)[1]]
    run.state[LORA.name] = []
    if not wanted:
        yield
        return
    from ..checkpoints.flow_lora import load_lora, loras_applied, text_encoders_named

    loaded = []
    for source, text_scale, transformer_scale in wanted:
        path = pipe.loras.resolve(source)
        lora = load_lora(path, pipe.family, pipe.config.transformer)  # the transformer's part; text keys listed
        if lora.text_encoder_keys:  # read against the encoders it names (one that was freed is read again)
            encoders = {role: pipe.text_encoder(role) for role in text_encoders_named(lora, pipe.family)}
            lora = load_lora(path, pipe.family, pipe.config.transformer, encoders)
        if lora.text_encoder_keys:
            import warnings

            warnings.warn(f"{path.name}: {len(lora.text_encoder_keys)} LoRA weights are for a text encoder this "
                          f"model runs without (first: {lora.text_encoder_keys[0]}); they are not applied",
                          stacklevel=2)
        loaded.append((lora, text_scale, transformer_scale))
        if lora.text_updates:  # applied while the prompts are encoded (step 2), when the encoders are in memory
            run.state.setdefault(TEXT_LORAS, []).append((lora, path, text_scale))
        # what the LoRA feature's infotext reads: name and file
        run.state[LORA.name].append(SimpleNamespace(lora=SimpleNamespace(name=path.stem, path=path)))
    with loras_applied(pipe.transformer, [(lora, scale) for lora, _, scale in loaded]):
        yield


# --- 2. the prompts --------------------------------------------------------------------------------------------

def encode_prompts(pipe, request: GenerationRequest, run: Run, prompts: list[str], negative_prompts: list[str]
                   ) -> None:
    """(context, pooled) of each prompt, ``<lora:…>`` tags taken out; the negatives only where guided."""
    run.prompts = [extract_extra_networks(p)[0] for p in prompts]
    run.negative_prompts = [extract_extra_networks(p)[0] for p in negative_prompts]
    text_loras = run.state.get(TEXT_LORAS, [])
    # what else makes an encoding: kept encodings of the same prompts under other text-encoder LoRAs are others
    lora_key = tuple((str(path), scale) for _, path, scale in text_loras)
    # one read of freed encoders for both prompts, dropped again before the transformer runs; their LoRA parts
    # applied for the encoding only, restored before that
    with pipe.text_encoding(), ExitStack() as stack:
        if text_loras:
            from ..checkpoints.flow_lora import loras_applied
        for role in dict.fromkeys(u.component for lora, _, _ in text_loras for u in lora.text_updates):
            stack.enter_context(loras_applied(pipe.text_encoder(role), [(lora, scale) for lora, _, scale in text_loras],
                                              role))
        run.cond = pipe.encode_prompts(run.prompts, lora_key)
        run.uncond = pipe.encode_prompts(run.negative_prompts, lora_key) if guided(request) else None


def guided(request: GenerationRequest) -> bool:
    """Classifier-free guidance runs where the scale is above 1 (diffusers: SD 3's guidance_scale > 1; FLUX.1's
    true_cfg_scale > 1 with a negative prompt, which ``resolve`` has made the same rule)."""
    return request.guidance_scale > 1.0


# --- 3. the starting latents ----------------------------------------------------------------------------------

def start_latents(pipe, request: GenerationRequest, run: Run) -> torch.Tensor:
    """Noise at t = 1 (or the first time below 1); for image-to-image and inpainting, (1 - t) x0 + t noise at the
    first level of the part of the schedule that ``strength`` keeps (``run.sigmas`` is cut to it)."""
    if IMG2IMG.active(request.options(IMG2IMG)):
        started = IMG2IMG.start_latents(pipe, request, run, source=INPAINT.source_image(run))
        if started is not None:
            init_latents, noise = started
            if INPAINT.active(request.options(INPAINT)):  # the masked part filled as asked; the mask kept
                init_latents = INPAINT.on_start(init_latents, noise, pipe, run)
            if len(run.sigmas) < 2:
                return init_latents
            return flow_noise(init_latents, noise, run.sigmas[0].item())
    return run.noise() * run.sigmas[0].item() if FLOW_SAMPLERS[run.spec.name] == "flow" else run.noise()


# --- 4.-5. the denoiser and the sampler loop -----------------------------------------------------------------------

def build_denoiser(pipe, request: GenerationRequest, run: Run, observer=None, levels: torch.Tensor | None = None):
    """The transformer's velocity as x0, guided: classifier-free guidance (``observer`` sees its halves), SD 3.5's
    skip-layer guidance over this loop's ``levels`` (default: the run's), FLUX.1-dev's embedded guidance; then
    inpainting's pinning."""
    extras = {}
    if pipe.config.guidance_embedded:
        extras["guidance"] = torch.tensor([request.options(FLOW).distilled_cfg_scale], device=pipe.device)
    if run.concat is not None:  # FLUX.1 Fill: the masked image and the mask (inpainting's on_start)
        extras["condition"] = run.concat
    options = request.options(FLOW)
    skip_layers = SkipLayerGuidance(
        options.skip_guidance_layers, options.skip_layer_guidance_scale, options.skip_layer_guidance_start,
        options.skip_layer_guidance_stop, tuple((run.sigmas if levels is None else levels).tolist())
    ) if options.skip_guidance_layers else None
    model = FlowDenoiser(pipe.transformer, pipe.config.schedule)
    denoise = flow_guidance(model, run.cond, run.uncond, request.guidance_scale, skip_layers=skip_layers,
                            observer=observer, **extras)
    for feature in reversed(hooked_features(request)):  # inpainting: x0 pinned to the image outside the mask
        denoise = feature.wrap_denoiser(denoise, pipe, request, run)
    return denoise


def sample(pipe, request: GenerationRequest, run: Run, x: torch.Tensor, sigmas: torch.Tensor | None = None, *,
           progress: bool = False, callback: Callable[[Step], None] | None = None, observer=None) -> torch.Tensor:
    """The sampler loop from ``x`` at ``sigmas[0]`` (default: the run's flow times); returns the latents the
    transformer sees at t = 0. ``observer`` sees (t, x0_cond, x0_uncond) at every guided call (``torchsd explain``)."""
    levels = (run.sigmas if sigmas is None else sigmas).to("cpu", torch.float64)
    denoise = build_denoiser(pipe, request, run, observer, levels)
    if FLOW_SAMPLERS[run.spec.name] == "ve":  # y = x_t / (1 - t) = x0 + sigma eps, sigma = t / (1 - t)
        denoise, x = flow_as_ve(denoise), x / (1 - levels[0].item())
        levels = ve_sigmas_of_flow(levels)
    kwargs = sampler_options(run.spec, run.generators, request.eta)
    x = run_sampler(run, denoise, x, levels.float(), kwargs, progress=progress, callback=callback)
    return x  # at t = 0 (VE sigma 0) both variables are x0


# --- 7. the infotext of one image (the server's, for a stopped batch) ----------------------------------------

def infotext(pipe, request: GenerationRequest, seed: int, width: int, height: int) -> str:
    request = resolve(pipe, request)
    state = plan(pipe, request, seeds=[seed])
    state.width, state.height = width, height
    state.scheduler = get_scheduler("automatic")
    return infotext_for(pipe, request, state, 0)


__all__ = ["run", "resolve", "FLOW_SAMPLERS", "FEATURES"]

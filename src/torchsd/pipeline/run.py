"""One run, step by step: what ``StableDiffusion.run(request)`` does.

1. resolve the plan once: sampler, schedule, seeds and generators, size (features may change it), sigmas
2. encode the prompts (and their negatives, unless guidance is off)
3. prepare the starting latents: noise, or an image's latents noised to the first level
4. build the denoiser: the U-Net's prediction, classifier-free guidance, then each feature's wrapper
5. sample
6. after sampling: each feature's post-pass (inpainting's blend, the hires pass)
7. decode
8. finish: each feature's image post-pass (inpainting's composite), infotexts

The prompts-file runner (``batch.py``) and the server call these same steps.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch

from ..diffusion.denoisers import Denoise, classifier_free_guidance
from ..diffusion.samplers import Step, build_sigmas, initial_noise_scale, resolve_sampler, sampler_options
from ..images import tensor_to_pil
from ..noise import make_generators, random_seed
from ..text.prompts import extract_extra_networks
from .features import Run
from .features.img2img import IMG2IMG
from .features.inpaint import INPAINT, inpainting_concat
from .features.sdxl import SDXL
from .features.variation import VARIATION
from .infotext import infotext_for
from .request import GenerationRequest, GenerationResult

StepCallback = Callable[[Step], None]


def run(sd, request: GenerationRequest, *, progress: bool = False, callback: StepCallback | None = None,
        observer=None) -> GenerationResult:
    active = request.active()
    state = plan(sd, request)  # 1.
    with ExitStack() as stack:
        for feature in active:  # e.g. LoRA weights merged for the run, restored afterwards
            stack.enter_context(feature.model_context(sd, request, state))
        for feature in active:
            feature.prepare(sd, request, state)
        schedule(sd, request, state)
        prompt, negative_prompt = expand_prompts(sd, request, state)
        encode_prompts(sd, request, state, [prompt] * request.batch_size,  # 2.
                       [negative_prompt] * request.batch_size)
        x = start_latents(sd, request, state)  # 3.
        extra_inputs(sd, state)
        # 4.-5. (a feature that samples again, the hires pass, calls state.sample)
        state.sample = lambda x, sigmas, **kw: sample(sd, request, state, x, sigmas, **kw)
        latents = x
        if len(state.sigmas) > 1:  # image-to-image at strength 0 keeps the image
            latents = sample(sd, request, state, x, state.sigmas, progress=progress, callback=callback,
                             observer=observer)
            for feature in active:  # 6.
                latents = feature.after_sampling(latents, sd, request, state, progress=progress, callback=callback)
        images = decode(sd, latents)  # 7. still inside the features' contexts: tiling pads the VAE circularly
    return finish(sd, request, state, latents, images)  # 8.


# --- 1. the plan ---------------------------------------------------------------------------------------

def plan(sd, request: GenerationRequest, seeds: list[int] | None = None) -> Run:
    """Sampler, schedule type, seeds (``seed`` + i per image, or ``seeds``), generators and size."""
    spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
    if seeds is None:
        first_seed = request.seed if request.seed is not None else random_seed()
        seeds = [first_seed + i for i in range(request.batch_size)]
    width, height = image_size(sd, request)
    return Run(spec, scheduler, seeds, make_generators(seeds), width, height)


def image_size(sd, request: GenerationRequest) -> tuple[int, int]:
    """The request's size; what it leaves out is the init image's (down to multiples of 8) or the model's."""
    if request.width and request.height:
        return request.width, request.height
    if request.init_image is not None:
        w, h = request.init_image.size
        return request.width or max(8, w // 8 * 8), request.height or max(8, h // 8 * 8)
    return request.width or sd.config.sample_size, request.height or sd.config.sample_size


def schedule(sd, request: GenerationRequest, run: Run) -> None:
    """The noise levels, the latent shape for the (final) size and how the initial noise is drawn."""
    run.levels = lambda steps: build_sigmas(sd.config.schedule, steps, run.spec, run.scheduler)  # also the hires pass's
    run.sigmas = run.levels(request.steps)
    for feature in request.active():  # the refiner's hand-off: the first model's part of the levels
        run.sigmas = feature.cut_sigmas(run.sigmas, sd, request, run)
    f = sd.config.vae.downscale_factor
    run.shape = (run.batch_size, sd.config.vae.latent_channels, run.height // f, run.width // f)
    if request.latents is not None and tuple(request.latents.shape) != run.shape:
        raise ValueError(f"latents must have shape {run.shape} for {run.width}x{run.height}; "
                         f"got {tuple(request.latents.shape)}")

    def noise() -> torch.Tensor:  # called when the run's order of random draws reaches it
        drawn = request.latents if request.latents is not None else VARIATION.noise(run.shape, request, run, f)
        return drawn.to(sd.device, torch.float32)

    run.noise = noise


# --- 2. the prompts ----------------------------------------------------------------------------------------

def expand_prompts(sd, request: GenerationRequest, run: Run) -> tuple[str, str]:
    """The request's prompts as the run reads them: each active feature may rewrite them (styles)."""
    prompt, negative_prompt = request.prompt, request.negative_prompt
    for feature in request.active():
        prompt, negative_prompt = feature.expand_prompts(sd, request, prompt, negative_prompt)
    run.prompt, run.negative_prompt = prompt, negative_prompt
    return prompt, negative_prompt


def encode_prompts(sd, request: GenerationRequest, run: Run, prompts: list[str], negative_prompts: list[str]) -> None:
    """The text contexts of one prompt per image, with the ``<lora:…>`` tags taken out; a feature that reads
    the prompts' own syntax (prompt editing, ``AND``) encodes them itself."""
    run.prompts = [extract_extra_networks(p)[0] for p in prompts]
    run.negative_prompts = [extract_extra_networks(p)[0] for p in negative_prompts]
    for feature in request.active():
        if feature.encode_prompts(sd, request, run):
            return
    cond = sd.condition(run.prompts, request.clip_skip)
    uncond = sd.condition(run.negative_prompts, request.clip_skip) if request.guidance_scale != 1.0 else None
    used = cond.embeddings + (uncond.embeddings if uncond is not None else [])
    run.embeddings = list({e.name: e for e in used}.values())
    # the context, or for SDXL a Condition that also carries the added vector (pooled text, sizes)
    run.cond = SDXL.condition(sd, request, run, cond, negative=False)
    run.uncond = SDXL.condition(sd, request, run, uncond, negative=True) if uncond is not None else None


# --- 3. the starting latents ----------------------------------------------------------------------------

def start_latents(sd, request: GenerationRequest, run: Run) -> torch.Tensor:
    """Noise at the first level; or, for image-to-image and inpainting, the image's latents noised to the
    first level of the part of the schedule that ``strength`` keeps (``run.sigmas`` is cut to it)."""
    if IMG2IMG.active(request.options(IMG2IMG)):
        started = IMG2IMG.start_latents(sd, request, run, source=INPAINT.source_image(run))
        if started is not None:
            init_latents, noise = started
            if INPAINT.active(request.options(INPAINT)):
                init_latents = INPAINT.on_start(init_latents, noise, sd, run)
            if len(run.sigmas) < 2:
                return init_latents
            return init_latents + noise * run.sigmas[0].item()
    return run.noise() * initial_noise_scale(run.sigmas, run.spec)


def extra_inputs(sd, run: Run) -> None:
    """An inpainting model's extra input channels where no mask set them: the whole picture counts as masked."""
    if sd.config.is_inpainting and run.concat is None:
        run.concat = inpainting_concat(sd, None, None, run.shape)


# --- 4.-5. the denoiser and the sampler loop ---------------------------------------------------------------

def build_denoiser(sd, request: GenerationRequest, run: Run, observer=None, sigmas: torch.Tensor | None = None
                   ) -> Denoise:
    """The U-Net under classifier-free guidance (or a feature's guidance: prompt editing, ``AND``), wrapped by
    each active feature; features listed earlier in the registry wrap outermost (inpainting's pinning sees
    CLIP guidance's result). ``sigmas``: the levels of this sampler loop (default: the run's)."""
    sigmas = run.sigmas if sigmas is None else sigmas
    active = request.active()
    model = sd.denoiser
    for feature in active:  # e.g. ControlNet residuals added at every U-Net call
        model = feature.wrap_model(model, sd, request, run, sigmas)
    run.model = model
    denoise = None
    for feature in active:  # a feature that guides by itself (prompt editing, AND); the first one that does
        if denoise is None:
            denoise = feature.guidance(sd, request, run, sigmas, observer)
    if denoise is None:
        denoise = classifier_free_guidance(model, run.cond, run.uncond, request.guidance_scale,
                                           concat=run.concat, observer=observer)
    for feature in reversed(active):
        denoise = feature.wrap_denoiser(denoise, sd, request, run)
    return denoise


def sample(sd, request: GenerationRequest, run: Run, x: torch.Tensor, sigmas: torch.Tensor, *,
           progress: bool = False, callback: StepCallback | None = None, observer=None) -> torch.Tensor:
    """The sampler loop from ``x`` at ``sigmas[0]``; returns the latents the U-Net sees at the end."""
    denoise = build_denoiser(sd, request, run, observer, sigmas)
    kwargs = sampler_options(run.spec, run.generators, request.eta, sd.config.schedule)
    # the samplers read the levels once as Python floats (stepping.py): from the CPU, so that nothing
    # waits for the accelerator, and in float32, the precision they had on the device
    levels = sigmas.to("cpu", torch.float32)
    with sd.sampling_context():  # the runtime's (packed weights for the loop)
        x = run_sampler(run, denoise, x, levels, kwargs, progress=progress, callback=callback)
    # back from x = z / sqrt(alpha_bar) to the latents the U-Net sees, at the last level visited
    return x / (1 + sigmas[-1].item() ** 2) ** 0.5


def run_sampler(run: Run, denoise, x: torch.Tensor, levels: torch.Tensor, kwargs: dict, *, progress: bool,
                callback: Callable[[Step], None] | None) -> torch.Tensor:
    """``run.spec``'s sampler from ``x`` over ``levels``, with a progress bar and ``callback`` at each step (the
    U-Net run's loop and the flow run's)."""
    bar = _progress_bar(len(levels) - 1) if progress else None

    def on_step(step: Step) -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(step)

    watched = bar is not None or callback is not None
    try:
        return run.spec.function(denoise, x, levels, callback=on_step if watched else None, **kwargs)
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


# --- 7.-8. decode and finish --------------------------------------------------------------------------------

def decode(sd, latents: torch.Tensor) -> torch.Tensor:
    images = sd.decode_latents(latents)
    if not torch.isfinite(images).all():
        raise FloatingPointError("the decoded image holds NaN or Inf values; try float32 (--dtype fp32)")
    return images


def finish(sd, request: GenerationRequest, run: Run, latents: torch.Tensor, images: torch.Tensor
           ) -> GenerationResult:
    pictures = tensor_to_pil(images)
    for feature in request.active():
        pictures = feature.finish_images(pictures, run)
    infotexts = [infotext_for(sd, request, run, i) for i in range(run.batch_size)]
    return GenerationResult(pictures, latents, run.seeds, infotexts, request, subseeds=VARIATION.subseeds(run))

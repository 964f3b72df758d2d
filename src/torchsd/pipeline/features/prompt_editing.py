"""Prompt editing (``[from:to:when]``), alternation (``[a|b]``) and composable diffusion (``a cat AND a dog``),
as AUTOMATIC1111 reads a prompt (the grammar is in ``text/prompt_schedule.py``).

The feature has no options: it is active when a prompt holds one of these constructs, and a prompt without
them runs exactly as before (the plain encode and classifier-free guidance). When active it takes over
step 2 (each distinct prompt text is encoded once, when a step first needs it, and kept for the run, the
hires pass included) and step 4: a denoiser that looks up which step a call belongs to and hands it to the
guidance built for that step's prompt texts.

Which step: the position of the call's sigma in the levels of the sampler loop (the last level at or
above it), counted from 0 as AUTOMATIC1111's step counter is. For the one-call-per-step samplers (Euler,
DDIM, DPM++ 2M …) this is A1111's counter exactly; where a sampler calls the model twice per step (Heun,
DPM2), the second call is counted by its own level: Heun's correction at the next level reads the next
step's prompt, DPM2's midpoint the current step's (A1111 counts calls, so its schedules run twice as fast
there). A hires pass counts its own steps from 0 over the schedule of the hires steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...diffusion.denoisers import classifier_free_guidance, composable_guidance
from ...text.prompt_schedule import has_schedule, is_composable, prompt_schedule, split_composable, text_at_step
from ...text.prompts import extract_extra_networks
from .base import Feature, GenerationRequest, Run, StableDiffusion


@dataclass(frozen=True)
class PromptEditingOptions:
    """No options: the prompt text says it all."""


def needs_schedule(prompt: str) -> bool:
    return has_schedule(prompt) or is_composable(prompt)


def step_index(levels: list[float], sigma) -> int:
    """The 0-based step of the sampler loop over ``levels`` (descending) that an evaluation at ``sigma`` is in."""
    value = sigma if isinstance(sigma, (int, float)) else float(torch.as_tensor(sigma).reshape(-1)[0])
    index = 0
    tolerance = 1e-5 * max(value, 1e-8)
    while index + 1 < len(levels) - 1 and levels[index + 1] >= value - tolerance:
        index += 1
    return index


class PromptContexts:
    """The run's text contexts, one encode per distinct tuple of texts (a batch's prompts encode together,
    as the plain step 2 does, so that the padding of long prompts is the same)."""

    def __init__(self, sd: StableDiffusion, request: GenerationRequest, run: Run):
        self.sd, self.request, self.clip_skip, self.run = sd, request, request.clip_skip, run
        self.encoded: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, texts: tuple[str, ...], negative: bool = False) -> torch.Tensor:
        if (texts, negative) not in self.encoded:
            from .sdxl import SDXL  # the context, or for SDXL the context with its added vector

            conditioning = self.sd.condition(list(texts), self.clip_skip)
            self.encoded[texts, negative] = SDXL.condition(self.sd, self.request, self.run, conditioning, negative)
            known = {e.name for e in self.run.embeddings}
            self.run.embeddings += [e for e in conditioning.embeddings if e.name not in known]
        return self.encoded[texts, negative]


class PromptEditing(Feature):
    name = "prompt_editing"
    Options = PromptEditingOptions

    def active_in(self, request: GenerationRequest) -> bool:
        # styles may bring the constructs in: the run then decides in encode_prompts
        prompts = (extract_extra_networks(request.prompt)[0], extract_extra_networks(request.negative_prompt)[0])
        return bool(getattr(request, "styles", ())) or needs_schedule(prompts[0]) or has_schedule(prompts[1])

    def encode_prompts(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> bool:
        if not any(needs_schedule(p) for p in run.prompts) and not any(has_schedule(p) for p in run.negative_prompts):
            return False
        run.state[self.name] = PromptContexts(sd, request, run)
        cond, uncond, weights = self._contexts_at(request, run, 0, self._schedules(request, run))
        run.cond, run.uncond = (cond if weights is None else cond[0]), uncond  # composable: the first sub-prompt's
        return True

    def guidance(self, sd: StableDiffusion, request: GenerationRequest, run: Run, sigmas: torch.Tensor,
                 observer=None):
        if self.name not in run.state:
            return None
        schedules = self._schedules(request, run)
        levels = sigmas.to("cpu", torch.float32).tolist()
        built: dict[tuple, object] = {}
        model = run.model or sd.denoiser  # ControlNet's, where control is on

        def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
            step = step_index(levels, sigma)
            key = self._texts_at(schedules, step)
            if key not in built:
                cond, uncond, weights = self._contexts_at(request, run, step, schedules)
                if weights is None:
                    built[key] = classifier_free_guidance(model, cond, uncond, request.guidance_scale,
                                                          concat=run.concat, observer=observer)
                else:
                    built[key] = composable_guidance(model, cond, weights, uncond, request.guidance_scale,
                                                     concat=run.concat, observer=observer)
            return built[key](x, sigma)

        return denoise

    # --- the schedules ----------------------------------------------------------------------------------------
    def _schedules(self, request: GenerationRequest, run: Run):
        """Per image: [(sub-prompt schedule, weight)], or None where the prompt is not composable; and the
        negative prompt's schedule. The hires pass has its own (``run.hires_steps``)."""
        steps, hires_steps = request.steps, run.hires_steps
        positive = []
        for prompt in run.prompts:
            parts = split_composable(prompt) if is_composable(prompt) else None
            if parts is None:
                positive.append((prompt_schedule(prompt, steps, hires_steps), None))
            else:
                positive.append(([(prompt_schedule(text, steps, hires_steps), w) for text, w in parts], True))
        negative = [prompt_schedule(p, steps, hires_steps) for p in run.negative_prompts]
        return positive, negative

    @staticmethod
    def _texts_at(schedules, step: int) -> tuple:
        positive, negative = schedules
        texts = []
        for schedule, composable in positive:
            if composable is None:
                texts.append(text_at_step(schedule, step))
            else:
                texts.append(tuple((text_at_step(s, step), w) for s, w in schedule))
        return tuple(texts), tuple(text_at_step(s, step) for s in negative)

    def _contexts_at(self, request: GenerationRequest, run: Run, step: int, schedules):
        """(cond, uncond, weights) at ``step``: weights None for plain guidance over (B, T, W) contexts, else
        the per-image sub-prompt weights of composable guidance over its rows."""
        contexts: PromptContexts = run.state[self.name]
        positive, negative = self._texts_at(schedules, step)
        composable = any(isinstance(texts, tuple) for texts in positive)
        guided = request.guidance_scale != 1.0 or composable
        uncond = contexts(negative, negative=True) if guided else None
        if not composable:
            return contexts(positive), uncond, None
        rows, weights = [], []
        for texts in positive:
            parts = texts if isinstance(texts, tuple) else ((texts, 1.0),)
            rows += [contexts((text,)) for text, _ in parts]
            weights.append([w for _, w in parts])
        # each sub-prompt is encoded alone; rows of different lengths are matched in composable_guidance
        return rows, uncond, weights


PROMPT_EDITING = PromptEditing()

"""What the worker does for a generation job and for a model switch.

A job runs ``n_iter`` batches. Each sampling step goes through ``JobControl.step``; when /interrupt or
/skip stops a batch, its images are decoded from the last step's prediction of the clean latents
(``Step.x0``), as AUTOMATIC1111 returns the partly finished images. An interrupt ends the job there;
a skip goes on with the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..diffusion.samplers import Step, get_sampler
from ..images import tensor_to_pil
from ..pipeline.features import FEATURES
from .registry import ModelEntry, ModelRegistry
from .schema import GenerationJob
from .worker import Interrupted, JobControl, Skipped


@dataclass
class JobResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: object  # the GenerationRequest of the first batch, with its size filled in
    model_name: str
    model_hash: str | None
    sampler_label: str
    timestamp: str
    interrupted: bool
    steps_completed: int
    subseeds: list[int] | None = None  # the variation seeds, when subseed_strength > 0


def run_generation(job: GenerationJob, registry: ModelRegistry, control: JobControl) -> JobResult:
    entry = job.model or registry.current
    sd = registry.select(entry) if job.keep_model else registry.load(entry)
    request = job.request
    if request.width is None or request.height is None:  # OpenAI's size "auto": the model's own size
        request = request.replace(width=request.width or sd.config.sample_size,
                                  height=request.height or sd.config.sample_size)
    if job.a1111:  # e.g. Forge's distilled_cfg_scale, sent with every request, on a model without it
        unused = {k: v for feature in FEATURES for k, v in feature.a1111_unused(sd, request).items()}
        request = request.replace(**unused) if unused else request

    def preview(x0) -> Image.Image:
        return tensor_to_pil(sd.decode_preview(x0))[0]  # TAESD when there is one: a fraction of the VAE's cost

    images, seeds, infotexts, interrupted = [], [], [], False
    subseeds: list[int] = []
    for i in range(job.n_iter):
        batch = request.replace(seed=request.seed + i * request.batch_size) if i else request
        last: list[Step] = []

        def on_step(step: Step) -> None:
            last[:] = [step]
            control.step(step.index, step.total, step.x0, preview)

        try:
            control.begin_batch(i, job.n_iter, batch.steps)
            result = sd.run(batch, callback=on_step)
            images += result.images
            seeds += result.seeds
            infotexts += result.infotexts
            subseeds += result.subseeds or []
        except (Interrupted, Skipped) as stop:
            if last:
                batch_seeds = [batch.seed + k for k in range(batch.batch_size)]
                images += tensor_to_pil(sd.decode_latents(last[0].x0))
                seeds += batch_seeds
                infotexts += [sd.infotext(batch, seed, batch.width, batch.height) for seed in batch_seeds]
            if isinstance(stop, Interrupted):
                interrupted = True
                break
    return JobResult(images, seeds, infotexts, request, sd.name, sd.model_hash, get_sampler(request.sampler).label,
                     control.timestamp, interrupted, control.steps_completed, subseeds or None)


def switch_model(entry: ModelEntry, registry: ModelRegistry, control: JobControl) -> ModelEntry:
    registry.select(entry)
    return entry

"""AUTOMATIC1111's ``/sdapi/v1`` API, as the ``webuiapi`` package and the editor plug-ins call it.

Same paths, field names, defaults and response shapes; see ``schema.py`` for the request mapping.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedulers import SCHEDULERS
from ..pipeline.features.hires import UPSCALERS
from .extras import extras_batch, extras_single, upscalers_list
from .jobs import run_generation, switch_model
from .schema import RequestError, a1111_info, a1111_job, png_base64, png_info, read_json

# routes clients probe at start-up that name features torchsd does not have: an empty list each
EMPTY_LISTS = ("sd-vae", "hypernetworks", "face-restorers",
               "realesrgan-models", "script-info", "extensions")


def scheduler_items() -> list[dict]:
    """/schedulers: A1111's items for each of torchsd's noise schedules ("Automatic" first)."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": -1.0,
             "need_inner_model": False} for s in SCHEDULERS.values()]


def latent_upscale_modes() -> list[dict]:
    """/latent-upscale-modes: the hires fix's latent-space upscalers, by their A1111 names."""
    return [{"name": name} for name, (space, _, _) in UPSCALERS.items() if space == "latent"]


def router(state) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")
    config, registry, worker = state.config, state.registry, state.worker

    async def generate(request: Request, img2img: bool) -> dict:
        body = await read_json(request)
        job = await run_in_threadpool(a1111_job, body, img2img=img2img, config=config, registry=registry,
                                      options=state.options)
        result = await state.run("img2img" if img2img else "txt2img", run_generation, job, registry)

        def encode() -> list[str]:
            return [png_base64(image, text) for image, text in zip(result.images, result.infotexts)]

        images = await run_in_threadpool(encode) if job.send_images else []
        return {"images": images, "parameters": job.parameters, "info": a1111_info(job, result)}

    @api.post("/txt2img")
    async def txt2img(request: Request):
        return await generate(request, img2img=False)

    @api.post("/img2img")
    async def img2img(request: Request):
        return await generate(request, img2img=True)

    @api.get("/options")
    def get_options():
        current = registry.current
        return {**state.options, "sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256}

    @api.post("/options")
    async def set_options(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise RequestError("the options must be a JSON object, e.g. {\"sd_model_checkpoint\": \"TITLE\"}")
        if "CLIP_stop_at_last_layers" in body:
            value = body["CLIP_stop_at_last_layers"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"CLIP_stop_at_last_layers must be an integer >= 1; got {value!r}")
        if body.get("sd_model_checkpoint") is not None:
            entry = registry.find(body["sd_model_checkpoint"])
            if entry is not registry.current:
                await state.run("load model", switch_model, entry, registry)
        state.options.update({k: v for k, v in body.items() if k in state.options})
        return None

    @api.get("/sd-models")
    def sd_models():
        return [entry.describe() for entry in registry.entries]

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints():
        registry.refresh()
        return None

    @api.get("/samplers")
    def samplers():
        return [{"name": spec.label, "aliases": [spec.name, *spec.aliases], "options": dict(spec.options)}
                for spec in SAMPLERS.values()]

    @api.get("/schedulers")
    def schedulers():
        return scheduler_items()

    @api.get("/progress")
    def progress(skip_current_image: bool = False):
        control, job_count = worker.snapshot()
        state_dict = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                      "job_count": job_count, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                      "sampling_steps": 0}
        if control is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state_dict, "current_image": None,
                    "textinfo": "waiting" if job_count else None}
        state_dict.update(skipped=control.skipped.is_set(), interrupted=control.interrupted.is_set(),
                          job=control.name, job_timestamp=control.timestamp, job_no=control.batch_index,
                          sampling_step=control.sampling_step, sampling_steps=control.sampling_steps)
        fraction = control.progress
        elapsed = time.monotonic() - control.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        image = None if skip_current_image else worker.preview()
        return {"progress": fraction, "eta_relative": eta, "state": state_dict,
                "current_image": png_base64(image, None) if image is not None else None,
                "textinfo": f"batch {control.batch_index + 1}/{control.batch_count}, "
                            f"step {control.sampling_step}/{control.sampling_steps}"}

    @api.post("/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @api.post("/skip")
    def skip():
        worker.skip()
        return {}

    @api.post("/png-info")
    async def png_info_route(request: Request):
        body = await read_json(request)
        return await run_in_threadpool(png_info, body, config)

    @api.get("/loras")
    def loras():
        return registry.loras()

    @api.post("/refresh-loras")
    def refresh_loras():
        return None

    @api.get("/embeddings")
    def embeddings():
        sd = registry.loaded(registry.current)
        return registry.embeddings(sd.config.text.width if sd is not None else None)

    @api.get("/prompt-styles")
    def prompt_styles():
        return registry.styles.as_list()

    @api.get("/upscalers")
    def upscalers():
        return upscalers_list(registry.upscalers)

    async def extras(request: Request, function) -> dict:
        body = await read_json(request)
        # on the worker, one job at a time like generations: an ESRGAN pass is as heavy as a sampling step
        return await state.run("extras", lambda control: function(body, registry.upscalers, config,
                                                                  registry.device))

    @api.post("/extra-single-image")
    async def extra_single_image(request: Request):
        return await extras(request, extras_single)

    @api.post("/extra-batch-images")
    async def extra_batch_images(request: Request):
        return await extras(request, extras_batch)

    @api.get("/latent-upscale-modes")
    def latent_modes():
        return latent_upscale_modes()

    @api.get("/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    for name in EMPTY_LISTS:
        api.add_api_route(f"/{name}", lambda: [], methods=["GET"], name=name)
    return api

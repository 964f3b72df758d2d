"""The AUTOMATIC1111 ControlNet extension's routes (``/controlnet/...``), as webuiapi calls them.

Units themselves come in txt2img/img2img bodies (``alwayson_scripts.controlnet.args``), read by the
control feature (``pipeline/features/control.py``); models are found in ``<models-dir>/ControlNet``, and the
bundled ControlNet is listed as ``bundled`` while the bundled model is the current one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from ..checkpoints import bundled_controlnet_path, bundled_model_path
from ..checkpoints.controlnet import find_controlnets
from ..pipeline.features.control import BUNDLED
from ..pipeline.features.control_detect import MODULES, detect, module_name
from .schema import RequestError, decode_image, png_base64, read_json

CONTROLNET_FOLDER = "ControlNet"
VERSION = 2  # the extension's API version webuiapi checks


def router(state) -> APIRouter:
    api = APIRouter(prefix="/controlnet")
    config, registry = state.config, state.registry

    def folders():
        return [registry.models_dir / CONTROLNET_FOLDER] if registry.models_dir is not None else []

    @api.get("/version")
    def version():
        return {"version": VERSION}

    @api.get("/model_list")
    def model_list():
        names = set(find_controlnets(folders()))
        # the bundled ControlNet fits the bundled model's U-Net only: offered while that model is the current one
        if registry.current.path == bundled_model_path().resolve() and bundled_controlnet_path().is_file():
            names.add(BUNDLED)
        return {"model_list": sorted(names)}

    @api.get("/module_list")
    def module_list(alias_names: bool = False):
        detail = {}
        for name, (a, b) in MODULES.items():
            sliders = [{"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}]
            sliders += [{"name": s[0], "value": s[1], "min": 1, "max": 255} for s in (a, b) if s is not None]
            detail[name] = {"model_free": True, "sliders": sliders}
        return {"module_list": list(MODULES), "module_detail": detail}

    @api.post("/detect")
    async def detect_route(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")

        def run() -> dict:
            try:
                module = module_name(body.get("controlnet_module") or "none")
            except ValueError as err:
                raise RequestError(str(err)) from None
            images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
            if not isinstance(images, list) or not images:
                raise RequestError("controlnet_input_images must be a non-empty list of base64 images")
            low, high = body.get("controlnet_threshold_a"), body.get("controlnet_threshold_b")
            out = []
            for i, data in enumerate(images):
                image = decode_image(data, f"controlnet_input_images[{i}]", config.max_image_pixels)
                try:
                    detected = detect(image, module, _number(low), _number(high))
                except ValueError as err:
                    raise RequestError(str(err)) from None
                out.append(png_base64(detected, None))
            return {"images": out, "info": "Success"}

        return await run_in_threadpool(run)

    return api


def _number(value) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None  # the extension sends -1 for "the module's default"
    return float(value)

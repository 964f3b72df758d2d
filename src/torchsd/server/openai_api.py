"""OpenAI's images API: ``POST /v1/images/generations`` (and ``GET /v1/models``), for ``openai.OpenAI(base_url=...)``.

``model`` picks one of the server's models by title or name; OpenAI's own model names (dall-e-*,
gpt-image-*) mean the current model. torchsd's extras (negative_prompt, steps, cfg_scale, seed,
sampler) may come in the body, e.g. through the client's ``extra_body=``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from .jobs import run_generation
from .schema import openai_job, openai_response, read_json


def router(state) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.post("/images/generations")
    async def generations(request: Request):
        body = await read_json(request)
        job, response_format = await run_in_threadpool(openai_job, body, config=state.config,
                                                        registry=state.registry, options=state.options)
        result = await state.run("openai images", run_generation, job, state.registry)
        return await run_in_threadpool(openai_response, result, response_format)

    @api.get("/models")
    def models():
        return {"object": "list", "data": [{"id": entry.title, "object": "model", "created": 0, "owned_by": "torchsd"}
                                           for entry in state.registry.entries]}

    return api

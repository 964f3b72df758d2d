"""The FastAPI application: one worker, the two APIs, the web page, and the rules every request meets.

Every route (the web page included) needs the key when one is set, as ``Authorization: Bearer KEY``
(OpenAI clients) or HTTP Basic with the key as the password (AUTOMATIC1111 clients, browsers). Request
bodies are capped before they are read; errors become JSON with the status the error carries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..diffusion.samplers import get_sampler
from ..pipeline import flow_run
from ..pipeline.features.flow import default_distilled_cfg
from ..pipeline.flow_model import FlowPipeline
from .config import ServerConfig
from .registry import ModelNotFound, ModelRegistry
from .schema import PayloadTooLarge, RequestError
from .worker import QueueFull, Worker

log = logging.getLogger("torchsd.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerState:
    config: ServerConfig
    registry: ModelRegistry
    worker: Worker
    options: dict = field(default_factory=lambda: {"CLIP_stop_at_last_layers": 1, "samples_format": "png",
                                                   "eta_ddim": 0.0, "eta_ancestral": 1.0, "sd_vae": "Automatic",
                                                   "show_progress_every_n_steps": 1, "live_previews_enable": True})

    async def run(self, name: str, function, *args):
        """Queue ``function(*args, control)`` on the worker and wait for it (503 when the queue is full)."""
        future = self.worker.submit(name, partial(function, *args))
        try:
            return await asyncio.wrap_future(future)
        except (ValueError, LookupError):  # bad input found late (a model file that will not load, …)
            raise
        except Exception as err:
            log.error("job %r failed", name, exc_info=err)
            raise JobFailed(f"{type(err).__name__}: {err}") from None


class JobFailed(Exception):
    """A job crashed: its request gets 500 and the message; the worker and other requests go on."""


# --- errors ---------------------------------------------------------------------------------------------------

def error_response(request_path: str, status: int, message: str, kind: str,
                   headers: dict | None = None) -> JSONResponse:
    if request_path.startswith("/v1/"):  # the shape OpenAI clients read their message from
        content = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                             "param": None, "code": None}}
    elif request_path.startswith("/sdapi/"):  # AUTOMATIC1111's shape
        content = {"error": kind, "detail": message, "body": "", "errors": message}
    else:
        content = {"detail": message}
    return JSONResponse(content, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return error_response(request.url.path, err.status, str(err), type(err).__name__)

    @app.exception_handler(ModelNotFound)
    async def model_not_found(request: Request, err: ModelNotFound):
        return error_response(request.url.path, 404, str(err.args[0]), "ModelNotFound")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return error_response(request.url.path, 503, str(err), "QueueFull", {"Retry-After": str(err.retry_after)})

    @app.exception_handler(ValueError)  # GenerationRequest, checkpoints: messages written for users
    async def value_error(request: Request, err: ValueError):
        return error_response(request.url.path, 422, str(err), type(err).__name__)

    @app.exception_handler(JobFailed)
    async def job_failed(request: Request, err: JobFailed):
        return error_response(request.url.path, 500, str(err), "JobFailed")


# --- middleware: plain ASGI, so it covers every route, static files included -------------------------------

class KeyAuth:
    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            return secrets.compare_digest(value, self.key)
        if scheme.lower() == b"basic":
            try:
                _user, _, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(password, self.key)
        return False

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        if self._authorized(header):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        challenge = 'Bearer realm="torchsd"' if path.startswith("/v1/") else 'Basic realm="torchsd", charset="UTF-8"'
        message = ("this server needs its API key: send 'Authorization: Bearer KEY', or HTTP Basic auth with "
                   "the key as the password")
        response = error_response(path, 401, message, "Unauthorized", {"WWW-Authenticate": challenge})
        await response(scope, receive, send)


class LocalHostOnly:
    """On a loopback address, answer only requests addressed to this machine by name or number.

    A web page can point its own domain name at 127.0.0.1 (DNS rebinding) and then read the answers;
    its requests still carry its domain in the Host header, and that is refused here."""

    HOSTS = {b"127.0.0.1", b"localhost", b"[::1]"}

    def __init__(self, app, enabled: bool):
        self.app, self.enabled = app, enabled

    async def __call__(self, scope, receive, send):
        if not self.enabled or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"")
        name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
        if name.lower() in self.HOSTS:
            return await self.app(scope, receive, send)
        message = (f"this server listens on a loopback address and answers only to 127.0.0.1 or localhost, "
                   f"not to Host {host.decode(errors='replace')!r}; to serve other machines, start it with "
                   f"--host and --api-key (behind a reverse proxy: have it send 'Host: localhost')")
        await error_response(scope.get("path", ""), 421, message, "MisdirectedRequest")(scope, receive, send)


class BodyLimit:
    """Refuses bodies over the limit: at once from Content-Length, else while they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return (f"the request body is larger than this server's limit of {self.max_bytes // (1024 * 1024)} MiB; "
                f"send smaller images")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(scope.get("path", ""), 413, self._message(), "PayloadTooLarge")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(self._message())
            return message

        await self.app(scope, counted_receive, send)


# --- the application ---------------------------------------------------------------------------------------------

def model_info(family: str | None, sd) -> dict:
    """/info's part about the loaded model, for the web page's model-dependent controls: its family, whether it
    takes FLUX.1-dev's distilled CFG (embedded guidance: FLUX.1-dev has it, schnell not; read from the loaded
    model, which knows, rather than guessed from file names), and for flow models (SD 3 / FLUX.1) the samplers
    and features their run accepts (None: all of them). /sdapi/v1/samplers stays A1111's full list."""
    if sd is None:  # not in memory (the server loads its model at start and on a switch, so rarely)
        return {"family": family, "guidance_embedded": None, "distilled_cfg": None, "samplers": None,
                "features": None}
    flow = isinstance(sd, FlowPipeline)
    samplers = [get_sampler(name).label for name in (*flow_run.FLOW_SAMPLERS, *flow_run.SAME_AS)]
    return {"family": family, "guidance_embedded": bool(getattr(sd.config, "guidance_embedded", False)),
            "distilled_cfg": default_distilled_cfg(sd.config),  # the field's value for this model (Fill: 30)
            "samplers": samplers if flow else None,
            "features": [feature.name for feature in flow_run.SUPPORTED_FEATURES] if flow else None}


def create_app(config: ServerConfig, registry: ModelRegistry | None = None, *, preload: bool = True) -> FastAPI:
    """The app; ``preload`` loads the default model now, so a broken model fails at start, not at first use."""
    from . import a1111, controlnet, openai_api

    if registry is None:
        registry = ModelRegistry(config.models_dir, config.model, device=config.device_or_default,
                                 dtype=config.dtype_or_default, max_loaded=config.max_loaded_models, vae=config.vae,
                                 variant=config.variant, runtime=config.runtime, styles_file=config.styles_file,
                                 taesd=config.taesd, fast_decode=config.fast_decode)
    if preload:
        registry.pipeline()
    state = ServerState(config, registry, Worker(config.queue_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="torchsd", version=__version__, lifespan=lifespan)
    app.state.torchsd = state
    add_error_handlers(app)
    app.include_router(a1111.router(state))
    app.include_router(openai_api.router(state))
    app.include_router(controlnet.router(state))

    @app.get("/info")
    def info():
        """What the web page needs: the current model, its native size and what it runs, and this server's limits."""
        sd = registry.loaded(registry.current)
        return {"version": __version__, "model": registry.current.title,
                "sample_size": sd.config.sample_size if sd is not None else None,
                **model_info(registry.current.family, sd),
                "inpainting": True,
                "limits": {"max_side": config.max_side, "max_steps": config.max_steps,
                           "max_images": config.max_images, "queue_size": config.queue_size}}

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(KeyAuth, key=config.api_key)
    app.add_middleware(LocalHostOnly, enabled=config.is_loopback)  # added last = runs first
    return app


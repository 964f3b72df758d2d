"""``torchsd serve``: the AUTOMATIC1111 and OpenAI APIs and the web page, on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..runtime import add_model_arguments

API_KEY_ENV = "TORCHSD_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP server: AUTOMATIC1111 and OpenAI APIs, web page",
                              description="Serve the AUTOMATIC1111 API (/sdapi/v1), the OpenAI images API "
                                          "(/v1/images/generations) and a web page (/).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder of .safetensors/.ckpt files and diffusers folders, with Lora/ and embeddings/")
    p.add_argument("--api-key", default=None,
                   help="require this key on every route (Bearer, or Basic auth password); "
                        f"also read from ${API_KEY_ENV}")
    p.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more get 503 (default 8)")
    p.add_argument("--max-side", type=int, default=2048, help="largest width or height in pixels")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="most images per request")
    p.add_argument("--max-body-mb", type=int, default=50, help="largest request body in MiB")
    p.add_argument("--styles-file", type=Path, default=None, metavar="FILE",
                   help="AUTOMATIC1111's styles.csv for the API's styles field (default: <models-dir>/styles.csv)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ValueError(f"the server needs FastAPI and uvicorn ({err}); install them with "
                         f"pip install 'torchsd[server]'") from None

    from ..runtime import runtime_options_from_args
    from .app import create_app
    from .config import ServerConfig

    config = ServerConfig(
        host=args.host, port=args.port, models_dir=args.models_dir, model=Path(args.model) if args.model else None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, device=args.device, dtype=args.dtype,
        queue_size=args.queue_size, max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
        max_body_bytes=args.max_body_mb * 1024 * 1024, vae=getattr(args, "vae", None),
        variant=getattr(args, "variant", None), styles_file=args.styles_file,
        taesd=getattr(args, "taesd", None), fast_decode=getattr(args, "fast_decode", False),
        runtime=runtime_options_from_args(args))
    if not config.is_loopback and config.api_key is None:
        print(f"torchsd: warning: listening on {config.host} without --api-key: anyone who can reach this "
              f"address can use the server", file=sys.stderr)
    app = create_app(config)
    state = app.state.torchsd
    print(f"torchsd: serving {state.registry.current.title} on http://{config.host}:{config.port} "
          f"({config.device_or_default}, queue {config.queue_size})", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0

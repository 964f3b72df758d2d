"""``ServerConfig``: where the server listens, who may use it, and the limits every request is held to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..runtime import RuntimeOptions, default_dtype


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Path | None = None
    model: Path | None = None  # None: the bundled model, else the first model found in models_dir
    api_key: str | None = None
    device: str | None = None
    dtype: torch.dtype | None = None
    queue_size: int = 8  # jobs waiting behind the running one; more get 503 + Retry-After
    max_side: int = 2048  # width and height, pixels
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter (A1111) or n (OpenAI) per request
    max_body_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # uploaded images larger than this are refused before decoding
    max_loaded_models: int = 1
    vae: Path | None = None  # a VAE for every model
    variant: str | None = None  # diffusers folders' weights variant ("fp16"), for every folder model
    styles_file: Path | None = None  # AUTOMATIC1111's styles.csv (default: <models-dir>/styles.csv if there)
    taesd: Path | None = None  # previews through TAESD (None: <models-dir>/VAE-taesd if it exists, else the VAE)
    fast_decode: bool = False  # final images through TAESD too
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # as the CLI's flags give it (runtime.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535; got {self.port}")
        for name in ("queue_size", "max_side", "max_steps", "max_images", "max_body_bytes", "max_image_pixels",
                     "max_loaded_models"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.max_side % 8:
            raise ValueError(f"max_side must be a multiple of 8; got {self.max_side}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty; leave --api-key out to run without one")
        if self.styles_file is not None and not Path(self.styles_file).is_file():
            raise ValueError(f"--styles-file {str(self.styles_file)!r} does not exist; give AUTOMATIC1111's "
                             f"styles.csv (columns name, prompt, negative_prompt)")
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            raise ValueError(f"--models-dir {str(self.models_dir)!r} is not a folder; create it or point to the "
                             f"folder that holds your .safetensors/.ckpt files and diffusers folders")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def device_or_default(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype_or_default(self) -> torch.dtype:
        """As the CLI's: float16 on accelerators, bfloat16 on CPUs with native bf16, else float32."""
        if self.dtype is not None:
            return self.dtype
        return default_dtype(self.device_or_default)

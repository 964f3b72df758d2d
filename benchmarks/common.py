"""Shared by the benchmark scripts: SD 1.5-size random weights built once and shared with diffusers,
timing that tolerates a noisy machine, and peak-memory sampling."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch

from torchsd.checkpoints.diffusers import (
    schedule_config_to_diffusers,
    text_config_to_transformers,
    to_diffusers_keys,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from torchsd.config import ModelConfig
from torchsd.pipeline import StableDiffusion

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality"


def build(config: ModelConfig | None = None, seed: int = 0) -> StableDiffusion:
    """torchsd models with PyTorch's default initialisation (activations of a realistic scale)."""
    return StableDiffusion.from_config(config or ModelConfig.sd15(), seed=seed, name="random-sd15")


def _public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _share(model, state):
    """Load ``state`` into a model built on the meta device, taking the tensors themselves (no copy;
    ``.contiguous()`` copies only weights that torchsd keeps channels-last)."""
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True, strict=False)
    return model.eval().requires_grad_(False)


def _assert_shared(name: str, model) -> None:
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"diffusers {name}: tensors not shared: {left[:5]}"


def diffusers_unet(sd: StableDiffusion, copy: bool = False):
    """A diffusers UNet2DConditionModel holding the *same tensors* as ``sd.unet`` (see ``_share``), or
    with ``copy`` its own copy of them: torchsd's sampling loop packs weights only where no other tensor
    shares them (``torchsd.accel.prepacked``), so a benchmark of that loop must not share."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_public(unet_config_to_diffusers(sd.config.unet, sd.config.sample_size // 8)))
    state = to_diffusers_keys(sd.unet.state_dict(), "unet")
    _share(unet, {k: v.clone() for k, v in state.items()} if copy else state)
    _assert_shared("unet", unet)
    return unet


def diffusers_pipeline(sd: StableDiffusion, tokenizer_dir: str, copy_unet: bool = False):
    """A diffusers StableDiffusionPipeline whose networks hold the *same tensors* as ``sd`` (no copy;
    ``.contiguous()`` copies only weights that torchsd keeps channels-last), except the U-Net's with
    ``copy_unet`` (see ``diffusers_unet``). DDIM, as torchsd's default."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    size = sd.config.sample_size
    unet = diffusers_unet(sd, copy=copy_unet)
    with torch.device("meta"):
        vae = AutoencoderKL(**_public(vae_config_to_diffusers(sd.config.vae, size)))
        text = CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(sd.config.text)))
    _share(vae, to_diffusers_keys(sd.vae.state_dict(), "vae"))
    state = to_diffusers_keys(sd.text_encoder.state_dict(), "text_encoder")
    if not any(k.startswith("text_model.") for k in text.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    _share(text, state)
    embeddings = getattr(text, "text_model", text).embeddings
    if embeddings.position_ids.is_meta:  # a non-persistent buffer: not in any state dict
        embeddings.position_ids = torch.arange(sd.config.text.max_positions,
                                               device=embeddings.token_embedding.weight.device)[None]
    for name, model in (("vae", vae), ("text", text)):
        _assert_shared(name, model)
    scheduler = DDIMScheduler(**_public(schedule_config_to_diffusers(sd.config.schedule)))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free() -> None:
    """Give freed tensors back to the system between phases (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every few ms while active: ``peak`` and ``baseline``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        free()
        self.baseline = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        """Peak above the baseline: activations and workspace, the weights being shared."""
        return self.peak - self.baseline


@contextmanager
def timer(out: list):
    start = time.perf_counter()
    yield
    out.append(time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


def timed(fn, repeats: int, warmup: bool) -> float:
    """Best wall seconds of ``repeats`` calls (after one uncounted call with ``warmup``): plain timing, for
    kernels of a few milliseconds that ``compare``'s RSS sampling and trimming would disturb."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def compare(fns: dict, reps: int, warmup: int = 1) -> dict[str, dict]:
    """Time each function ``reps`` times, interleaved (A B A B …) so that load changes on a shared
    machine hit both alike; the first ``warmup`` calls of each are not counted. Returns per name:
    min and median wall seconds, min CPU seconds (less sensitive to other processes on the machine,
    as long as threads do not spin-wait), and the peak RSS above baseline over its calls."""
    results = {name: {"times": [], "cpu": [], "peak_extra": 0, "peak": 0} for name in fns}
    with torch.inference_mode():
        for rep in range(warmup + reps):
            for name, fn in fns.items():
                with PeakRSS() as mem:
                    start, cpu_start = time.perf_counter(), cpu_seconds()
                    fn()
                    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
                r = results[name]
                if rep >= warmup or reps == 0:  # a first call also allocates caches that stay
                    r["peak_extra"] = max(r["peak_extra"], mem.extra)
                    r["peak"] = max(r["peak"], mem.peak)
                if rep >= warmup:
                    r["times"].append(seconds)
                    r["cpu"].append(cpu)
    for r in results.values():
        r["min"], r["median"], r["cpu_min"] = min(r["times"]), statistics.median(r["times"]), min(r["cpu"])
    return results


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def load_note() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])
    except OSError:
        return ""

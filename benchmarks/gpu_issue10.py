"""The speed-and-memory features on a GPU: what the CPU tests cannot see, each as PASS / FAIL (SKIP
where it needs CUDA, INFO where it only reports) with its measured figure. SD 1.5-size random weights,
float16 (f: also bfloat16).

  a  sync      the sampler loop never makes the host wait for the GPU: each sampler's loop (as
               ``StableDiffusion.sample`` calls it, 256x256, CFG) runs under
               ``torch.cuda.set_sync_debug_mode``: "warn" counts every synchronising op by call site,
               "error" shows the traceback of the first one. The whole ``sd.sample`` is reported too.
  b  offload   model offload: peak VRAM of text encode + loop + decode at 512x512 with and without,
               which networks are on the GPU when each runs, max |latent difference|.
  c  offload   sequential offload: the same, and every layer on the GPU exactly while it runs.
  d  nan       a non-finite float16 decode is redone in float32 (forced by a hook, as the CPU tests do,
               and by latents past float16's range), and a result still not finite raises.
  e  tiling    1024x1024 float16 decode, tiled (512 px tiles, 64 overlap) against untiled: peak VRAM
               above what was allocated before, time, PSNR.
  f  unet      one guided U-Net step at 512x512 (batch 1, CFG), fp16 and bf16: torchsd against a
               diffusers UNet2DConditionModel holding the same weights: median ms of 10 steps (CUDA
               events) and the error of each against torchsd in float32 (and float32 parity).

    PYTHONPATH=src python benchmarks/gpu_issue10.py                   # CUDA: the checks above
    PYTHONPATH=src python benchmarks/gpu_issue10.py --cpu-smoke       # tiny model on the CPU: the same
                                                                      # code paths, CUDA-only parts SKIP
    bash benchmarks/gpu_issue10.sh                                    # this, then gpu_sd15.py; logs in $OUT

Every part runs in its own try/except: a failure prints its traceback and the next part runs. The
results are printed as they come, as a table at the end, and written to OUT/issue10.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEGATIVE, PROMPT, diffusers_unet  # noqa: E402
from cuda_syncs import first_sync_error, record_syncs  # noqa: E402
from gpu_sd15 import build  # noqa: E402
from torchsd.accel import enable_model_offload, enable_sequential_offload  # noqa: E402
from torchsd.config import ModelConfig  # noqa: E402
from torchsd.diffusion.denoisers import ModelDenoiser, classifier_free_guidance, sigma_per_image  # noqa: E402
from torchsd.diffusion.samplers import build_sigmas, initial_noise_scale, resolve_sampler, sampler_options  # noqa: E402
from torchsd.models.tiling import VAETiling  # noqa: E402
from torchsd.noise import make_generators, randn  # noqa: E402
from torchsd.pipeline import GenerationRequest, autoencoding  # noqa: E402
from torchsd.pipeline.autoencoding import float32_copy  # noqa: E402
from torchsd.runtime import RuntimeOptions, apply_runtime  # noqa: E402

GUIDANCE = 7.5
SEED = 1
SYNC_SAMPLERS = ("ddim", "euler", "dpmpp_2m", "unipc", "euler_a")  # euler_a draws fresh noise every step
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and precisions of one run: SD 1.5 on CUDA, or the tiny model on the CPU (smoke test)."""

    device: torch.device
    config: ModelConfig
    dtype: torch.dtype  # the pipeline's (a-c, e)
    half: torch.dtype  # the half precision whose NaN fallback d checks
    sync_size: int  # a
    image_size: int  # b, c, d
    tiled_size: int  # e
    tiling: VAETiling  # e
    step_size: int  # f
    step_dtypes: tuple[str, ...]  # f
    steps: int  # sampler steps in a-c
    warmup: int  # f
    reps: int  # f

    @classmethod
    def cuda(cls) -> "Plan":
        return cls(torch.device("cuda"), ModelConfig.sd15(), torch.float16, torch.float16, sync_size=256,
                   image_size=512, tiled_size=1024, tiling=VAETiling(), step_size=512, step_dtypes=("fp16", "bf16"),
                   steps=4, warmup=3, reps=10)

    @classmethod
    def cpu_smoke(cls) -> "Plan":
        return cls(torch.device("cpu"), ModelConfig.tiny(), torch.float32, torch.float16, sync_size=64,
                   image_size=64, tiled_size=128, tiling=VAETiling(tile_size=64, overlap=16), step_size=64,
                   step_dtypes=("fp16", "bf16"), steps=2, warmup=1, reps=3)

    @property
    def cuda_device(self) -> bool:
        return self.device.type == "cuda"


# --- reporting ------------------------------------------------------------------------------------

class Report:
    """Result rows, printed as they come and rewritten to ``out/issue10.json`` after each."""

    def __init__(self, out: Path | None, env: dict):
        self.rows: list[dict] = []
        self.out = out
        self.env = env

    def add(self, part: str, check: str, status: str, figure: str, detail: str = "") -> None:
        self.rows.append({"part": part, "check": check, "status": status, "figure": figure, "detail": detail})
        print(f"  [{status}] {part}. {check}: {figure}" + (f"\n         {detail}" if detail else ""), flush=True)
        self.save()

    def check(self, part: str, check: str, ok: bool, figure: str, detail: str = "") -> None:
        self.add(part, check, "PASS" if ok else "FAIL", figure, detail)

    def save(self) -> None:
        if self.out is not None:
            (self.out / "issue10.json").write_text(json.dumps({"env": self.env, "results": self.rows}, indent=1))

    def summary(self) -> str:
        width = max([len(f"{r['part']}. {r['check']}") for r in self.rows] + [10])
        lines = [f"{'check':<{width}}  {'result':<6}  figure"]
        lines += [f"{r['part'] + '. ' + r['check']:<{width}}  {r['status']:<6}  {r['figure']}" for r in self.rows]
        counts = {s: sum(r["status"] == s for r in self.rows) for s in ("PASS", "FAIL", "SKIP", "INFO")}
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return "\n".join(lines)


def run_part(report: Report, part: str, title: str, fn, *args) -> None:
    """One part; an exception becomes a FAIL row with its traceback in the log, and the run goes on."""
    print(f"\n== {part}. {title}", flush=True)
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 -- one broken part must not cost the others' figures
        traceback.print_exc(file=sys.stdout)
        report.add(part, title, "FAIL", f"{type(err).__name__}: {first_line(err)}")
    finally:
        release()
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)


def first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else ""


def gib(n: float) -> str:
    return "n/a" if math.isnan(n) else f"{n / 2 ** 30:.2f} GiB"


# --- measuring ------------------------------------------------------------------------------------

def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DevicePeak:
    """Peak device memory allocated inside the block: ``peak`` (absolute) and ``extra`` (above what was
    allocated on entry). NaN on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.extra = self.base = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.extra = self.peak - self.base


def check_sync_recorder(report: Report) -> None:
    """On a CPU: the recorder against simulated syncs (torch's own warning and error texts), so that a
    mistake in it cannot waste the GPU run."""
    def fake_sync(error: bool = False):
        if error:
            raise RuntimeError("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")

    def loop():
        for _ in range(3):
            fake_sync()

    sites = record_syncs(loop, set_mode=lambda mode: None)
    error = first_sync_error(lambda: fake_sync(error=True), set_mode=lambda mode: None)
    counts = {site.split()[-1]: count for site, (count, _) in sites.items()}
    ok = counts == {"fake_sync": 3} and error is not None and "fake_sync" in error
    report.check("a", "sync recorder self-test (simulated syncs)", ok, describe_syncs(sites, 3) or "nothing recorded")


def gpu_times_ms(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-call times of ``fn`` run back to back: CUDA events between calls (no host wait inside the
    timed run, so a launch-bound call is measured as it runs); wall-clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        marks[0].record()
        for i in range(reps):
            fn()
            marks[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (as tests/reference.max_rel_error)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] on the 0-255 scale, unrounded (as benchmarks/cpu_vs_diffusers.py)."""
    a, b = (((x.float().cpu().clamp(-1, 1) + 1) * 127.5) for x in (a, b))
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


# --- a. no host-device syncs in the sampler loop ----------------------------------------------------

def prepared_loop(sd, plan: Plan, sampler: str, cond: torch.Tensor, uncond: torch.Tensor):
    """The call ``StableDiffusion.sample`` makes, set up as it sets it up (CFG, plan.steps steps, seed 1):
    a function that runs the sampler loop alone."""
    spec, scheduler = resolve_sampler(sampler)
    sigmas = build_sigmas(sd.config.schedule, plan.steps, spec, scheduler)
    generators = make_generators([SEED])
    denoise = classifier_free_guidance(sd.denoiser, cond, uncond, GUIDANCE)
    kwargs = sampler_options(spec, generators)
    levels = sigmas.to("cpu", torch.float32)  # as StableDiffusion.sample: read on the host, once
    f = sd.config.vae.downscale_factor
    shape = (1, sd.config.vae.latent_channels, plan.sync_size // f, plan.sync_size // f)
    x = randn(shape, generators).to(sd.device) * initial_noise_scale(sigmas, spec)
    return lambda: spec.function(denoise, x, levels, callback=None, **kwargs)


def describe_syncs(sites: dict[str, list], steps: int) -> str:
    if not sites:
        return ""
    return "; ".join(f"{site} x{count}" + (" (per step)" if count >= max(steps - 1, 2) else "")
                     for site, (count, _) in sorted(sites.items(), key=lambda kv: -kv[1][0]))


def check_syncs(sd, plan: Plan, report: Report) -> None:
    with torch.inference_mode():
        cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
        for sampler in SYNC_SAMPLERS:
            loop = prepared_loop(sd, plan, sampler, cond, uncond)
            loop()  # warm-up: one-off set-up (cuDNN plans, the denoiser's schedule copied to the device)
            check = f"no syncs in the {sampler} loop"
            if not plan.cuda_device:
                report.add("a", check, "SKIP", "sync debug mode needs CUDA (the loop ran on the CPU)")
                continue
            sites = record_syncs(loop)
            error = first_sync_error(loop)
            total = sum(count for count, _ in sites.values())
            report.check("a", check, total == 0 and error is None,
                         f"{total} syncs in {plan.steps} steps at {plan.sync_size}x{plan.sync_size}",
                         describe_syncs(sites, plan.steps))
            for site, (count, stack) in sites.items():
                print(f"    sync at {site} (x{count}), called from:\n{indent(stack)}")
            if error is not None:
                print(f"    set_sync_debug_mode('error') raised:\n{indent(error)}")

        # the pipeline's whole sample() (set-up included) for the default sampler, for the record
        if plan.cuda_device:
            request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=plan.steps,
                                        width=plan.sync_size, height=plan.sync_size, seed=SEED)
            spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
            sigmas = build_sigmas(sd.config.schedule, request.steps, spec, scheduler)
            generators = make_generators([SEED])
            f = sd.config.vae.downscale_factor
            shape = (1, sd.config.vae.latent_channels, plan.sync_size // f, plan.sync_size // f)
            x = randn(shape, generators).to(sd.device)
            x = x * initial_noise_scale(sigmas, spec)
            sites = record_syncs(lambda: sd.sample(request, x, sigmas, cond, uncond, generators))
            total = sum(count for count, _ in sites.values())
            report.add("a", f"sd.sample() with its set-up ({request.sampler})", "INFO",
                       f"{total} syncs in {plan.steps} steps", describe_syncs(sites, plan.steps))
        else:
            report.add("a", "sd.sample() with its set-up", "SKIP", "sync debug mode needs CUDA")
            check_sync_recorder(report)


def indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


# --- b, c. offload ----------------------------------------------------------------------------------

def staged_run(sd, plan: Plan, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Text encode, DDIM loop (CFG, plan.steps steps, seed 1) and VAE decode at plan.image_size through
    the pipeline's own stages: peak device memory and seconds of the whole. ``context`` (cond, uncond)
    stands in where text encoding fails, so that the U-Net and VAE figures still come."""
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=plan.steps, width=plan.image_size,
                                height=plan.image_size, seed=SEED)
    spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
    sigmas = build_sigmas(sd.config.schedule, request.steps, spec, scheduler)
    generators = make_generators([SEED])
    f = sd.config.vae.downscale_factor
    shape = (1, sd.config.vae.latent_channels, plan.image_size // f, plan.image_size // f)
    result: dict = {"text_error": None}
    with torch.inference_mode(), DevicePeak(plan.device) as mem:
        start = time.perf_counter()
        try:
            cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
        except Exception as err:  # noqa: BLE001
            if context is None:
                raise
            traceback.print_exc(file=sys.stdout)
            result["text_error"] = f"text encode failed: {type(err).__name__}: {first_line(err)}"
            cond, uncond = (c.to(sd.device) for c in context)
        x = randn(shape, generators).to(sd.device) * initial_noise_scale(sigmas, spec)
        latents = sd.sample(request, x, sigmas, cond, uncond, generators)
        images = sd.decode_latents(latents)
        sync(plan.device)
        result["seconds"] = time.perf_counter() - start
    result.update(peak=mem.peak, latents=latents.float().cpu(), images=images.cpu(), context=(cond, uncond))
    return result


def failed(run: dict, prefix: str = "", suffix: str = "") -> str:
    """A note for a run whose text encoding failed (its figures are the U-Net's and the VAE's alone)."""
    return f"{prefix}text encode failed (the context without offload stood in){suffix}" if run["text_error"] else ""


class OffloadChecks:
    """b and c share the run without offload (computed once) and the restoring of the pipeline."""

    def __init__(self, sd, plan: Plan, report: Report):
        self.sd, self.plan, self.report = sd, plan, report
        self._baseline: dict | None = None

    def baseline(self) -> dict:
        if self._baseline is None:
            staged_run(self.sd, self.plan)  # warm-up: one-off set-up must not count as the baseline's time
            self._baseline = staged_run(self.sd, self.plan)
            print(f"  without offload: peak {gib(self._baseline['peak'])}, {self._baseline['seconds']:.2f} s")
        return self._baseline

    def restore(self, offload) -> None:
        offload.remove()
        self.sd.execution_device = None
        apply_runtime(self.sd, RuntimeOptions(), self.plan.device, self.plan.dtype)

    def model(self) -> None:
        sd, plan, base = self.sd, self.plan, self.baseline()
        offload = enable_model_offload(sd, plan.device)
        networks = {"text": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        calls: list[tuple[str, dict]] = []
        unet_allocated: list[int] = []

        def watch(name):
            def hook(module, args):
                calls.append((name, {n: all(offload.is_uploaded(p) for p in m.parameters())
                                     for n, m in networks.items()}))
                if name == "unet" and plan.cuda_device:
                    unet_allocated.append(torch.cuda.memory_allocated(plan.device))
            return hook

        # registered after the offload hooks, so they see the state each network computes in
        handles = [(m.decoder if n == "vae" else m).register_forward_pre_hook(watch(n)) for n, m in networks.items()]
        try:
            run = staged_run(sd, plan, base["context"])
        finally:
            for handle in handles:
                handle.remove()
            self.restore(offload)
        alone = all(up[name] and not any(v for n, v in up.items() if n != name) for name, up in calls)
        seen = sorted({name for name, _ in calls})
        dz = float((run["latents"] - base["latents"]).abs().max())
        ok = run["text_error"] is None and alone and seen == ["text", "unet", "vae"] and \
            dz <= 1e-3 * float(base["latents"].abs().max())
        self.report.check(
            "b", "model offload: one network up at a time, same image", ok,
            failed(run, suffix=", ") + f"max|dz| {dz:.2e}, only the running network up: {alone}",
            f"{len(calls)} network calls ({', '.join(seen)}); {base['seconds']:.2f} -> {run['seconds']:.2f} s per "
            f"image" + (f"; {run['text_error']}" if run["text_error"] else ""))
        during_unet = f"; allocated while the U-Net runs {gib(max(unet_allocated))}" if unet_allocated else ""
        self.memory_row("b", "model offload: lower peak VRAM", base, run, during_unet + failed(run, "; "))

    def memory_row(self, part: str, check: str, base: dict, run: dict, detail: str = "") -> None:
        if not self.plan.cuda_device:
            self.report.add(part, check, "SKIP", "peak VRAM needs CUDA")
            return
        self.report.check(part, check, run["peak"] < base["peak"],
                          f"peak {gib(base['peak'])} -> {gib(run['peak'])} ({run['peak'] / base['peak']:.2f}x)",
                          f"text encode + {self.plan.steps} DDIM steps + decode at {self.plan.image_size}x"
                          f"{self.plan.image_size}, {str(self.plan.dtype).removeprefix('torch.')}" + detail)

    def sequential(self) -> None:
        sd, plan, base = self.sd, self.plan, self.baseline()
        offload = enable_sequential_offload(sd, plan.device)
        everything = [p for n in (sd.text_encoder, sd.unet, sd.vae) for p in n.parameters()]
        layers_up: list[bool] = []

        def spy(module, args):
            layers_up.append(all(offload.is_uploaded(p) for p in module.parameters(recurse=False)))

        handles = [m.register_forward_pre_hook(spy) for n in (sd.text_encoder, sd.unet, sd.vae)
                   for m in n.modules() if list(m.parameters(recurse=False))]
        try:
            run = staged_run(sd, plan, base["context"])
            left_up = sum(offload.is_uploaded(p) for p in everything)
        finally:
            for handle in handles:
                handle.remove()
            self.restore(offload)
        dz = float((run["latents"] - base["latents"]).abs().max())
        ok = run["text_error"] is None and all(layers_up) and left_up == 0 and \
            dz <= 1e-3 * float(base["latents"].abs().max())
        self.report.check(
            "c", "sequential offload: layers up only while they run, same image", ok,
            failed(run, suffix=", ") + f"max|dz| {dz:.2e}, layer calls with weights up "
            f"{sum(layers_up)}/{len(layers_up)}, left up {left_up}",
            f"{base['seconds']:.2f} -> {run['seconds']:.2f} s per image"
            + (f"; {run['text_error']}" if run["text_error"] else ""))
        self.memory_row("c", "sequential offload: lower peak VRAM", base, run, failed(run, "; "))


# --- d. half-precision decode: NaN fallback ---------------------------------------------------------

def poison(module: torch.nn.Module, when):
    """A forward hook that fills the output with NaN when ``when(output)`` holds (as tests/test_memory.py)."""
    def hook(m, args, out):
        return torch.full_like(out, float("nan")) if when(out) else out
    return module.register_forward_hook(hook)


@contextmanager
def caught_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def retried(caught) -> bool:
    return any("decoding again in float32" in str(w.message) for w in caught)


def check_nan_fallback(sd, plan: Plan, report: Report) -> None:
    half_name = str(plan.half).removeprefix("torch.")
    dtype_of = lambda m: next(m.parameters()).dtype  # noqa: E731
    # the pipeline's own VAE when it is in that precision (the shared model must be left as it was)
    vae = sd.vae if dtype_of(sd.vae) == plan.half else float32_copy(sd.vae, plan.device).to(plan.half)
    f = sd.config.vae.downscale_factor
    latents = torch.randn(1, sd.config.vae.latent_channels, plan.image_size // f, plan.image_size // f,
                          generator=torch.Generator().manual_seed(8)).to(plan.device)
    with torch.inference_mode():
        expected = autoencoding.decode(float32_copy(vae, plan.device), latents)  # what the retry computes

        calls: list[torch.dtype] = []
        handle = poison(vae.decoder.conv_out, lambda out: calls.append(out.dtype) or out.dtype != torch.float32)
        try:
            with caught_warnings() as caught:
                images = autoencoding.decode(vae, latents)
        finally:
            handle.remove()
        err = max_rel(images, expected)
        ok = retried(caught) and calls == [plan.half] and bool(torch.isfinite(images).all()) and err < 1e-3 \
            and dtype_of(vae) == plan.half
        report.check("d", f"NaN {half_name} decode (hook) redone in float32", ok,
                     f"retry warned: {retried(caught)}, max rel diff to float32 decode {err:.1e}",
                     f"decoder calls: {[str(c).removeprefix('torch.') for c in calls]}; "
                     f"VAE left in {str(dtype_of(vae)).removeprefix('torch.')}")

        if plan.half == torch.float16:
            beyond = latents * 1e5  # float16 tops out at 65504: the cast itself gives Inf
            with caught_warnings() as caught:
                images = autoencoding.decode(vae, beyond)
            report.check("d", "latents past float16's range (x1e5) redone in float32",
                         retried(caught) and bool(torch.isfinite(images).all()),
                         f"retry warned: {retried(caught)}, finite: {bool(torch.isfinite(images).all())}")

        bad = latents.clone()
        bad[0, 0, 0, 0] = float("nan")
        raised = None
        with caught_warnings() as caught:
            try:
                autoencoding.decode(vae, bad)
            except FloatingPointError as error:
                raised = error
        ok = raised is not None and "latents themselves hold NaN or Inf" in str(raised) and retried(caught)
        report.check("d", "still not finite in float32: FloatingPointError", ok,
                     f"retry warned: {retried(caught)}, raised: {type(raised).__name__ if raised else 'nothing'}",
                     first_line(raised) if raised else "")


# --- e. tiled VAE decode ----------------------------------------------------------------------------

def check_tiled_decode(sd, plan: Plan, report: Report) -> None:
    f = sd.config.vae.downscale_factor
    size = plan.tiled_size
    latents = torch.randn(1, sd.config.vae.latent_channels, size // f, size // f,
                          generator=torch.Generator().manual_seed(3)).to(plan.device)
    runs = {}
    with torch.inference_mode():
        for name, tiling in (("untiled", None), ("tiled", plan.tiling)):
            with caught_warnings() as caught:
                autoencoding.decode(sd.vae, latents, tiling=tiling)  # warm-up
                release()
                with DevicePeak(plan.device) as mem:
                    start = time.perf_counter()
                    images = autoencoding.decode(sd.vae, latents, tiling=tiling)
                    sync(plan.device)
                    seconds = time.perf_counter() - start
            runs[name] = {"images": images.cpu(), "extra": mem.extra, "base": mem.base, "seconds": seconds,
                          "retried": retried(caught)}
            print(f"  {name}: +{gib(mem.extra)} above the {gib(mem.base)} allocated before, {seconds:.3f} s"
                  + (" (float32 retry!)" if retried(caught) else ""))
            del images
    agreement = psnr(runs["tiled"]["images"], runs["untiled"]["images"])
    untiled, tiled = runs["untiled"], runs["tiled"]
    dtype = str(plan.dtype).removeprefix("torch.")
    setting = f"{plan.tiling.tile_size} px tiles, {plan.tiling.overlap} px overlap"
    report.check("e", f"tiled {size}x{size} {dtype} decode close to untiled",
                 agreement > 30 and not tiled["retried"] and not untiled["retried"], f"PSNR {agreement:.1f} dB",
                 f"{setting}; {untiled['seconds']:.3f} -> {tiled['seconds']:.3f} s; float32 retry: "
                 f"untiled {untiled['retried']}, tiled {tiled['retried']}")
    if not plan.cuda_device:
        report.add("e", f"tiled {size}x{size} decode: lower peak VRAM", "SKIP", "peak VRAM needs CUDA")
        return
    report.check("e", f"tiled {size}x{size} decode: lower peak VRAM", tiled["extra"] < untiled["extra"],
                 f"+{gib(untiled['extra'])} -> +{gib(tiled['extra'])} ({tiled['extra'] / untiled['extra']:.2f}x)",
                 f"above the {gib(untiled['base'])} allocated before (weights, latents); {setting}")


# --- f. guided U-Net step against diffusers ---------------------------------------------------------

def diffusers_call(unet):
    """diffusers' UNet2DConditionModel as a ``UNetLike`` (one latent per context row)."""
    def call(z, timesteps, context):
        return unet(z, timesteps, encoder_hidden_states=context).sample
    return call


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One guided step's inputs, shared by every precision, and the float32 torchsd U-Net output."""

    x: torch.Tensor  # the sampler's latent (1, 4, h, w), float32
    sigma: float
    cond: torch.Tensor
    uncond: torch.Tensor
    expected: torch.Tensor  # float32 U-Net output for (uncond, cond): (2, 4, h, w)

    def for_unet(self, sd, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the denoiser hands the U-Net: the scaled latent, the timestep, both contexts."""
        s = sigma_per_image(self.sigma, self.x)
        z = self.x * (1.0 / (s ** 2 + 1).sqrt())[:, None, None, None]
        return z.to(dtype), sd.denoiser.timestep(s), torch.cat([self.uncond, self.cond]).to(dtype)


@contextmanager
def exact_float32():
    """float32 convolutions and matmuls without TF32 (cuDNN allows it by default on Ampere and later, which
    moves results by ~1e-3: 8.7e-4 between the two U-Nets, measured on an H100, against 3.5e-6 without)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_unet_step(plan: Plan, report: Report) -> None:
    import diffusers

    f = plan.config.vae.downscale_factor
    x = torch.randn(1, plan.config.unet.in_channels, plan.step_size // f, plan.step_size // f,
                    generator=torch.Generator().manual_seed(4)).to(plan.device)
    with torch.inference_mode(), exact_float32():
        ref = build(plan.config, plan.device, torch.float32)
        cond, uncond = ref.encode_prompt([PROMPT]), ref.encode_prompt([NEGATIVE])
        inputs = StepInputs(x, 3.0, cond, uncond, expected=torch.empty(0))  # sigma 3: mid-schedule
        z, t, c = inputs.for_unet(ref, torch.float32)
        expected = ref.unet(z, t, c)  # torchsd takes the latent once for both contexts
        theirs = diffusers_call(diffusers_unet(ref))(z.repeat(2, 1, 1, 1), t.repeat(2), c)
        parity = rel_rms(theirs, expected)
        report.check("f", "float32 U-Net: torchsd = diffusers (same weights)", parity < 1e-4,
                     f"rel RMS diff {parity:.1e}", f"diffusers {diffusers.__version__}")
        inputs = dataclasses.replace(inputs, expected=expected)
    del ref, theirs
    release()
    for name in plan.step_dtypes:
        try:
            check_unet_step_in(plan, report, name, inputs)
        except Exception as err:  # noqa: BLE001 -- the other precision still runs
            traceback.print_exc(file=sys.stdout)
            report.add("f", f"{name} guided step", "FAIL", f"{type(err).__name__}: {first_line(err)}")
        release()


def check_unet_step_in(plan: Plan, report: Report, name: str, inputs: StepInputs) -> None:
    """Output agreement and time of one guided step in one precision: torchsd against diffusers."""
    dtype, device, size = DTYPES[name], plan.device, plan.step_size
    sd = build(plan.config, device, dtype)  # the same seed: the float32 weights of the reference, rounded
    apply_runtime(sd, RuntimeOptions(channels_last=False), device, dtype)
    unet = diffusers_unet(sd)  # NCHW, as diffusers runs by default
    with torch.inference_mode():
        z, t, c = inputs.for_unet(sd, dtype)
        ours = sd.unet(z, t, c)
        theirs = diffusers_call(unet)(z.repeat(2, 1, 1, 1), t.repeat(2), c)
    finite = bool(torch.isfinite(ours).all() and torch.isfinite(theirs).all())
    err_ours, err_theirs = rel_rms(ours, inputs.expected), rel_rms(theirs, inputs.expected)
    report.check("f", f"{name} U-Net output as close to float32 as diffusers'",
                 finite and err_ours <= 1.5 * err_theirs + 1e-4,
                 f"rel RMS err torchsd {err_ours:.1e}, diffusers {err_theirs:.1e}",
                 f"torchsd vs diffusers {rel_rms(ours, theirs):.1e}; finite: {finite}")

    cond, uncond = inputs.cond.to(dtype), inputs.uncond.to(dtype)
    torchsd_step = classifier_free_guidance(sd.denoiser, cond, uncond, GUIDANCE)
    diffusers_step = classifier_free_guidance(ModelDenoiser(diffusers_call(unet), sd.config.schedule), cond, uncond,
                                              GUIDANCE)

    def median_ms(step) -> float:
        with torch.inference_mode():
            return statistics.median(gpu_times_ms(lambda: step(inputs.x, inputs.sigma), device, plan.warmup,
                                                  plan.reps))

    ms = {"torchsd NCHW": median_ms(torchsd_step), "diffusers": median_ms(diffusers_step)}
    apply_runtime(sd, RuntimeOptions(), device, dtype)  # the device's default layout (diffusers keeps its tensors)
    layout = "channels-last" if sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) else "NCHW"
    ms[f"torchsd default ({layout})"] = median_ms(torchsd_step)
    best = min(v for k, v in ms.items() if k.startswith("torchsd"))
    check = f"{name} guided step {size}x{size}: torchsd no slower than diffusers"
    figure = f"{best:.2f} vs {ms['diffusers']:.2f} ms ({best / ms['diffusers']:.2f}x)"
    detail = "; ".join(f"{k} {v:.2f} ms" for k, v in ms.items()) + f" (median of {plan.reps}, " + \
        ("CUDA events)" if plan.cuda_device else "wall clock; a CPU smoke run times nothing worth comparing)")
    if plan.cuda_device:
        report.check("f", check, best <= ms["diffusers"], figure, detail)
    else:
        report.add("f", check, "INFO", figure, detail)


# --- main -------------------------------------------------------------------------------------------

def environment(plan: Plan) -> dict:
    env = {"torch": torch.__version__, "device": str(plan.device), "python": sys.version.split()[0]}
    if plan.cuda_device:
        env.update(gpu=torch.cuda.get_device_name(plan.device), cuda=torch.version.cuda)
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError as err:
        env["diffusers"] = f"missing ({err})"
    return env


def run_pipeline_parts(plan: Plan, report: Report, parts: str) -> None:
    """Parts a-e, on one pipeline built here (and gone when they are done, before f builds its own)."""
    sd = build(plan.config, plan.device, plan.dtype)
    apply_runtime(sd, RuntimeOptions(), plan.device, plan.dtype)  # the device's defaults (channels-last on CUDA)
    offload = OffloadChecks(sd, plan, report)
    checks = {
        "a": ("no host-device syncs in the sampler loop", check_syncs, sd, plan, report),
        "b": ("model offload", offload.model),
        "c": ("sequential offload", offload.sequential),
        "d": ("half-precision decode NaN fallback", check_nan_fallback, sd, plan, report),
        "e": ("tiled VAE decode", check_tiled_decode, sd, plan, report),
    }
    for key, (title, fn, *args) in checks.items():
        if key in parts:
            run_part(report, key, title, fn, *args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: the same code paths, CUDA-only "
                                                            "checks SKIP")
    p.add_argument("--parts", default="abcdef", help="which parts to run, e.g. 'ade' (default: all)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="folder for issue10.json (default: $OUT if set)")
    args = p.parse_args()
    if set(args.parts) - set("abcdef"):
        p.error(f"--parts takes letters a-f; got {args.parts!r}")
    if args.cpu_smoke:
        plan = Plan.cpu_smoke()
    elif torch.cuda.is_available():
        plan = Plan.cuda()
    else:
        p.error("no CUDA device here; use --cpu-smoke to run the code paths on the CPU")
    report = Report(args.out, environment(plan))
    print(" ".join(f"{k} {v};" for k, v in report.env.items()), f"model {'tiny' if args.cpu_smoke else 'SD 1.5'} "
          f"random weights, {str(plan.dtype).removeprefix('torch.')}", flush=True)
    started = time.perf_counter()

    if set(args.parts) & set("abcde"):
        try:
            run_pipeline_parts(plan, report, args.parts)
        except Exception as err:  # noqa: BLE001 -- the pipeline did not build: f may still run
            traceback.print_exc(file=sys.stdout)
            report.add("a-e", "build the pipeline", "FAIL", f"{type(err).__name__}: {first_line(err)}")
        release()
    if "f" in args.parts:
        run_part(report, "f", "guided U-Net step against diffusers", check_unet_step, plan, report)

    print(f"\n== summary ({time.perf_counter() - started:.0f} s)\n{report.summary()}", flush=True)
    return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

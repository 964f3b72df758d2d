"""What the CPU tests cannot see, on a CUDA GPU: no host-device syncs in the sampler loops, offload that keeps
the image and lowers peak VRAM, the float16 decode's float32 retry on real-size weights, and tiled decoding's
peak VRAM. SD 1.5-size random weights, float16.

The ``gpu`` tests are deselected by default (pyproject's addopts); on a machine with CUDA run them with

    pytest -m gpu

(``benchmarks/gpu_issue10.sh`` measures the same things with figures, on a lent GPU machine). Without CUDA
they skip. The sync recorder's
self-test and the float16 past-range retry also run on the CPU as ordinary tests. The NaN fallback's other
cases, tiled-decode closeness and offload's numbers on the CPU are in tests/test_memory.py.
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from reference import random_pipeline
from torchsd.config import ModelConfig
from torchsd.models.tiling import VAETiling
from torchsd.pipeline import GenerationRequest, StableDiffusion, autoencoding
from torchsd.pipeline import run as steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cuda_syncs import describe, first_sync_error, record_syncs  # noqa: E402  (shared with gpu_issue10.py)

CUDA = torch.cuda.is_available()
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality"
SYNC_SAMPLERS = ("ddim", "euler", "dpmpp_2m", "unipc", "euler_a")  # euler_a draws fresh noise every step
RETRY_MESSAGE = "decoding again in float32"


def gpu(test):
    """Marked ``gpu`` (deselected unless ``-m gpu``) and skipped without CUDA."""
    test = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")(test)
    return pytest.mark.gpu(test)


def test_sync_recorder_counts_simulated_syncs_by_call_site():
    """On the CPU: the recorder against torch's own warning and error texts, so that a mistake in it cannot
    pass the GPU test vacuously."""
    modes = []

    def fake_sync(error: bool = False):
        if error:
            raise RuntimeError("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")

    def loop():
        for _ in range(3):
            fake_sync()
        warnings.warn("something else")  # passed on, not counted

    with pytest.warns(UserWarning, match="something else"):
        sites = record_syncs(loop, set_mode=modes.append)
    assert {site.split()[-1]: count for site, (count, _) in sites.items()} == {"fake_sync": 3}
    assert "in loop" in next(iter(sites.values()))[1]  # the stack names the caller
    assert modes == ["warn", "default"]

    error = first_sync_error(lambda: fake_sync(error=True), set_mode=modes.append)
    assert error is not None and "fake_sync" in error
    assert first_sync_error(lambda: None, set_mode=modes.append) is None
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors are not taken for syncs
        first_sync_error(lambda: (_ for _ in ()).throw(RuntimeError("unrelated")), set_mode=modes.append)
    assert modes[2:] == ["error", "default"] * 3


# --- the float16 decode's float32 retry on the CPU (what test_memory.py does not cover) ---------------------------

def test_latents_past_float16_range_are_decoded_again_in_float32():
    """float16 tops out at 65504: the cast of the latents itself gives Inf, and the retry in float32 a finite image."""
    sd = random_pipeline("sd1")
    vae = sd.vae.to(torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)) * 1e5
    with pytest.warns(RuntimeWarning, match=RETRY_MESSAGE):
        images = autoencoding.decode(vae, latents)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert next(vae.parameters()).dtype == torch.float16


# --- on the GPU ----------------------------------------------------------------------------------------------

DEVICE = torch.device("cuda")
DTYPE = torch.float16


def build_sd15(seed: int = 0) -> StableDiffusion:
    """SD 1.5-size random weights made directly on the GPU with each layer's default initialisation
    (as benchmarks/gpu_sd15.py), in float16 with the device's default runtime options (channels-last)."""
    from torchsd.models.clip import CLIPTextModel
    from torchsd.models.unet import UNet
    from torchsd.models.vae import AutoencoderKL
    from torchsd.runtime import RuntimeOptions, apply_runtime
    from torchsd.text.tokenizer import CLIPTokenizer

    config = ModelConfig.sd15()
    torch.manual_seed(seed)
    with torch.device("meta"):
        networks = UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)
    for network in networks:
        network.to_empty(device=DEVICE)
        with torch.no_grad():
            for module in network.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    sd = StableDiffusion(config, *networks, CLIPTokenizer(pad_token_id=config.text.pad_token_id), name="random")
    return apply_runtime(sd, RuntimeOptions(), DEVICE, DTYPE)


@pytest.fixture(scope="module")
def sd15():
    sd = build_sd15()
    yield sd
    del sd
    release()


def release() -> None:
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@contextmanager
def peak_memory():
    """{"peak": bytes allocated at most inside the block, "extra": that above what was allocated on entry}."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    found = {"base": torch.cuda.memory_allocated()}
    yield found
    torch.cuda.synchronize()
    found["peak"] = torch.cuda.max_memory_allocated()
    found["extra"] = found["peak"] - found["base"]


def prepared(sd, sampler: str, size: int, steps_: int = 4):
    """A request's plan, schedule, prompts and starting latents, as ``run.run`` prepares them."""
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps_, width=size, height=size,
                                seed=1, sampler=sampler)
    state = steps.plan(sd, request)
    steps.schedule(sd, request, state)
    steps.encode_prompts(sd, request, state, [PROMPT], [NEGATIVE])
    x = steps.start_latents(sd, request, state)
    return request, state, x


# a. no host-device syncs in the sampler loop

@gpu
@pytest.mark.parametrize("sampler", SYNC_SAMPLERS)
def test_sampler_loop_never_waits_for_the_gpu(sd15, sampler):
    """Each sampler's loop (``run.sample``, CFG, 4 steps at 256x256) under ``torch.cuda.set_sync_debug_mode``:
    "warn" finds no synchronising op anywhere, "error" raises none."""
    with torch.inference_mode():
        request, state, x = prepared(sd15, sampler, 256)

        def loop():
            steps.sample(sd15, request, state, x, state.sigmas)

        loop()  # warm-up: one-off set-up (cuDNN plans, the denoiser's schedule copied to the device)
        sites = record_syncs(loop)
        error = first_sync_error(loop)
    assert not sites, f"{sum(c for c, _ in sites.values())} syncs in the {sampler} loop:\n{describe(sites)}"
    assert error is None, error


# b, c. offload

def whole_run(sd) -> tuple[torch.Tensor, int]:
    """Text encode, 4 DDIM steps (CFG) and decode at 512x512 through the run's own steps: the latents and the
    peak GPU memory allocated meanwhile."""
    with torch.inference_mode(), peak_memory() as memory:
        request, state, x = prepared(sd, "ddim", 512)
        latents = steps.sample(sd, request, state, x, state.sigmas)
        images = steps.decode(sd, latents)
    assert torch.isfinite(images).all()
    return latents.float().cpu(), memory["peak"]


@pytest.fixture(scope="module")
def without_offload(sd15):
    whole_run(sd15)  # warm-up
    return whole_run(sd15)


@pytest.fixture
def offloadable(sd15):
    """The shared pipeline, put back on the GPU as the runtime places it after the test's offload."""
    from torchsd.runtime import RuntimeOptions, apply_runtime

    yield sd15
    sd15.execution_device = None
    apply_runtime(sd15, RuntimeOptions(), DEVICE, DTYPE)
    release()


def assert_same_latents(latents: torch.Tensor, expected: torch.Tensor) -> None:
    dz = float((latents - expected).abs().max())
    assert dz <= 1e-3 * float(expected.abs().max()), f"max |latent difference| {dz:.2e}"


@gpu
def test_model_offload_keeps_one_network_on_the_gpu_and_lowers_peak_memory(offloadable, without_offload):
    from torchsd.accel.offload import enable_model_offload

    sd = offloadable
    expected, peak_before = without_offload
    offload = enable_model_offload(sd, DEVICE)
    networks = {"text": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
    calls: list[tuple[str, dict]] = []

    def watch(name):
        def hook(module, args):
            calls.append((name, {n: all(offload.is_uploaded(p) for p in m.parameters()) for n, m in networks.items()}))
        return hook

    # registered after the offload hooks, so they see the state each network computes in
    handles = [(m.decoder if n == "vae" else m).register_forward_pre_hook(watch(n)) for n, m in networks.items()]
    try:
        latents, peak = whole_run(sd)
    finally:
        for handle in handles:
            handle.remove()
        offload.remove()
    assert sorted({name for name, _ in calls}) == ["text", "unet", "vae"]
    for name, up in calls:
        assert up[name] and not any(v for n, v in up.items() if n != name), (name, up)
    assert_same_latents(latents, expected)
    assert peak < peak_before, f"peak {peak / 2**30:.2f} GiB with model offload, {peak_before / 2**30:.2f} without"


@gpu
def test_sequential_offload_uploads_layers_only_while_they_run_and_lowers_peak_memory(offloadable, without_offload):
    from torchsd.accel.offload import enable_sequential_offload

    sd = offloadable
    expected, peak_before = without_offload
    offload = enable_sequential_offload(sd, DEVICE)
    networks = (sd.text_encoder, sd.unet, sd.vae)
    everything = [p for n in networks for p in n.parameters()]
    layers_up: list[bool] = []

    def spy(module, args):
        layers_up.append(all(offload.is_uploaded(p) for p in module.parameters(recurse=False)))

    handles = [m.register_forward_pre_hook(spy) for n in networks for m in n.modules()
               if list(m.parameters(recurse=False))]
    try:
        latents, peak = whole_run(sd)
        left_up = sum(offload.is_uploaded(p) for p in everything)
    finally:
        for handle in handles:
            handle.remove()
        offload.remove()
    assert len(layers_up) > 100 and all(layers_up), f"{layers_up.count(False)} layer calls without their weights"
    assert left_up == 0, f"{left_up} weights left on the GPU"
    assert_same_latents(latents, expected)
    assert peak < peak_before, f"peak {peak / 2**30:.2f} GiB with sequential offload, {peak_before / 2**30:.2f} without"


# d. the float16 decode's float32 retry, real size

def retried(caught) -> bool:
    return any(RETRY_MESSAGE in str(w.message) for w in caught)


@contextmanager
def caught_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@gpu
def test_non_finite_float16_decode_is_redone_in_float32(sd15):
    vae = sd15.vae
    assert next(vae.parameters()).dtype == torch.float16
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with torch.inference_mode():
        expected = autoencoding.decode(autoencoding.float32_copy(vae, DEVICE), latents)  # what the retry computes
        calls: list[torch.dtype] = []

        def poison(module, args, out):  # NaN out of the float16 decoder only (as tests/test_memory.py)
            calls.append(out.dtype)
            return torch.full_like(out, float("nan")) if out.dtype != torch.float32 else out

        handle = vae.decoder.conv_out.register_forward_hook(poison)
        try:
            with caught_warnings() as caught:
                images = autoencoding.decode(vae, latents)
        finally:
            handle.remove()
        assert retried(caught) and calls == [torch.float16]
        assert torch.isfinite(images).all()
        err = float((images - expected).abs().max() / expected.abs().max())
        assert err < 1e-3, f"max rel difference to the float32 decode {err:.1e}"
        assert next(vae.parameters()).dtype == torch.float16  # the shared model is left as it was

        with caught_warnings() as caught:  # float16 tops out at 65504: the cast itself gives Inf
            images = autoencoding.decode(vae, latents * 1e5)
        assert retried(caught) and torch.isfinite(images).all()

        bad = latents.clone()
        bad[0, 0, 0, 0] = float("nan")
        with caught_warnings() as caught, pytest.raises(FloatingPointError, match="latents themselves hold NaN"):
            autoencoding.decode(vae, bad)
        assert retried(caught)


# e. tiled decode

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] on the 0-255 scale, unrounded."""
    a, b = (((x.float().cpu().clamp(-1, 1) + 1) * 127.5) for x in (a, b))
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@gpu
def test_tiled_1024_decode_is_close_to_untiled_with_less_peak_memory(sd15):
    """float16 1024x1024, 512 px tiles with 64 px overlap: PSNR > 30 dB against untiled, no float32 retry, and
    less memory allocated above the weights at the peak."""
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    found = {}
    with torch.inference_mode():
        for name, tiling in (("untiled", None), ("tiled", VAETiling(tile_size=512, overlap=64))):
            with caught_warnings() as caught:
                autoencoding.decode(sd15.vae, latents, tiling=tiling)  # warm-up
                release()
                with peak_memory() as memory:
                    images = autoencoding.decode(sd15.vae, latents, tiling=tiling)
            assert not retried(caught), f"{name}: the float16 decode was not finite"
            found[name] = images.cpu(), memory["extra"]
            del images
            release()
    (untiled, untiled_extra), (tiled, tiled_extra) = found["untiled"], found["tiled"]
    assert psnr(tiled, untiled) > 30
    assert tiled_extra < untiled_extra, f"+{tiled_extra / 2**30:.2f} GiB tiled, +{untiled_extra / 2**30:.2f} untiled"

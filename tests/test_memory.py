"""Memory features keep the numbers: tiled VAE against untiled, the half-precision decode fallback,
model and sequential offload."""

import pytest
import torch
from torch import nn

from reference import max_rel_error, optimized, pixels, random_pipeline
from torchsd.accel import enable_model_offload, enable_sequential_offload
from torchsd.models.tiling import VAETiling, tile_starts, tiled_apply


@pytest.mark.parametrize("length, tile, overlap, align", [(100, 40, 8, 1), (1024, 512, 64, 8), (64, 64, 8, 1),
                                                          (72, 32, 16, 8), (33, 16, 4, 1)])
def test_tiles_cover_the_side_with_the_overlap(length, tile, overlap, align):
    starts, size = tile_starts(length, tile, overlap, align)
    assert size <= max(tile, align) and starts[0] == 0 and starts[-1] + size == length
    assert all(s % align == 0 for s in starts)
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap - align  # neighbours share at least the overlap (up to alignment)


@pytest.mark.parametrize("scale", [8, 1 / 8, 1])
def test_tiled_apply_blends_to_the_exact_result_for_a_local_function(scale):
    """With a per-pixel function the tiles are exact, so any difference would be the blending's."""
    torch.manual_seed(0)
    pointwise = nn.Sequential(nn.Conv2d(3, 5, 1), nn.Tanh(), nn.Conv2d(5, 2, 1))

    def fn(x):
        y = pointwise(x)
        if scale > 1:
            return nn.functional.interpolate(y, scale_factor=scale, mode="nearest")
        if scale < 1:
            return nn.functional.avg_pool2d(y, int(1 / scale))
        return y

    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        tiled = tiled_apply(fn, x, tile=24, overlap=8, scale=scale, align=8 if scale < 1 else 1)
        assert tiled.shape == fn(x).shape
        assert (tiled - fn(x)).abs().max() < 1e-5


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))


def test_tiled_decode_agrees_with_untiled():
    """Tiles see their own GroupNorm statistics and attention, so they are not exact. Measured on
    the tiny random VAE (downscale 2), image 64x96 in 2x3 tiles of 48 px with 16 px overlap:
    PSNR 32.4 dB; 64 px tiles with 32 px overlap: 41.8 dB (benchmarks report SD-size figures)."""
    from torchsd.pipeline import autoencoding

    sd = random_pipeline("sd1")
    latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(5))
    whole = autoencoding.decode(sd.vae, latents)
    tiled = autoencoding.decode(sd.vae, latents, tiling=VAETiling(tile_size=48, overlap=16))
    assert tiled.shape == whole.shape == (1, 3, 64, 96)
    assert _psnr(tiled, whole) > 30
    larger = autoencoding.decode(sd.vae, latents, tiling=VAETiling(tile_size=64, overlap=32))
    assert _psnr(larger, whole) > 38


def test_tiled_encode_agrees_with_untiled():
    from torchsd.pipeline import autoencoding

    sd = random_pipeline("sd1")
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(6)) * 2 - 1
    whole = autoencoding.encode(sd.vae, images)
    tiled = autoencoding.encode(sd.vae, images, tiling=VAETiling(tile_size=48, overlap=16))
    assert tiled.mean.shape == whole.mean.shape == (1, 4, 32, 48)
    # measured: max error 15% of the latents' range, PSNR 37.7 dB relative to that range
    scale = whole.mean.abs().max()
    assert max_rel_error(tiled.mean, whole.mean) < 0.2
    assert _psnr(tiled.mean / scale, whole.mean / scale) > 35


def test_small_images_are_not_tiled():
    from torchsd.pipeline import autoencoding

    sd = random_pipeline("sd1")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(autoencoding.decode(sd.vae, latents, tiling=VAETiling(tile_size=32, overlap=8)),
                       autoencoding.decode(sd.vae, latents))


def test_pipeline_with_vae_tiling_generates_close_images():
    sd = random_pipeline("sd1")
    plain = sd.generate("a cat", steps=2, seed=1, width=64, height=64)
    sd.vae_tiling = VAETiling(tile_size=32, overlap=16)
    tiled = sd.generate("a cat", steps=2, seed=1, width=64, height=64)
    assert torch.equal(plain.latents, tiled.latents)
    a, b = (pixels(r.images[0]) for r in (plain, tiled))
    assert 10 * torch.log10(255.0 ** 2 / (a - b).pow(2).mean()) > 30


def _poison(module: nn.Module, when):
    """A forward hook that puts NaN into the output when ``when(output)`` holds."""
    def hook(m, args, out):
        return out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("nan")) if when(out) else out
    return module.register_forward_hook(hook)


def test_half_precision_nan_decode_is_redone_in_float32():
    sd = random_pipeline("sd1")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    expected = sd.decode_latents(latents)
    sd.vae.to(torch.bfloat16)
    calls = []
    _poison(sd.vae.decoder.conv_out, lambda out: calls.append(out.dtype) or out.dtype != torch.float32)
    with pytest.warns(RuntimeWarning, match="gave NaN or Inf; decoding again in float32"):
        images = sd.decode_latents(latents)
    assert calls == [torch.bfloat16]  # the hook is on the bf16 model; the retry ran a float32 twin
    assert torch.isfinite(images).all()
    # the float32 twin holds the bf16 weights widened: close to the float32 model's result
    assert max_rel_error(images, expected) < 0.05
    assert next(sd.vae.parameters()).dtype == torch.bfloat16  # the shared model is left as it was


def test_non_finite_decode_is_an_error_and_nothing_is_saved(tmp_path, monkeypatch):
    sd = random_pipeline("sd1")
    _poison(sd.vae.decoder.conv_out, lambda out: True)
    with pytest.raises(FloatingPointError, match="NaN or Inf values even in float32"):
        sd.generate("a cat", steps=2, seed=1, width=32, height=32)
    # half precision: the float32 retry happens, and its result is still not finite
    sd = random_pipeline("sd1")
    sd.vae.to(torch.bfloat16)
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="decoding again in float32"), \
            pytest.raises(FloatingPointError, match="latents themselves hold NaN or Inf"):
        sd.decode_latents(latents)


def test_cli_writes_no_image_when_the_decode_is_not_finite(tmp_path, monkeypatch, capsys):
    import torchsd.cli
    import torchsd.cli.generate as generate

    sd = random_pipeline("sd1")
    _poison(sd.vae.decoder.conv_out, lambda out: True)
    monkeypatch.setattr(generate, "load_model", lambda args: sd)
    out = tmp_path / "x.png"
    assert torchsd.cli.main(["generate", "a cat", "--steps", "2", "--size", "32x32", "--output", str(out)]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _spy(network: nn.Module, offload, seen: list):
    """Record, at every leaf forward, which tensors of ``network`` are uploaded."""
    def hook(module, args):
        seen.append((module, [offload.is_uploaded(t) for t in [*module.parameters(recurse=False)]]))
    return [m.register_forward_pre_hook(hook) for m in network.modules() if list(m.parameters(recurse=False))]


def test_model_offload_moves_one_network_at_a_time_and_keeps_the_numbers():
    ref = optimized(random_pipeline("sd1"))  # as the runtime leaves networks on a CPU, both
    expected = ref.generate("a cat", steps=2, seed=2, width=32, height=32)
    sd = optimized(random_pipeline("sd1"))
    offload = enable_model_offload(sd, "cpu")
    networks = {"text": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
    log = []

    def watch(name):
        def hook(module, args):
            up = {n: all(offload.is_uploaded(p) for p in m.parameters()) for n, m in networks.items()}
            log.append((name, up))
        return hook

    for name, network in networks.items():
        # registered after the offload hooks, so they see the state the network computes in
        (network.decoder if name == "vae" else network).register_forward_pre_hook(watch(name))
    result = sd.generate("a cat", steps=2, seed=2, width=32, height=32)
    assert torch.equal(result.latents, expected.latents)
    assert [r.tobytes() for r in result.images] == [r.tobytes() for r in expected.images]
    assert [name for name, _ in log] == ["text", "text", "unet", "unet", "vae"]
    for name, up in log:
        assert up[name] and not any(v for n, v in up.items() if n != name), (name, up)
    offload.remove()
    assert not any(offload.is_uploaded(p) for p in sd.unet.parameters())


def test_sequential_offload_uploads_one_layer_at_a_time_and_keeps_the_numbers():
    ref = optimized(random_pipeline("sd1"))  # as the runtime leaves networks on a CPU, both
    expected = ref.generate("a cat", steps=2, seed=2, width=32, height=32)
    sd = optimized(random_pipeline("sd1"))
    offload = enable_sequential_offload(sd, "cpu")
    seen = []
    for network in (sd.text_encoder, sd.unet, sd.vae):
        _spy(network, offload, seen)
    result = sd.generate("a cat", steps=2, seed=2, width=32, height=32)
    # hooked layers take the plain kernels (accel/fused.py), so equal up to float rounding, not bit for bit
    assert max_rel_error(result.latents, expected.latents) < 1e-5
    assert len(seen) > 100 and all(all(flags) for _, flags in seen)  # each layer is up when it runs
    everything = [p for n in (sd.text_encoder, sd.unet, sd.vae) for p in n.parameters()]
    assert not any(offload.is_uploaded(p) for p in everything)  # and dropped afterwards


def test_offloaded_text_encoder_gets_its_tokens_on_the_execution_device(monkeypatch):
    """Under offload the text encoder's weights wait in CPU memory, so the token ids must go where the
    encoder runs (sd.execution_device), not where its weights are between calls."""
    import torchsd.pipeline.model as pipeline

    sd = random_pipeline("sd1")
    enable_model_offload(sd, "cpu")
    sd.execution_device = torch.device("cpu", 0)  # stands for the accelerator: distinguishable from "cpu"
    seen = []
    real = pipeline.encode_prompts
    monkeypatch.setattr(pipeline, "encode_prompts", lambda *a, **k: seen.append(k.get("device")) or real(*a, **k))
    sd.condition(["a cat"])
    assert seen == [torch.device("cpu", 0)]

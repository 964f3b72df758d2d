"""The fast path keeps the numbers: on-device timesteps, chunked attention, one latent for both guidance
contexts, bf16/channels-last defaults and options, and runtime option errors."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from reference import max_rel_error, pixels, random_pipeline
from torchsd.accel import fused, optimize
from torchsd.accel.modules import BandedFeedForward
from torchsd.config import ScheduleConfig
from torchsd.diffusion.denoisers import ModelDenoiser
from torchsd.diffusion.schedules import timestep_of_sigma
from torchsd.models.layers import attention, set_attention_chunk
from torchsd.runtime import RuntimeOptions, apply_runtime, default_dtype, runtime_options_from_args


def test_timestep_stays_on_the_sigmas_device():
    denoiser = ModelDenoiser(None, ScheduleConfig())
    # a meta tensor has no data: any copy to the host would raise, so this proves there is none
    t = denoiser.timestep(torch.rand(3, device="meta"))
    assert t.device.type == "meta" and t.dtype == torch.float32
    sigma = torch.tensor([14.6, 1.0, 0.03, 0.0292])
    expected = timestep_of_sigma(denoiser.log_sigmas, sigma.double())
    assert torch.allclose(denoiser.timestep(sigma).double(), expected, atol=1e-4)


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_one_latent_under_several_contexts_equals_the_repeated_batch(family, optimized):
    """UNet(x, t, [c1; c2]) runs the layers before the first cross-attention once per latent; the result
    must be what the (2B) batch of repeated latents gives, under autograd (plain kernels) and without
    (optimized: the fused ones)."""
    sd = random_pipeline(family)
    if optimized:
        optimize(sd.unet)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0])
    context = torch.randn(4, 77, sd.config.unet.context_dim, generator=gen)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            shared = sd.unet(x, t, context)
            repeated = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context)
        assert shared.shape == repeated.shape == (4, 4, 8, 8)
        assert max_rel_error(shared.detach(), repeated.detach()) < 1e-5
    with pytest.raises(ValueError, match="3 rows for 2 latents"):
        sd.unet(x, t, context[:3])
    # classifier-free guidance hands the U-Net the latent once (the denoiser repeats x for x0)
    assert sd.denoiser.accepts_several_contexts
    plain = ModelDenoiser(lambda z, timesteps, c: sd.unet(z.repeat(c.shape[0] // z.shape[0], 1, 1, 1),
                                                          timesteps.repeat(c.shape[0] // z.shape[0]), c),
                          sd.config.schedule)
    assert not plain.accepts_several_contexts
    sigma = torch.tensor([3.0, 0.5])
    with torch.no_grad():
        assert max_rel_error(sd.denoiser(x, sigma, context), plain(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                                                    context)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_attention_equals_whole(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 32, generator=gen) for _ in range(3))
    whole = attention(q, k, v, 4, causal=causal)
    for chunk in (1, 5, 36, 37, 100):
        assert torch.allclose(attention(q, k, v, 4, causal=causal, chunk=chunk), whole, atol=1e-5)


def test_chunked_attention_with_a_mask_and_cross_attention():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 16, generator=gen)
    k, v = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    mask = torch.randn(2, 1, 30, 7, generator=gen)
    assert torch.allclose(attention(q, k, v, 2, mask=mask, chunk=8), attention(q, k, v, 2, mask=mask), atol=1e-5)
    with pytest.raises(ValueError, match="positive number of queries"):
        attention(q, k, v, 2, chunk=0)


@pytest.mark.parametrize("optimized", [False, True])
def test_attention_chunk_option_reaches_every_attention_layer(optimized):
    sd = random_pipeline("sd1")
    if optimized:
        optimize(sd.unet)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    context = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        whole = sd.unet(x, t, context)
        set_attention_chunk(sd.unet, 16)
        layers = [m for m in sd.unet.modules() if hasattr(m, "attention_chunk")]
        assert layers and all(m.attention_chunk == 16 for m in layers)
        assert max_rel_error(sd.unet(x, t, context), whole) < 1e-5
    with pytest.raises(ValueError, match="positive number of queries"):
        set_attention_chunk(sd.unet, 0)


@pytest.mark.skipif(not fused.available(), reason="kept only where the oneDNN inference path runs")
def test_cross_attention_reuses_the_keys_and_values_of_an_unchanged_context():
    """At CPU inference the text context's keys and values are kept between steps (optimized attention);
    edits to the context (in place too) or to the weights (a LoRA merge) make them new, and under autograd
    nothing is kept."""
    from torchsd.models.unet import CrossAttention

    torch.manual_seed(0)
    attn = optimize(CrossAttention(32, 24, 4))
    x, context = torch.randn(2, 16, 32), torch.randn(2, 7, 24)

    def fresh():  # the plain computation, with nothing kept
        with torch.no_grad():
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            return attn.to_out(attention(q, k, v, 4))

    with torch.no_grad():
        first = attn(x, context)
        kept = attn._context_cache[2]
        assert torch.allclose(first, fresh(), atol=1e-6)
        assert torch.equal(attn(x, context), first) and attn._context_cache[2] is kept  # reused
        context[0, 3] += 1.0  # in place: same tensor, new values
        assert attn._context_cache[2] is kept and torch.allclose(attn(x, context), fresh(), atol=1e-6)
        assert attn._context_cache[2] is not kept
        kept = attn._context_cache[2]
        attn.to_v.weight.add_(0.5)  # a merge into the weights, in place
        assert torch.allclose(attn(x, context), fresh(), atol=1e-6) and attn._context_cache[2] is not kept
    attn._context_cache = None
    out = attn(x, context)  # autograd: computed, not kept
    assert attn._context_cache is None and out.requires_grad


@pytest.mark.skipif(not fused.available(), reason="bands are for the oneDNN path, which this build lacks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_in_bands_of_rows_equals_whole(monkeypatch, dtype):
    from torchsd.models.unet import GEGLUFeedForward

    torch.manual_seed(0)
    ff = optimize(GEGLUFeedForward(16).to(dtype))
    assert type(ff) is BandedFeedForward
    x, residual = torch.randn(2, 37, 16, dtype=dtype), torch.randn(2, 37, 16, dtype=dtype)
    with torch.no_grad():
        whole = ff(x, residual=residual)
        monkeypatch.setattr(BandedFeedForward, "band_bytes", 10 * 64 * x.element_size())  # bands of 10 rows
        bands = []
        geglu = fused.geglu
        monkeypatch.setattr(fused, "geglu", lambda h, proj: bands.append(h.shape[0]) or geglu(h, proj))
        banded = ff(x, residual=residual)
        expected = F.linear(F.gelu(F.linear(x.float(), ff.proj_in.weight.float()[64:], ff.proj_in.bias.float()[64:]))
                            * F.linear(x.float(), ff.proj_in.weight.float()[:64], ff.proj_in.bias.float()[:64]),
                            ff.proj_out.weight.float(), ff.proj_out.bias.float()) + residual.float()
    assert bands == [10] * 7 + [4]  # 74 rows
    assert banded.shape == whole.shape == x.shape
    assert torch.allclose(banded.float(), whole.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert max_rel_error(banded.float(), expected) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_default_dtype_follows_the_hardware(monkeypatch):
    import torchsd.runtime as runtime

    assert default_dtype("cuda") == torch.float16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert default_dtype("cpu") == torch.float32


def test_channels_last_default_follows_the_measurements(monkeypatch):
    from torchsd.accel import winograd
    from torchsd.runtime import wants_channels_last

    monkeypatch.setattr(winograd, "pays", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = torch.bfloat16
    assert not wants_channels_last(RuntimeOptions(), cpu, "unet", bf16)  # measured slower in NHWC on CPU
    assert wants_channels_last(RuntimeOptions(), cpu, "vae", torch.bfloat16)
    assert not wants_channels_last(RuntimeOptions(), cpu, "vae", torch.float32)  # NCHW for Winograd
    monkeypatch.setattr(winograd, "pays", lambda: False)  # a CPU where the direct convolution is faster
    assert wants_channels_last(RuntimeOptions(), cpu, "vae", torch.float32)
    assert not wants_channels_last(RuntimeOptions(), cpu, "unet", torch.float32)
    assert wants_channels_last(RuntimeOptions(), cuda, "unet", bf16)
    assert wants_channels_last(RuntimeOptions(), cuda, "vae", torch.float16)
    assert not wants_channels_last(RuntimeOptions(channels_last=False), cuda, "vae", bf16)
    assert wants_channels_last(RuntimeOptions(channels_last=True), cpu, "unet", torch.float32)
    sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(), "cpu", torch.bfloat16)
    assert sd.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sd = apply_runtime(sd, RuntimeOptions(), "cpu", torch.float32)  # winograd.pays: False, as set above
    assert sd.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(winograd, "pays", lambda: True)
    sd = apply_runtime(sd, RuntimeOptions(), "cpu", torch.float32)
    assert not sd.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_channels_last_pipeline_stays_close_to_fp32():
    """What the CPU default runs: bf16 weights, NHWC convolutions. Measured here: PSNR ~35-40 dB on
    the tiny random model; the bound leaves room for other CPUs' rounding."""
    ref = random_pipeline("sd1")
    fast = apply_runtime(random_pipeline("sd1"), RuntimeOptions(channels_last=True), "cpu", torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    kwargs = dict(steps=4, seed=3, width=32, height=32)
    a = ref.generate("a red circle", **kwargs)
    b = fast.generate("a red circle", **kwargs)
    mse = (b.latents - a.latents).pow(2).mean() / a.latents.pow(2).mean()
    assert mse < 1e-3
    pa, pb = (pixels(r.images[0]) for r in (a, b))
    psnr = 10 * torch.log10(255.0 ** 2 / (pa - pb).pow(2).mean().clamp_min(1e-9))
    assert psnr > 25


def test_channels_last_fp32_gives_the_same_numbers():
    ref = random_pipeline("sd1")
    fast = apply_runtime(random_pipeline("sd1"), RuntimeOptions(channels_last=True), "cpu", torch.float32)
    kwargs = dict(steps=3, seed=4, width=32, height=24)
    assert max_rel_error(fast.generate("a cat", **kwargs).latents, ref.generate("a cat", **kwargs).latents) < 1e-4


@pytest.mark.parametrize("fields, message", [
    ({"offload": "gpu"}, "offload must be one of none, model, sequential"),
    ({"compile": "fast"}, "compile mode must be one of default"),
    ({"attention_chunk": 0}, "attention_chunk must be a positive"),
    ({"compile": "default", "offload": "model"}, "compile and offload do not mix"),
    ({"freeze": True}, "freeze only applies to a compiled U-Net"),
])
def test_runtime_options_refuse_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        RuntimeOptions(**fields)


def test_runtime_options_from_a_bare_namespace_are_the_defaults():
    assert runtime_options_from_args(argparse.Namespace()) == RuntimeOptions()


def test_cuda_graphs_refused_without_cuda():
    from torchsd.runtime import CUDAGraphUNet

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CUDAGraphUNet(lambda *a: None)

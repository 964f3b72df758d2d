"""``accel.optimize(m)`` against ``m``, per model, in float32 and bfloat16: the same numbers with the fast
kernels running, the same Parameters and state-dict keys, idempotent, reversible, and the plain path
under autograd."""

import copy

import pytest
import torch
from torch import nn

from reference import max_rel_error, random_pipeline
from torchsd.accel import cpu_attention, deoptimize, fused, optimize, subpixel, winograd
from torchsd.accel.optimize import FAST, PLAIN

pytestmark = pytest.mark.skipif(not fused.available(), reason="this PyTorch build has no oneDNN ops in this form")

# max relative error of the optimized model against the plain one. float32: rounding only (measured up to
# 1e-6). bfloat16: the fused kernels round once where the plain ops round twice (a product, then its sum
# with the residual), which moved these tiny models' outputs by 0.5-1.7e-2 of their scale
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


@pytest.fixture
def kernels(monkeypatch):
    """Counts of the fast kernels called: the proof that the optimized model took them."""
    calls = {"mkldnn": 0, "winograd": 0, "subpixel": 0, "bf16 attention": 0}

    class Spy:
        """Counts the calls of a function, or of an op and its overloads (``op.binary``)."""

        def __init__(self, fn, key):
            self.fn, self.key = fn, key

        def __call__(self, *args, **kwargs):
            calls[self.key] += 1
            return self.fn(*args, **kwargs)

        def __getattr__(self, name):
            return Spy(getattr(self.fn, name), self.key)

    def counting(module, name, key):
        monkeypatch.setattr(module, name, Spy(getattr(module, name), key))

    counting(winograd, "conv3x3", "winograd")
    counting(subpixel, "upsample_conv", "subpixel")
    counting(cpu_attention, "attention", "bf16 attention")
    counting(fused._mkldnn, "_linear_pointwise", "mkldnn")
    counting(fused._mkldnn, "_convolution_pointwise", "mkldnn")
    monkeypatch.setattr(cpu_attention, "_has_amx", lambda: False)  # this kernel is the one under test
    monkeypatch.setattr(winograd, "pays", lambda: True)  # and so is Winograd, whatever this CPU measures
    monkeypatch.setattr(cpu_attention, "MIN_KEYS_PER_THREAD", 1024 / torch.get_num_threads())
    return calls


def networks(family: str = "sd1"):
    sd = random_pipeline(family)
    models = {"unet": sd.unet, "vae": sd.vae, "text": sd.text_encoder}
    if sd.text_encoder_2 is not None:  # SDXL base's bigG
        models["text_2"] = sd.text_encoder_2
    return models, sd.config


def unet_calls(config, dtype):
    """Latents of 32x32 (one, under two contexts: Winograd, sub-pixel upsampling, 1024-key attention)
    and 8x8 (its lowest level as a matmul), each called twice (the second reuses the context's K/V).
    SDXL's (no attention at its top level): 64x64, so that its second level still has 1024 keys, and the added
    vector y, one per context (the latent parts ways from the start)."""
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, config.unet.context_dim, generator=gen).to(dtype)
    added = {}
    if config.unet.added_embed_dim:
        added["y"] = torch.randn(2, config.unet.added_embed_dim, generator=gen).to(dtype)
    calls = []
    for size in (64, 8) if added else (32, 8):
        x = torch.randn(1, 4, size, size, generator=gen).to(dtype)
        calls += [lambda m, x=x: m(x, torch.tensor([500.0]), context, **added)] * 2
    return calls


def vae_calls(dtype):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 32, 32, generator=gen).to(dtype)  # 1024 pixels in the middle attention
    images = torch.randn(1, 3, 64, 64, generator=gen).to(dtype)
    return [lambda m: m.decode(latents), lambda m: m.encode(images).mean]


def text_calls():
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))
    return [lambda m: m(ids), lambda m: m(ids, clip_skip=2)]


def sdxl_text_calls(with_projection: bool):
    """SDXL's reading: the penultimate states, and the projected pooled output (bigG's)."""
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))
    calls = [lambda m: m(ids), lambda m: m.penultimate(ids)[0]]
    if with_projection:
        calls += [lambda m: torch.cat([m.penultimate(ids, pooled=True)[1], m.penultimate(ids, pooled=True)[0][:, 0]],
                                      dim=-1)]
    return calls


def calls_for(name, config, dtype):
    if config.is_sdxl and name.startswith("text"):
        text = config.text_2 if name == "text_2" else config.text
        return sdxl_text_calls(text.with_projection)
    return {"unet": lambda: unet_calls(config, dtype), "vae": lambda: vae_calls(dtype),
            "text": text_calls}[name]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, family", [("unet", "sd1"), ("unet", "sd2"), ("vae", "sd1"), ("text", "sd1"),
                                          ("text", "sd2"), ("unet", "sdxl"), ("unet", "sdxl_refiner"),
                                          ("text", "sdxl"), ("text_2", "sdxl")])
def test_optimized_model_gives_the_plain_models_numbers(kernels, name, family, dtype):
    """sd1's U-Net projects into its transformers with 1x1 convolutions, sd2's with Linear layers; sd2's
    text encoder uses GELU, sd1's quick GELU. SDXL's U-Net: Linear projections, two transformer blocks per
    transformer, no attention at the top level, the added embedding (text_time); its encoders: CLIP-L (quick
    GELU) and bigG (GELU, projection) read at the penultimate layer."""
    models, config = networks(family)
    plain = models[name].to(dtype)
    fast = optimize(copy.deepcopy(plain), "cpu", dtype)
    assert any(type(m) in PLAIN for m in fast.modules()), "nothing was swapped in"
    with torch.inference_mode():
        for call in calls_for(name, config, dtype):
            expected = call(plain)
            assert max_rel_error(call(fast), expected) < TOLERANCE[dtype]
    assert kernels["mkldnn"] > 0
    if name == "unet":
        assert kernels["subpixel"] > 0
        assert kernels["winograd" if dtype == torch.float32 else "bf16 attention"] > 0
    if name == "vae":
        assert kernels["subpixel"] > 0
        assert kernels["winograd" if dtype == torch.float32 else "bf16 attention"] > 0


@pytest.mark.parametrize("name, family", [("unet", "sd1"), ("vae", "sd1"), ("text", "sd1"), ("unet", "sdxl"),
                                          ("text_2", "sdxl")])
def test_optimize_shares_the_parameters_and_keeps_the_state_dict(name, family):
    model = networks(family)[0][name]
    before = [(key, id(p), p.data_ptr()) for key, p in model.named_parameters()]
    keys = list(model.state_dict())
    assert optimize(model) is model  # the network's top is never swapped, only blocks below it
    assert [(key, id(p), p.data_ptr()) for key, p in model.named_parameters()] == before
    assert list(model.state_dict()) == keys
    left = [m for m in model.modules() if type(m) in FAST and not (type(m) is nn.Conv2d and m.kernel_size != (3, 3))]
    assert not left, "plain blocks left that optimize swaps"
    assert any(type(m) in PLAIN for m in model.modules())
    # a state dict loaded into the optimized model reaches the Parameters both share
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for _, p in model.named_parameters())


def test_optimize_twice_changes_nothing_and_deoptimize_gives_the_plain_blocks_back():
    models, config = networks()
    unet = models["unet"]
    plain_types = [type(m) for m in unet.modules()]
    plain = copy.deepcopy(unet)
    optimize(unet)
    swapped = [id(m) for m in unet.modules()]
    assert optimize(unet) is unet and [id(m) for m in unet.modules()] == swapped
    assert deoptimize(unet) is unet
    assert [type(m) for m in unet.modules()] == plain_types
    assert not any("_context_cache" in m.__dict__ or "packing" in m.__dict__ for m in unet.modules())
    call = unet_calls(config, torch.float32)[0]
    with torch.inference_mode():
        assert torch.equal(call(unet), call(plain))


def test_a_block_optimized_alone_is_returned_swapped():
    from torchsd.models.layers import ResnetBlock

    block = ResnetBlock(8, 16, temb_channels=None, groups=4, eps=1e-5)
    fast = optimize(block)
    assert type(fast) is FAST[ResnetBlock] and isinstance(fast, ResnetBlock)
    assert fast.conv1.weight is block.conv1.weight and fast.norm1 is block.norm1
    assert optimize(fast) is fast and type(deoptimize(fast)) is ResnetBlock


def test_only_cpu_inference_in_float32_or_bfloat16_is_optimized():
    unet = networks()[0]["unet"]
    types = [type(m) for m in unet.modules()]
    optimize(unet, "cuda", torch.float16)  # where the runtime places it decides, not where it is now
    optimize(unet, "cpu", torch.float16)
    optimize(copy.deepcopy(unet).half())
    assert [type(m) for m in unet.modules()] == types


@pytest.mark.parametrize("name", ["unet", "vae", "text"])
def test_under_autograd_the_optimized_model_runs_the_plain_path(kernels, name):
    """Bit for bit the plain model's numbers, and no oneDNN inference kernel (the maps here are too small
    for the sub-pixel upsampler, which is plain ops and runs under autograd too)."""
    models, config = networks()
    plain = models[name].requires_grad_(True)  # as training has it (the pipeline freezes its networks)
    fast = optimize(copy.deepcopy(plain))
    calls = {"unet": lambda: unet_calls(config, torch.float32)[2:], "text": text_calls,
             "vae": lambda: [lambda m: m.decode(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)))]}
    for call in calls[name]():
        expected = call(plain)
        out = call(fast)
        assert out.requires_grad and torch.equal(out, expected)
        out.float().sum().backward()
    swapped = [m for m in fast.modules() if type(m) in PLAIN and type(m).__name__ != "PackableConv2d"]
    assert any(p.grad is not None for m in swapped for p in m.parameters())  # gradients reach their weights
    assert kernels == {"mkldnn": 0, "winograd": 0, "subpixel": 0, "bf16 attention": 0}


def test_the_runtime_optimizes_on_a_cpu_only():
    from torchsd.runtime import RuntimeOptions, apply_runtime

    sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(), "cpu", torch.float32)
    for model in (sd.unet, sd.vae, sd.text_encoder):
        assert any(type(m) in PLAIN for m in model.modules())
    assert sd.denoiser.unet is sd.unet
    sd = apply_runtime(sd, RuntimeOptions(), "meta", torch.float32)  # any device but a CPU: plain blocks back
    for model in (sd.unet, sd.vae, sd.text_encoder):
        assert not any(type(m) in PLAIN for m in model.modules())
    sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(), "cpu", torch.float16)  # nothing fast in fp16
    assert not any(type(m) in PLAIN for m in sd.unet.modules())


def test_clip_layers_call_a_hooked_attention_or_mlp_as_modules():
    """FusedEncoderLayer inlines its attention and MLP; a hook on either (explain, offload, a user's) must
    still run, so that layer takes the plain path."""
    text = optimize(networks()[0]["text"])
    seen = []
    text.layers[0].self_attn.register_forward_hook(lambda module, args, out: seen.append("attention"))
    text.layers[1].mlp.register_forward_pre_hook(lambda module, args: seen.append("mlp"))
    with torch.inference_mode():
        text_calls()[0](text)
    assert seen == ["attention", "mlp"]

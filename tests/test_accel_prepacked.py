"""Weights packed for oneDNN while sampling (accel/prepacked.py): the same numbers, one copy in memory, and
every weight back bit for bit afterwards, whatever happened inside."""

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from reference import max_rel_error, random_pipeline
from torchsd.accel import optimize, prepacked
from torchsd.accel.prepacked import PackableConv2d, Stage, packed_weights, prepacking_available
from torchsd.models.layers import Upsample
from torchsd.pipeline import GenerationRequest
from torchsd.runtime import (
    RuntimeOptions,
    add_runtime_arguments,
    apply_runtime,
    runtime_options_from_args,
    wants_prepack,
)

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="this PyTorch build has no oneDNN")


def packable_conv(*args, **kwargs) -> PackableConv2d:
    """A 3x3 convolution as ``accel.optimize`` swaps it in."""
    conv = optimize(nn.Conv2d(*args, **kwargs))
    assert type(conv) is PackableConv2d
    return conv


def conv3x3s(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (id(p), p.detach().clone()) for name, p in model.named_parameters()}


def assert_restored(model: nn.Module, before: dict) -> None:
    """The same Parameter objects, holding exactly the values they had, with no trace of the context."""
    for name, p in model.named_parameters():
        assert id(p) == before[name][0], name
        assert torch.equal(p, before[name][1]), name
    for m in model.modules():
        assert "packing" not in m.__dict__ and "forward" not in m.__dict__


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_unet_gives_the_same_output_with_one_copy_of_each_weight(dtype, tolerance):
    sd = random_pipeline("sd1")
    unet = optimize(sd.unet.to(dtype))
    x, t = torch.randn(2, 4, 16, 16, dtype=dtype), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, sd.config.unet.context_dim, dtype=dtype)
    before = snapshot(unet)
    bytes_before = sum(c.weight.untyped_storage().nbytes() for c in conv3x3s(unet))
    with torch.inference_mode():
        plain = unet(x, t, context).float()
        with packed_weights(unet):
            first, second = unet(x, t, context).float(), unet(x, t, context).float()
            packed = [c for c in conv3x3s(unet) if c.packed]
            assert packed, "no convolution ran packed"
            assert all(c.weight.untyped_storage().nbytes() == 0 for c in packed)  # the plain copy is gone
            bytes_inside = sum(c.weight.untyped_storage().nbytes() for c in conv3x3s(unet))
            assert bytes_inside < bytes_before
        after = unet(x, t, context).float()
    assert max_rel_error(first, plain) < tolerance
    assert torch.equal(first, second)
    assert torch.equal(after, plain)
    assert_restored(unet, before)


def test_weights_shared_with_other_tensors_are_left_alone():
    torch.manual_seed(0)
    conv = packable_conv(8, 16, 3, padding=1)
    kept = conv.state_dict()  # shares the weight's storage: releasing it would empty these too
    x = torch.randn(2, 8, 16, 16)  # 512 output pixels: where packing is used
    with torch.no_grad():
        expected = conv(x)
        with packed_weights(conv):
            assert torch.allclose(conv(x), expected, atol=1e-6)
            assert conv.packing is Stage.PLAIN
            assert conv.weight.untyped_storage().nbytes() > 0
    assert torch.equal(kept["weight"], conv.weight)


def test_autograd_inside_takes_the_plain_weight_back_and_stays_plain():
    torch.manual_seed(0)
    conv = packable_conv(8, 16, 3, padding=1)
    before = snapshot(conv)
    x = torch.randn(2, 8, 16, 16)  # 512 output pixels: where packing is used
    with torch.no_grad():
        expected = conv(x)
    with packed_weights(conv):
        with torch.no_grad():
            conv(x)
        assert conv.weight.untyped_storage().nbytes() == 0
        y = conv(x.clone().requires_grad_())  # as CLIP guidance differentiates through a model
        assert torch.allclose(y, expected, atol=1e-6)
        y.sum().backward()
        assert conv.weight.grad is not None and conv.packing is Stage.PLAIN
        with torch.no_grad():
            assert torch.allclose(conv(x), expected, atol=1e-6) and conv.packing is Stage.PLAIN
    conv.weight.grad = None
    assert_restored(conv, before)


def test_an_error_inside_still_gives_every_weight_back():
    sd = random_pipeline("sd1")
    optimize(sd.unet)
    before = snapshot(sd.unet)
    with pytest.raises(RuntimeError, match="interrupted"), torch.inference_mode():
        with packed_weights(sd.unet):
            sd.unet(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 77, sd.config.unet.context_dim))
            raise RuntimeError("interrupted")
    assert_restored(sd.unet, before)


def test_nested_contexts_and_a_parameter_replaced_inside():
    torch.manual_seed(0)
    conv = packable_conv(8, 16, 3, padding=1)
    before = snapshot(conv)
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        with packed_weights(conv):
            with packed_weights(conv):  # the inner one leaves the work to the outer
                conv(x)
            assert conv.packed and conv.weight.untyped_storage().nbytes() == 0
            old, old_values = conv.weight, before["weight"][1]
            new = nn.Parameter(torch.randn(16, 8, 3, 3))
            conv.weight = new  # as loading other weights, or swapping them for a while, would
            expected = torch.nn.functional.conv2d(x, new, conv.bias, padding=1)
            assert torch.allclose(conv(x), expected, atol=1e-5)
            assert torch.equal(old, old_values)  # the released Parameter got its values back at once
        assert conv.weight is new and torch.equal(conv.weight, new)
        assert "packing" not in conv.__dict__


def test_code_that_reads_the_weight_itself_gets_it_back():
    """Upsample reads its conv's weight directly (sub-pixel path): after the conv ran packed, it must see the
    plain weight, not a released one."""
    torch.manual_seed(0)
    up = optimize(Upsample(16))
    before = snapshot(up)
    small, large = torch.randn(2, 16, 8, 8), torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        expected = up(large)
        with packed_weights(up):
            up(small)  # 8x8 at batch 2: upsample, then the conv through its (packed) forward
            assert up.conv.weight.untyped_storage().nbytes() == 0
            assert torch.allclose(up(large), expected, atol=1e-5)  # 16x16: the sub-pixel path
    assert_restored(up, before)


def test_sampling_packs_the_unet_and_gives_the_same_image(monkeypatch):
    assert "prepack" not in apply_runtime(random_pipeline("sd1"), RuntimeOptions(), "cpu",
                                          torch.float32).sampling_hooks  # opt-in
    sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(prepack=True), "cpu", torch.float32)
    made = []
    original = prepacked._Packed.__init__

    def counting(self, conv, x):
        made.append(conv)
        original(self, conv, x)

    monkeypatch.setattr(prepacked._Packed, "__init__", counting)
    before = snapshot(sd.unet)
    request = GenerationRequest(prompt="a red circle", width=32, height=32, steps=3, seed=1, sampler="euler")
    packed_image = sd.generate(request).images[0]
    assert made, "sampling did not pack any convolution"
    assert_restored(sd.unet, before)
    sd.sampling_hooks.pop("prepack")
    count = len(made)
    plain_image = sd.generate(request).images[0]
    assert len(made) == count
    diff = np.abs(np.asarray(packed_image, dtype=np.int16) - np.asarray(plain_image, dtype=np.int16))
    assert diff.max() <= 1  # the same convolutions, at most a last-bit rounding apart in 8 bits


def test_runtime_option_and_flags():
    cpu = torch.device("cpu")
    assert wants_prepack(RuntimeOptions(prepack=True), cpu)
    assert not wants_prepack(RuntimeOptions(), cpu)
    assert not wants_prepack(RuntimeOptions(prepack=True), torch.device("cuda"))
    assert wants_prepack(RuntimeOptions(prepack=True), cpu, torch.bfloat16)
    assert not wants_prepack(RuntimeOptions(prepack=True), cpu, torch.float16)  # optimize leaves float16 plain
    with pytest.raises(ValueError, match="offloading"):
        RuntimeOptions(prepack=True, offload="model")
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    assert runtime_options_from_args(parser.parse_args(["--prepack"])).prepack is True
    assert runtime_options_from_args(parser.parse_args([])).prepack is False


def test_only_sizes_where_packing_repays_itself_are_packed():
    torch.manual_seed(0)
    conv = packable_conv(8, 16, 3, padding=1)
    with torch.no_grad(), packed_weights(conv):
        # 32 and 2048 output pixels, and 128 in float32 (whose slower reorder of twice the bytes repays later)
        for x in (torch.randn(2, 8, 4, 4), torch.randn(2, 8, 32, 32).bfloat16(), torch.randn(2, 8, 8, 8)):
            conv.to(x.dtype)(x)
            assert conv.packing is Stage.PENDING and conv.weight.untyped_storage().nbytes() > 0
        conv.bfloat16()(torch.randn(2, 8, 8, 8).bfloat16())
        assert conv.packed


def test_a_weight_packed_at_one_size_is_written_back_for_another():
    """Packed at 16x16, then called at 4x4 (a convolution as a matmul, which reads the weight itself)."""
    torch.manual_seed(0)
    conv = packable_conv(8, 16, 3, padding=1)
    before = snapshot(conv)
    small = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        expected = conv(small)
        with packed_weights(conv):
            conv(torch.randn(2, 8, 16, 16))
            assert conv.packed
            assert torch.allclose(conv(small), expected, atol=1e-5)
            assert conv.packing is Stage.PLAIN and conv.weight.untyped_storage().nbytes() > 0
    assert_restored(conv, before)


def test_plain_convolutions_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="accel.optimize"):
        with packed_weights(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))):
            pass
    with packed_weights(nn.Conv2d(8, 16, 3, padding=1), enabled=False):  # not asked for: nothing to refuse
        pass


def test_the_runtime_gives_the_sampling_loop_its_context():
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0])  # 512 output pixels at the top level
    for prepack in (True, False):
        sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(prepack=prepack), "cpu", torch.float32)
        context = torch.randn(2, 77, sd.config.unet.context_dim)
        with torch.no_grad(), sd.sampling_context():
            sd.unet(x, t, context)
            assert any(c.packed for c in conv3x3s(sd.unet)) == prepack
        assert not any(c.packed for c in conv3x3s(sd.unet))

"""Weights kept quantized: GGUF blocks dequantized by torchsd's torch code equal the gguf package's reference
(gguf.quants.dequantize) for every supported type; a tiny FLUX.1 loaded from a GGUF file or an fp8 file (plain
and ComfyUI's scaled layouts) keeps its weights quantized in memory and gives exactly the outputs of the
model built from the dequantized weights."""

import numpy as np
import pytest
import torch

from test_flux import TINY
from torchsd.checkpoints import bfl
from torchsd.checkpoints.io import CheckpointError, save_safetensors
from torchsd.checkpoints.quantized import load_flux, quantized_bytes, read_fp8, read_gguf
from torchsd.config import FluxConfig
from torchsd.models.flux import Flux
from torchsd.models.quantized import GGUF_BLOCKS, QuantizedLinear, QuantizedTensor

gguf = pytest.importorskip("gguf")
TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "F16", "BF16"]
# 256-wide so that every matrix holds whole K-quant super-blocks (FLUX.1's widths are multiples of 256)
WIDE = FluxConfig(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=128, context_dim=256,
                  pooled_dim=256)


def quantize(weight: torch.Tensor, kind: str) -> np.ndarray:
    """gguf's own quantizer; for the K-quants (which it only dequantizes) random blocks with sane scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("Q4_K", "Q5_K"):
        size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(weight.numel())
        blocks = rng.integers(0, 256, (weight.numel() // size, nbytes), dtype=np.uint8)
        blocks[:, 0:2] = np.full((len(blocks), 1), 0.002, np.float16).view(np.uint8)
        blocks[:, 2:4] = rng.uniform(0, 0.002, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        return blocks.reshape(weight.shape[0], -1)
    return gguf.quants.quantize(weight.numpy(), qtype)


def write_gguf(path, tensors: dict[str, np.ndarray], kinds: dict[str, str]) -> None:
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, array in tensors.items():
        kind = kinds.get(name, "F32")
        raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", TYPES)
def test_dequantized_blocks_equal_gguf_reference(tmp_path, kind):
    weight = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    write_gguf(tmp_path / "w.gguf", {"w.weight": quantize(weight, kind)}, {"w.weight": kind})
    (stored,) = gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors
    reference = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(4, 512)
    tensor = read_gguf(tmp_path / "w.gguf")["w.weight"]
    assert isinstance(tensor, QuantizedTensor) and tensor.qtype == kind and tensor.shape == (4, 512)
    assert torch.equal(tensor.dequantize(), torch.from_numpy(np.asarray(reference, dtype=np.float32)))
    if kind in ("Q8_0", "Q4_0", "F16", "BF16"):  # gguf's quantizer: the error a format allows
        assert (tensor.dequantize() - weight).abs().max() < {"Q8_0": 0.03, "Q4_0": 0.5}.get(kind, 0.02)


def run(model, config):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.latent_channels, 4, 6, generator=gen)
    context = torch.randn(1, 3, config.context_dim, generator=gen)
    pooled = torch.randn(1, config.pooled_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), context, pooled, guidance=torch.tensor([3.5]))


def reference_model(config, original):
    """The same file's weights, dequantized once, in a plain Flux."""
    dense = {k: v.dequantize() if isinstance(v, QuantizedTensor) else v.float() for k, v in original.items()}
    model = Flux(config).eval()
    model.load_state_dict(bfl.from_bfl(dense, config), strict=True)
    return model


def test_flux_from_gguf_stays_quantized_and_equals_dequantized_model(tmp_path):
    torch.manual_seed(0)
    original = bfl.to_bfl(Flux(WIDE).state_dict(), WIDE)
    kinds, arrays = {}, {}
    for name, value in original.items():
        if value.ndim == 2:
            kinds[name] = TYPES[len(kinds) % len(TYPES)] if value.shape[1] % 256 == 0 else "Q8_0"
            arrays[name] = quantize(value, kinds[name])
        else:
            arrays[name] = value.numpy()
    assert set(kinds.values()) == set(TYPES)
    path = tmp_path / "flux1-tiny-Q4_K_S.gguf"
    write_gguf(path, arrays, kinds)

    model = load_flux(path, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.qtype for m in layers} == set(TYPES)
    assert all(m.quantized_weight().data.dtype == (torch.uint8 if m.qtype[0] == "Q" else {"F16": torch.float16,
                                                                        "BF16": torch.bfloat16}[m.qtype])
               for m in layers)
    stored = sum(a.nbytes for n, a in arrays.items() if n in kinds)
    assert quantized_bytes(model) == stored
    dense_bytes = sum(p.numel() * 4 for n, p in Flux(WIDE).named_parameters() if p.ndim == 2)
    assert stored < dense_bytes / 3
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.equal(run(model, WIDE), run(reference_model(WIDE, read_gguf(path)), WIDE))


@pytest.mark.parametrize("layout", ["plain", "comfyui_scaled", "weight_scale_per_row"])
def test_flux_from_fp8_stays_quantized_and_equals_dequantized_model(tmp_path, layout):
    torch.manual_seed(0)
    original = bfl.to_bfl(Flux(TINY).state_dict(), TINY, prefix="model.diffusion_model.")
    tensors = {}
    for i, (name, value) in enumerate(original.items()):
        if value.ndim != 2:
            tensors[name] = value
            continue
        dtype = torch.float8_e5m2 if i % 3 == 0 else torch.float8_e4m3fn
        if layout == "plain":
            tensors[name] = value.to(dtype)
        elif layout == "comfyui_scaled":
            scale = value.abs().max() / 448
            tensors[name] = (value / scale).to(dtype)
            tensors[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            tensors[name.removesuffix("weight") + "scale_input"] = torch.tensor(1.0)
        else:
            scale = value.abs().amax(1, keepdim=True) / 448
            tensors[name] = (value / scale).to(dtype)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
    if layout == "comfyui_scaled":
        tensors["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "flux1-tiny-fp8.safetensors"
    save_safetensors(tensors, path)

    model = load_flux(path, TINY, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == sum(isinstance(m, torch.nn.Linear) for m in Flux(TINY).modules())  # every one
    assert all(m.quantized_weight().data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for m in layers)
    quantized = read_fp8(path)
    assert torch.equal(run(model, TINY), run(reference_model(TINY, bfl.transformer_tensors(quantized)), TINY))
    error = max((q.dequantize() - original[k]).abs().max() for k, q in quantized.items()
                if isinstance(q, QuantizedTensor))
    assert error < 0.05
    model.to(torch.bfloat16)  # the float tensors become bfloat16; the stored bytes stay fp8
    assert all(m.quantized_weight().data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for m in layers)
    assert quantized_bytes(model) == sum(m.out_features * m.in_features for m in layers)


def test_unsupported_and_mismatched_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unsupported quantization 'Q2_K'"):
        QuantizedTensor(torch.zeros(1, 84, dtype=torch.uint8), "Q2_K", (1, 256))
    writer_path = tmp_path / "q6.gguf"
    write_gguf(writer_path, {"w": np.zeros((1, 210), np.uint8)}, {"w": "Q6_K"})
    with pytest.raises(CheckpointError, match=r"q6\.gguf: tensor w is Q6_K"):
        read_gguf(writer_path)
    save_safetensors(bfl.to_bfl(Flux(TINY).state_dict(), TINY), tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_flux(tmp_path / "f.safetensors", FluxConfig(**{**TINY.__dict__, "num_single_blocks": 3}))


def test_a_truncated_or_foreign_gguf_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path, {"w": np.zeros((4, 34 * 8), np.uint8), "b": np.zeros(256, np.float32)}, {"w": "Q8_0"})
    data = path.read_bytes()
    assert set(read_gguf(path)) == {"w", "b"}
    for cut in (100, 600, len(data) - 40):  # inside the header, inside w, inside b
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable GGUF file .*download complete"):
            read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a GGUF file at all")
    with pytest.raises(CheckpointError, match="text.gguf: not a readable GGUF file"):
        read_gguf(tmp_path / "text.gguf")


def test_sd35_from_fp8_all_in_one_file_equals_dequantized_model(tmp_path):
    from test_mmdit import CONFIGS
    from torchsd.checkpoints import sd3_original
    from torchsd.checkpoints.quantized import load_mmdit
    from torchsd.models.mmdit import MMDiT

    config = CONFIGS["sd35_medium"]
    torch.manual_seed(0)
    original = sd3_original.to_original(MMDiT(config).state_dict(), config)  # under model.diffusion_model.
    tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in original.items()}
    tensors["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(3, 4)
    save_safetensors(tensors, tmp_path / "sd3.5_medium_fp8.safetensors")
    model = load_mmdit(tmp_path / "sd3.5_medium_fp8.safetensors", config, dtype=torch.float32)
    dense = MMDiT(config).eval()
    dense.load_state_dict(sd3_original.from_original({k: v.float() for k, v in tensors.items()}, config))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == \
        sum(isinstance(m, torch.nn.Linear) for m in dense.modules())
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen), \
        torch.randn(1, 12, generator=gen)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([300.0]), context, pooled),
                           dense(x, torch.tensor([300.0]), context, pooled))


@pytest.mark.parametrize("kind,limit_gb", [("Q8_0", 13.0), ("Q5_K", 8.5), ("Q4_K", 7.0), ("Q4_0", 7.0),
                                           ("float8_e4m3fn", 12.5)])
def test_full_size_flux_dev_fits_24_gb_kept_quantized(kind, limit_gb):
    """FLUX.1-dev's BFL tensors on the meta device, their matrices at the format's bytes per value (as city96's
    GGUFs: matrices whose rows hold whole blocks), the rest in float32: the resident weights."""
    size, nbytes = {"float8_e4m3fn": (1, 1), **GGUF_BLOCKS}[kind]
    total = 0
    for shape in bfl.layout(FluxConfig.flux_dev()).expected_shapes().values():
        count = int(np.prod(shape))
        total += count * nbytes // size if len(shape) == 2 and shape[1] % size == 0 else count * 4
    assert total / 1e9 < limit_gb


def test_load_transformer_tells_the_family_and_variant_from_the_tensors(tmp_path):
    from test_mmdit import CONFIGS
    from torchsd.checkpoints import sd3_original
    from torchsd.checkpoints.flow_files import detect, load_transformer
    from torchsd.models.mmdit import MMDiT

    torch.manual_seed(0)
    schnell = FluxConfig(**{**WIDE.__dict__, "guidance_embeds": False})
    original = bfl.to_bfl(Flux(schnell).state_dict(), schnell)
    write_gguf(tmp_path / "schnell.gguf", {k: quantize(v, "Q8_0") if v.ndim == 2 else v.numpy()
                                           for k, v in original.items()},
               {k: "Q8_0" for k, v in original.items() if v.ndim == 2})
    found, model = load_transformer(tmp_path / "schnell.gguf", dtype=torch.float32)
    assert (found.family, found.variant, found.config) == ("flux", "schnell", schnell)
    assert isinstance(model, Flux) and isinstance(model.single_blocks[0].mlp_in, QuantizedLinear)

    config = CONFIGS["sd35_medium"]
    save_safetensors(sd3_original.to_original(MMDiT(config).state_dict(), config), tmp_path / "sd35m.safetensors")
    found, model = load_transformer(tmp_path / "sd35m.safetensors", dtype=torch.float32)
    assert (found.family, found.variant) == ("sd3", "sd35_medium") and isinstance(model, MMDiT)
    assert {**found.config.__dict__, "sample_size": 16} == config.__dict__  # the base grid size is not stored
    with pytest.raises(CheckpointError, match=r"u\.safetensors: neither a FLUX.1"):
        detect({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "u.safetensors")


def test_gguf_convolution_flattened_by_comfyui_gguf_gets_its_shape_back(tmp_path):
    weight = torch.randn(8, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    writer = gguf.GGUFWriter(str(tmp_path / "conv.gguf"), "sd3")
    writer.add_array("comfy.gguf.orig_shape.x_embedder.proj.weight", list(weight.shape))
    writer.add_tensor("x_embedder.proj.weight", quantize(weight.reshape(8, 64), "Q8_0"),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("bias", quantize(torch.randn(1, 64), "Q8_0")[0], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = read_gguf(tmp_path / "conv.gguf")
    conv = tensors["x_embedder.proj.weight"]
    assert isinstance(conv, torch.Tensor) and conv.shape == (8, 16, 2, 2)
    assert (conv - weight).abs().max() < 0.03
    assert isinstance(tensors["bias"], torch.Tensor) and tensors["bias"].shape == (64,)

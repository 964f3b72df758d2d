"""SD 3.5 and FLUX.1 transformers on this CPU (random weights; prints figures, asserts nothing).

    PYTHONPATH=src python benchmarks/flow_cpu.py                         # all parts
    PYTHONPATH=src python benchmarks/flow_cpu.py --parts mmdit --sizes tiny

mmdit  one transformer step (one call, no CFG batch) of torchsd's MMDiT and diffusers' SD3Transformer2DModel
       sharing the same random weights, float32 and bfloat16: a tiny config at 64 px and SD 3.5 Medium's
       (2.24 B parameters, MMDiT-X) at 512 px: 1024 image tokens + 333 text tokens (77 CLIP + 256 T5).
       Medium: ``--medium-repeats`` calls (default 1, no warm-up: on 2 cores one call takes a minute).
gguf   a FLUX.1-width transformer (3072 wide, 24 heads of 128) in a GGUF file whose linear weights are Q4_0,
       loaded kept quantized and run for one step at 512 px (1024 image + 512 text tokens, FLUX.1-dev's
       guidance input): file size, RSS after load, one step's time and the process's peak RSS. ``--double``
       and ``--single`` set the depth (FLUX.1: 19 and 38); the Q4_0 blocks are random bytes with sane scales
       (what matters here is the bytes held and dequantized, not the values).
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn, repeats: int, warmup: bool) -> float:
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every float tensor random (small), fast: N(0, 0.02), norms' weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02 + (1.0 if "norm" in name else 0.0))


def bench_mmdit(size: str, dtypes: list[str], repeats: int) -> None:
    from diffusers import SD3Transformer2DModel

    from torchsd.checkpoints.mmdit import config_to_diffusers, from_diffusers
    from torchsd.config import MMDiTConfig
    from torchsd.models.mmdit import MMDiT

    if size == "tiny":
        config = MMDiTConfig(num_layers=4, num_heads=4, head_dim=32, context_dim=256, pooled_dim=128, sample_size=32,
                             pos_embed_max_size=32, qk_norm=True, dual_attention_blocks=(0, 1))
        pixels, text_tokens, warmup = 64, 77 + 32, True
    else:
        config, pixels, text_tokens, warmup = MMDiTConfig.sd35_medium(), 512, 77 + 256, False
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**config_to_diffusers(config))
    reference = reference.to_empty(device="cpu").eval()
    random_init_(reference)
    params = sum(p.numel() for p in reference.parameters())
    gen = torch.Generator().manual_seed(1)
    h = pixels // 8
    x = torch.randn(1, 16, h, h, generator=gen)
    context = torch.randn(1, text_tokens, config.context_dim, generator=gen)
    pooled = torch.randn(1, config.pooled_dim, generator=gen)
    t = torch.tensor([700.0])
    print(f"MMDiT {size}: {params / 1e9:.3f} B parameters, {pixels} px ({(h // 2) ** 2} image + {text_tokens} text "
          f"tokens), {repeats} call(s){' after a warm-up' if warmup else ', no warm-up'}")
    for name in dtypes:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        reference.to(dtype)
        with torch.device("meta"):
            ours = MMDiT(config)
        ours.load_state_dict(from_diffusers(reference.state_dict(), config), assign=True)  # the same tensors
        ours.eval()
        args = (x.to(dtype), t, context.to(dtype), pooled.to(dtype))
        with torch.no_grad():
            mine = timed(lambda: ours(*args), repeats, warmup)
            theirs = timed(lambda: reference(hidden_states=args[0], timestep=t, encoder_hidden_states=args[2],
                                             pooled_projections=args[3]).sample, repeats, warmup)
        print(f"  {name}: torchsd {mine:8.2f} s   diffusers {theirs:8.2f} s   torchsd/diffusers {mine / theirs:.2f}")
        ours = None  # the next dtype builds its own
        gc.collect()


def write_q4_gguf(path: Path, double: int, single: int) -> int:
    """A FLUX.1-width transformer in BFL's names, Q4_0 linear weights (random blocks), F32 vectors."""
    import gguf
    import numpy as np

    from torchsd.checkpoints import bfl
    from torchsd.checkpoints.flux import expected_shapes
    from torchsd.config import FluxConfig

    config = FluxConfig(num_double_blocks=double, num_single_blocks=single)
    layout = bfl.layout(config)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "flux")
    count = 0
    for name, shape in layout.expected_shapes().items():
        count += int(np.prod(shape))
        if len(shape) == 2 and shape[1] % 32 == 0:
            blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 32, 18), dtype=np.uint8)
            blocks[:, :2] = np.frombuffer(np.full(len(blocks), 0.002, np.float16).tobytes(), np.uint8).reshape(-1, 2)
            writer.add_tensor(name, blocks.reshape(shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert set(expected_shapes(config))  # the layout covers every torchsd tensor
    return count


def bench_gguf(double: int, single: int, dtype_name: str) -> None:
    from torchsd.checkpoints.flow_files import load_transformer

    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flux-q4_0.gguf"
        start = time.perf_counter()
        count = write_q4_gguf(path, double, single)
        print(f"GGUF Q4_0 FLUX.1-width transformer, {double} double + {single} single blocks "
              f"(FLUX.1: 19 + 38): {count / 1e9:.2f} B parameters, file {path.stat().st_size / 2 ** 30:.2f} GiB "
              f"(written in {time.perf_counter() - start:.0f} s)")
        gc.collect()
        before = rss_gib()
        start = time.perf_counter()
        found, model = load_transformer(path, dtype=dtype)
        seconds = time.perf_counter() - start
        print(f"  loaded kept quantized in {seconds:.1f} s: RSS {before:.2f} -> {rss_gib():.2f} GiB")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, 64, generator=gen).to(dtype)
    context = torch.randn(1, 512, 4096, generator=gen).to(dtype)
    pooled = torch.randn(1, 768, generator=gen).to(dtype)
    with torch.no_grad():
        seconds = timed(lambda: model(x, torch.tensor([700.0]), context, pooled, guidance=3.5), 1, False)
    print(f"  one step at 512 px ({dtype_name} compute): {seconds:.1f} s; RSS now {rss_gib():.2f} GiB, "
          f"process peak RSS {peak_gib():.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["mmdit", "gguf"], choices=["mmdit", "gguf"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="calls per tiny measurement (the best is printed)")
    p.add_argument("--medium-repeats", type=int, default=1)
    p.add_argument("--double", type=int, default=19)
    p.add_argument("--single", type=int, default=38)
    p.add_argument("--gguf-dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a machine shared with other work, 1 avoids OpenMP threads waiting on "
                        "each other at every op)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {' '.join(load)}")
    if "mmdit" in args.parts:
        for size in args.sizes:
            bench_mmdit(size, args.dtypes, args.repeats if size == "tiny" else args.medium_repeats)
            gc.collect()
    if "gguf" in args.parts:
        bench_gguf(args.double, args.single, args.gguf_dtype)


if __name__ == "__main__":
    main()

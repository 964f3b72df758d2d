"""SD 3.5 and FLUX.1 transformers on this CPU (random weights; prints figures, asserts nothing).

    PYTHONPATH=src python benchmarks/flow_cpu.py                         # all parts
    PYTHONPATH=src python benchmarks/flow_cpu.py --parts mmdit --sizes tiny
    PYTHONPATH=src python benchmarks/flow_cpu.py --parts pipeline --double 1 --single 2 --t5-layers 4 --threads 1

mmdit  one transformer step (one call, no CFG batch) of torchsd's MMDiT and diffusers' SD3Transformer2DModel
       sharing the same random weights, float32 and bfloat16: a tiny config at 64 px and SD 3.5 Medium's
       (2.24 B parameters, MMDiT-X) at 512 px: 1024 image tokens + 333 text tokens (77 CLIP + 256 T5).
       Medium: ``--medium-repeats`` calls (default 1, no warm-up: on 2 cores one call takes a minute).
gguf   a FLUX.1-width transformer (3072 wide, 24 heads of 128) in a GGUF file whose linear weights are Q4_0,
       loaded kept quantized and run for one step at 512 px (1024 image + 512 text tokens, FLUX.1-dev's
       guidance input): file size, RSS after load, one step's time and the process's peak RSS. ``--double``
       and ``--single`` set the depth (FLUX.1: 19 and 38); the Q4_0 blocks are random bytes with sane scales
       (what matters here is the bytes held and dequantized, not the values).
pipeline  a whole FLUX.1-dev as its single files are kept (the Q4_0 GGUF transformer above, ae.safetensors,
       clip_l.safetensors, a T5 v1.1 at T5-XXL's width in fp16 with ``--t5-layers`` layers, FLUX.1-dev has 24)
       through ``torchsd.load_pipeline`` and one 512 px step, bf16, once with the text encoders freed after
       encoding and once kept, each in its own process (peak RSS is per process): RSS after load, when the
       transformer starts, peak; and what reading T5 again costs (seconds and GB/s, page cache warm).
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import torch

from common import timed


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


class PeakWatch:
    """The highest RssAnon (memory only this process holds) and RssFile (pages of memory-mapped files: the
    safetensors being read, clean page cache the kernel can drop under pressure) per phase of a run, sampled
    every 5 ms in a thread. ru_maxrss counts both together."""

    def __init__(self, phase: str):
        import threading

        self.phases: dict[str, list[float]] = {phase: [0.0, 0.0]}
        self.current = phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            peaks = self.phases[self.current]
            peaks[0] = max(peaks[0], status_gib("RssAnon"))
            peaks[1] = max(peaks[1], status_gib("RssFile"))

    def enter(self, phase: str) -> None:
        self.phases.setdefault(phase, [0.0, 0.0])
        self.current = phase

    def stop(self) -> "PeakWatch":
        self._stop.set()
        self._thread.join()
        return self

    def report(self) -> str:
        return ", ".join(f"{name} {anon:.2f} + {file:.2f}" for name, (anon, file) in self.phases.items())


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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
        # written by a child process, so that this process's peak RSS is the load's and the step's only
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            count = pool.submit(write_q4_gguf, path, double, single).result()
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


def flux_parts(folder: Path) -> dict[str, Path]:
    return {"transformer": folder / "flux1-dev-Q4_0.gguf", "vae": folder / "ae.safetensors",
            "clip_l": folder / "clip_l.safetensors", "t5": folder / "t5xxl_fp16.safetensors",
            "t5_tokenizer": folder / "t5_tokenizer"}


def write_flux_parts(folder: Path, double: int, single: int, t5_layers: int) -> dict:
    """FLUX.1-dev's files, random: Q4_0 GGUF transformer, ae.safetensors (LDM names), clip_l and T5 (transformers'
    names; T5 fp16 as t5xxl_fp16.safetensors ships) and a small T5 tokenizer.json (no T5 vocabulary is installed:
    a Unigram model trained here; the ids it gives are valid rows of T5's 32128-row table)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModel

    from torchsd.checkpoints import bfl
    from torchsd.checkpoints.t5 import expected_shapes, key_map
    from torchsd.config import T5Config, VAEConfig
    from torchsd.models.vae import AutoencoderKL

    gen = torch.Generator().manual_seed(0)
    parts = flux_parts(folder)
    write_q4_gguf(parts["transformer"], double, single)
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.flux())
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 + (1.0 if "norm" in k else 0.0)
             for k, v in vae.state_dict().items()}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bfl.vae_to_original(state).items()},
              str(parts["vae"]))
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768))  # CLIP-L's shapes
    save_file({k: (torch.randn(v.shape, generator=gen) * 0.02 + (1.0 if "norm" in k else 0.0)).half()
               if v.is_floating_point() else torch.arange(v.shape[-1]).expand(v.shape).contiguous()
               for k, v in clip.state_dict().items()}, str(parts["clip_l"]))
    config = T5Config(num_layers=t5_layers)
    shapes = expected_shapes(config)
    t5 = {}
    for ours, theirs in key_map(config).items():  # layer by layer, to keep the writer's own memory low
        t5[theirs] = (torch.randn(shapes[ours], generator=gen) * 0.02 + (1.0 if "norm" in ours else 0.0)).half()
    save_file(t5, str(parts["t5"]))
    del t5
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(["a photo of a cat on the moon, detailed"] * 20, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    parts["t5_tokenizer"].mkdir()
    tokenizer.save(str(parts["t5_tokenizer"] / "tokenizer.json"))
    gc.collect()
    return parts


def bench_pipeline_once(folder: Path, free: bool) -> None:
    """One process's run (``--pipeline-run``): load, one step, RSS at each stage."""
    import torchsd
    from torchsd.runtime import RuntimeOptions

    parts = flux_parts(folder)
    watch = PeakWatch("load")
    start = time.perf_counter()
    pipe = torchsd.load_pipeline(parts["transformer"], "cpu", torch.bfloat16, vae=parts["vae"],
                                 text_encoders=[parts["clip_l"], parts["t5"]], t5_tokenizer=parts["t5_tokenizer"],
                                 runtime=RuntimeOptions(free_text_encoders=free))
    loaded, load_seconds = rss_gib(), time.perf_counter() - start
    seen = {}

    def at_first_step(module, args) -> None:  # what the transformer starts with: the encoders gone, or not
        seen.setdefault("transformer", rss_gib())
        watch.enter("sample")

    pipe.transformer.register_forward_pre_hook(at_first_step)
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: watch.enter("decode"))
    watch.enter("encode")
    start = time.perf_counter()
    pipe.generate("a photo of a cat on the moon", width=512, height=512, steps=1, seed=0, distilled_cfg_scale=3.5)
    run_seconds = time.perf_counter() - start
    watch.stop()
    print(f"  text encoders {'freed' if free else 'kept '}: load {load_seconds:5.1f} s, RSS after load "
          f"{loaded:5.2f} GiB, when the transformer starts {seen['transformer']:5.2f} GiB, after the run "
          f"{rss_gib():5.2f} GiB; one 512 px step end to end {run_seconds:5.1f} s; peak RSS {peak_gib():5.2f} GiB "
          f"\n    sampled peaks per phase, RssAnon + RssFile GiB: {watch.report()}")
    if free:
        for attempt in ("first read again", "second read again"):
            start = time.perf_counter()
            pipe.text_encoder("t5")
            seconds = time.perf_counter() - start
            size = parts["t5"].stat().st_size
            print(f"  reading T5 again ({attempt}): {seconds:.1f} s for {size / 2 ** 30:.2f} GiB of fp16 "
                  f"({size / 2 ** 30 / seconds:.2f} GiB/s into bf16)")
            pipe.release_text_encoders()


def bench_pipeline(double: int, single: int, t5_layers: int, threads: int | None) -> None:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_flux_parts(Path(folder), double, single, t5_layers)
        sizes = {p.name: p.stat().st_size / 2 ** 30 for p in Path(folder).iterdir() if p.is_file()}
        print(f"FLUX.1-dev pipeline from single files ({double} double + {single} single blocks, T5 with "
              f"{t5_layers} of 24 layers), written in {time.perf_counter() - start:.0f} s: "
              + ", ".join(f"{name} {size:.2f} GiB" for name, size in sizes.items()))
        for free in (True, False):  # a process each: ru_maxrss is the process's peak
            command = [sys.executable, __file__, "--pipeline-run", folder, "--pipeline-free", str(int(free))]
            if threads:
                command += ["--threads", str(threads)]
            subprocess.run(command, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["mmdit", "gguf"], choices=["mmdit", "gguf", "pipeline"])
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
    p.add_argument("--t5-layers", type=int, default=4, help="pipeline: T5 layers at T5-XXL's width (FLUX.1: 24)")
    p.add_argument("--pipeline-run", type=Path, default=None, help=argparse.SUPPRESS)  # one process of "pipeline"
    p.add_argument("--pipeline-free", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline_run is not None:
        bench_pipeline_once(args.pipeline_run, bool(args.pipeline_free))
        return
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {' '.join(load)}")
    if "mmdit" in args.parts:
        for size in args.sizes:
            bench_mmdit(size, args.dtypes, args.repeats if size == "tiny" else args.medium_repeats)
            gc.collect()
    if "gguf" in args.parts:
        bench_gguf(args.double, args.single, args.gguf_dtype)
    if "pipeline" in args.parts:
        bench_pipeline(args.double, args.single, args.t5_layers, args.threads)


if __name__ == "__main__":
    main()

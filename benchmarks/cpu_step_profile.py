"""Where a guided U-Net step's time goes on this CPU: torchsd's ops (torch.profiler) beside OpenVINO's nodes
(its PERF_COUNT), on the same SD 1.5-size random weights, grouped into the same few kinds of work.

    PYTHONPATH=src python benchmarks/cpu_step_profile.py --size 256 --dtype bf16 --threads 2 --ov-cache /tmp/ov-sd15

The OpenVINO model is converted as ``cpu_vs_openvino.py`` converts it (``--ov-cache``: read from, or saved
to, the folder that benchmark uses). Both profilers add a little time of their own; the two plain step times
printed first are without them. torchsd runs some few-pixel convolutions as matmuls (``accel``): they are
counted as convolutions here, as OpenVINO counts its own.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch

import common
from cpu_vs_openvino import openvino_compile, openvino_models
from torchsd.diffusion.denoisers import classifier_free_guidance
from torchsd.runtime import RuntimeOptions, apply_runtime

# torch op -> kind; a linear whose weight is wider than the transformer's (K > 5120) is a convolution as a matmul
TORCH_KINDS = {"aten::mkldnn_convolution": "convolution", "mkldnn::_convolution_pointwise": "convolution",
               "aten::im2col": "convolution", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention"}
OV_KINDS = {"Convolution": "convolution", "FullyConnected": "linear", "Subgraph": "fused subgraphs (attention, "
            "elementwise)"}


def torch_profile(sd, dtype, size: int, threads: int) -> tuple[float, collections.Counter]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(dtype)
    cond, uncond = (torch.randn(1, 77, 768, generator=gen).to(dtype) for _ in range(2))
    denoise = classifier_free_guidance(sd.denoiser, cond, uncond, 7.5)
    sigma = torch.tensor(1.5)
    with torch.inference_mode(), sd.sampling_context():
        for _ in range(2):
            denoise(x, sigma)
        start = time.perf_counter()
        denoise(x, sigma)
        seconds = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            denoise(x, sigma)
    kinds = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        kind = TORCH_KINDS.get(event.key)
        if event.key == "mkldnn::_linear_pointwise":
            widest = max((s[-1] for s in event.input_shapes if s), default=0)
            kind = "convolution" if widest > 5120 else "linear"
        kinds[kind or "other"] += event.self_cpu_time_total / 1e6
    return seconds, kinds


def openvino_profile(model, dtype, size: int, threads: int) -> tuple[float, collections.Counter]:
    import numpy as np

    plain = openvino_compile(model, dtype, threads)[0].create_infer_request()
    h = size // 8
    inputs = [np.random.randn(2, 4, h, h).astype(np.float32), np.array(500.0, np.float32),
              np.random.randn(2, 77, 768).astype(np.float32)]
    for _ in range(2):
        plain.infer(inputs)
    start = time.perf_counter()
    plain.infer(inputs)
    seconds = time.perf_counter() - start
    request = openvino_compile(model, dtype, threads, PERF_COUNT=True)[0].create_infer_request()
    for _ in range(3):
        request.infer(inputs)
    kinds = collections.Counter()
    for node in request.profiling_info:
        kinds[OV_KINDS.get(node.node_type, "other")] += node.real_time.total_seconds()
    return seconds, kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--ov-cache", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sd = common.build()
    tokenizer_dir = tempfile.mkdtemp(prefix="torchsd-bench-tok-")
    sd.tokenizer.save_pretrained(tokenizer_dir)
    pipe = common.diffusers_pipeline(sd, tokenizer_dir)  # float32: what OpenVINO converts
    ov_unet, _, _ = openvino_models(pipe, args.size, args.ov_cache)
    del pipe
    for model in (sd.unet, sd.vae, sd.text_encoder):
        model.to(dtype=dtype)
    apply_runtime(sd, RuntimeOptions(), "cpu", dtype)
    ours_s, ours = torch_profile(sd, dtype, args.size, args.threads)
    theirs_s, theirs = openvino_profile(ov_unet, dtype, args.size, args.threads)
    print(f"guided U-Net step, {args.size} px, {args.dtype}, {args.threads} threads; {common.load_note()}")
    print(f"  plain step: torchsd {ours_s:.3f} s, OpenVINO {theirs_s:.3f} s")
    print("  profiled, seconds by kind of work:")
    for label, kinds in (("torchsd", ours), ("OpenVINO", theirs)):
        parts = ", ".join(f"{kind} {seconds:.3f}" for kind, seconds in kinds.most_common())
        print(f"    {label:<9} total {sum(kinds.values()):.3f}: {parts}")


if __name__ == "__main__":
    main()

"""Peak memory while loading a full-size SD 1.5 single file, measured with ``/usr/bin/time -v``.

Writes a random SD 1.5 checkpoint in the original layout to a temporary file (streamed tensor by
tensor, so this script itself stays small), then runs, each in a fresh process under /usr/bin/time:
  baseline  python -c "import torchsd"
  load      torchsd.load_pipeline(file, dtype=<the file's dtype>)
  load+use  the same, then read every weight once (as a first forward pass would)
and prints the maximum resident set sizes against the size of the weights. Goal: load+use < 1.3x.

    PYTHONPATH=src python benchmarks/load_memory.py [--dtype fp16] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}

CHILD = {
    "baseline": "import torchsd",
    "load": "import sys, torch, torchsd; torchsd.load_pipeline(sys.argv[1], dtype=getattr(torch, sys.argv[2]))",
    "load+use": "import sys, torch, torchsd\n"
                "sd = torchsd.load_pipeline(sys.argv[1], dtype=getattr(torch, sys.argv[2]))\n"
                "with torch.no_grad():\n"
                "    total = sum(float(p.float().sum()) for m in (sd.unet, sd.vae, sd.text_encoder) "
                "for p in m.parameters())\n",
}


def write_random_sd15(path: Path, dtype: torch.dtype) -> int:
    """A random SD 1.5 file in the original layout; returns the bytes of network weights."""
    from torchsd.checkpoints.ldm import model_states_on_meta, single_file_tensors
    from torchsd.config import ModelConfig

    config = ModelConfig.sd15()
    meta = single_file_tensors(config, model_states_on_meta(config))
    header, offset, weight_bytes = {}, 0, 0
    for key, value in meta.items():
        is_network_float = value.is_floating_point() and key.startswith(("model.", "first_stage", "cond_"))
        out_dtype = dtype if is_network_float else value.dtype
        size = value.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
        if value.is_floating_point() and key.startswith(("model.", "first_stage", "cond_")):
            weight_bytes += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, value in meta.items():
            spec = header[key]
            out_dtype = next(d for d, name in SAFETENSORS_DTYPES.items() if name == spec["dtype"])
            if value.device.type != "meta":  # schedule buffers, position ids: real values already
                tensor = value.to(out_dtype)
            else:
                tensor = (torch.randn(value.shape, generator=gen) * 0.02).to(out_dtype)
            f.write(tensor.contiguous().numpy().tobytes() if out_dtype != torch.bfloat16
                    else tensor.view(torch.int16).numpy().tobytes())
    return weight_bytes


def peak_rss_mb(code: str, *args: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the written file")
    parser.add_argument("--dir", default="/tmp", help="where the temporary checkpoint goes")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.float16
    fd, name = tempfile.mkstemp(suffix=".safetensors", prefix="sd15-random-", dir=args.dir)
    os.close(fd)
    path = Path(name)
    try:
        weights_mb = write_random_sd15(path, dtype) / 2 ** 20
        print(f"file {path} ({path.stat().st_size / 2**20:.0f} MiB), "
              f"network weights {weights_mb:.0f} MiB ({args.dtype})")
        dtype_name = str(dtype).removeprefix("torch.")  # loaded as stored: no cast, no copy
        results = {label: peak_rss_mb(code, str(path), dtype_name) for label, code in CHILD.items()}
    finally:
        path.unlink(missing_ok=True)
    base = results["baseline"]
    for label, mb in results.items():
        extra = "" if label == "baseline" else \
            f"  = {mb / weights_mb:.2f}x weights  ({(mb - base) / weights_mb:.2f}x above the interpreter baseline)"
        print(f"peak RSS {label:9s} {mb:8.0f} MiB{extra}")


if __name__ == "__main__":
    main()

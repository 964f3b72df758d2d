"""What AUTOMATIC1111's features cost at SD 1.5 size (random weights; prints figures, asserts nothing).

- prompt encoding for 1, 2 and 4 chunks (long prompts encode each 75-token chunk separately);
- merging a rank-R kohya LoRA over every attention and feed-forward layer of the U-Net and every text
  encoder layer, and restoring the exact originals afterwards (the per-run cost; sampling steps pay nothing).

    PYTHONPATH=src python benchmarks/bench_a1111.py [--device cuda] [--dtype fp16] [--rank 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from torchsd.checkpoints.lora import AppliedLora, LoraFile, LoraLayer, merged_loras
from torchsd.checkpoints.lycoris import LowRank
from torchsd.config import ModelConfig
from torchsd.models.clip import CLIPTextModel
from torchsd.models.unet import UNet
from torchsd.models.vae import AutoencoderKL
from torchsd.pipeline import StableDiffusion
from torchsd.text.tokenizer import CLIPTokenizer


def timed(fn, repeats: int, device: str) -> str:
    """Wall time per call, and on the CPU also the process's CPU time (which a busy shared machine
    inflates far less than the wall time)."""
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = (time.perf_counter() - start) / repeats, (time.process_time() - cpu_start) / repeats
    return f"{wall * 1e3:9.1f} ms wall" + (f", {cpu * 1e3:9.1f} ms CPU" if device == "cpu" else "")


def sd15(device: str, dtype: torch.dtype) -> StableDiffusion:
    config = ModelConfig.sd15()
    with torch.device("meta"):  # no random init: the values do not matter for timing
        unet, vae, text = UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)
    for model in (unet, vae, text):
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.01)
    sd = StableDiffusion(config, unet, vae, text, CLIPTokenizer())
    return sd.to(dtype=dtype)


def random_lora(sd: StableDiffusion, rank: int) -> LoraFile:
    layers = []
    targets = [("unet", n, m) for n, m in sd.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and (".attn" in n or ".ff." in n)]
    targets += [("text_encoder", n, m) for n, m in sd.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    for component, name, module in targets:
        update = LowRank(torch.randn(rank, module.in_features) * 0.01, torch.randn(module.out_features, rank) * 0.01)
        layers.append(LoraLayer(component, name, update, 1.0))
    return LoraFile("bench", None, tuple(layers))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["prompts", "lora"], default=None)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sd = sd15(args.device, dtype)
    print(f"SD 1.5-size models, random weights, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")

    for chunks in (1, 2, 4) if args.only != "lora" else ():
        prompt = " ".join(["cat"] * (75 * chunks - 5))
        print(f"encode_prompt, {chunks} chunk(s) ({77 * chunks} tokens): "
              f"{timed(lambda: sd.encode_prompt([prompt]), args.repeats, args.device)}")

    if args.only == "prompts":
        return
    lora = random_lora(sd, args.rank)
    applied = [AppliedLora(lora, 0.8, 0.8)]
    numel = sum(layer.up.shape[0] * layer.down.shape[1] for layer in lora.layers)

    def merge_and_restore() -> None:
        with merged_loras(sd, applied):
            pass

    print(f"LoRA rank {args.rank}, {len(lora.layers)} layers ({numel / 1e6:.0f}M weights touched): "
          f"merge + restore per run {timed(merge_and_restore, args.repeats, args.device)}")


if __name__ == "__main__":
    main()

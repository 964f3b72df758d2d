"""How a loaded pipeline runs: device, dtype, layout, the CPU speed-ups, compilation, memory savers. None
of it changes the weights or the request; each choice is an explicit field of ``RuntimeOptions``.

Defaults, and why (the measurements are in docs/performance.md):
- dtype: float16 on CUDA; bfloat16 on a CPU with native bf16 dot products (AVX-512 BF16 or AMX), where
  the U-Net and the VAE run markedly faster with images close to float32's; float32 on other CPUs,
  where bf16 is emulated and slower.
- channels-last: on CUDA for every network (cuDNN's fastest kernels are NHWC); on a CPU for the VAE
  only, where oneDNN decoded faster in NHWC while the U-Net ran slower in it. An fp32 VAE stays NCHW on
  a CPU where Winograd's algorithm beats the direct convolution (``accel/winograd.py``: NCHW only, and
  measured once per process, ``winograd.pays``).
- the CPU speed-ups: every network placed on a CPU gets ``accel.optimize``'s fast blocks (oneDNN post-op
  fusion, Winograd, sub-pixel upsampling, bf16 attention, reused cross-attention keys and values); the
  same numbers up to float rounding. On other devices the plain blocks run.
- ``torch.compile``: off. On this CPU (torch 2.13) the compiled U-Net ran slower than eager, after
  minutes of compilation; on CUDA it is the usual win. ``freeze`` lets Inductor treat the weights as
  constants: only for weights that do not change afterwards (apply LoRAs first).
- ``prepack``: off. During each sampling loop it holds the U-Net's 3x3 conv weights whose per-call
  reorder is a large share in oneDNN's layout in place of PyTorch's (``accel/prepacked.py``: one copy,
  never two). Steps get a few percent faster for a one-time cost per loop that 512 px images repay in a
  few steps, but 256 px bf16 only in about 26: hence opt-in.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from .accel import deoptimize, enable_model_offload, enable_sequential_offload, optimize, packed_weights, winograd
from .accel.prepacked import prepacking_available
from .models.layers import set_attention_chunk
from .models.tiling import VAETiling

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OFFLOAD_MODES = ("none", "model", "sequential")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (x86 AVX-512 BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on accelerators, bfloat16 on CPUs with native bf16, otherwise float32 (see module doc)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float16


@dataclass(frozen=True)
class RuntimeOptions:
    """``channels_last`` None: on where it helps (see module doc). ``attention_chunk``: attend that
    many queries at a time (large images without flash kernels). ``vae_tiling``: decode and encode
    images larger than one tile tile by tile. ``offload``: "model" keeps each network in CPU memory
    until it runs (one on the accelerator at a time), "sequential" moves one layer at a time (least
    memory, slowest). ``compile``: a ``torch.compile`` mode for the U-Net, or None.
    ``free_text_encoders`` (SD 3 / FLUX.1): drop the text encoders once the prompts are encoded and read
    them from their files again when a new prompt needs them; None: on where the model runs on a CPU, where
    reading T5-XXL again costs seconds against minutes for the transformer's steps, and memory decides
    whether FLUX.1 runs at all (docs/flow-models.md, "Memory")."""

    channels_last: bool | None = None
    attention_chunk: int | None = None
    vae_tiling: VAETiling | None = None
    offload: str = "none"
    compile: str | None = None
    compile_fullgraph: bool = False
    freeze: bool = False
    prepack: bool = False  # CPU: conv weights in oneDNN's layout while sampling (long loops; accel/prepacked.py)
    free_text_encoders: bool | None = None  # SD 3 / FLUX.1; None: on a CPU

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {self.offload!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        if self.attention_chunk is not None and self.attention_chunk < 1:
            raise ValueError(f"attention_chunk must be a positive number of queries; got {self.attention_chunk}")
        if self.prepack and self.offload != "none":
            raise ValueError("prepack is for a U-Net that runs on the CPU; offloading runs it on an accelerator")
        if self.compile is not None and self.offload != "none":
            raise ValueError("compile and offload do not mix (offloading moves weights under the compiled "
                             "graph); choose one")
        if self.freeze and self.compile is None:
            raise ValueError("freeze only applies to a compiled U-Net; set compile as well")


def wants_channels_last(options: RuntimeOptions, device: torch.device, network: str, dtype: torch.dtype) -> bool:
    """``network``: "unet", "vae" or "text" (which has no convolutions); ``dtype``: the weights'."""
    if options.channels_last is not None:
        return options.channels_last
    if device.type == "cuda":
        return True
    return device.type == "cpu" and network == "vae" and (dtype != torch.float32 or not winograd.pays())


def wants_prepack(options: RuntimeOptions, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether sampling holds the U-Net's conv weights in oneDNN's layout (``accel.packed_weights``):
    asked for, and the U-Net runs on the CPU (in ``dtype``, if given, one that ``accel.optimize`` takes)."""
    if options.prepack and not prepacking_available():
        raise ValueError("prepack needs PyTorch built with oneDNN (mkldnn); this build has none (drop --prepack)")
    cpu_dtype = dtype is None or dtype in (torch.float32, torch.bfloat16)
    return options.prepack and device.type == "cpu" and cpu_dtype


def apply_runtime(sd, options: RuntimeOptions, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None):
    """Place ``sd`` (a StableDiffusion) on ``device`` in ``dtype`` and apply ``options``; returns ``sd``.

    With ``prepack`` it adds the U-Net's packed weights to ``sd.sampling_hooks``, the contexts each sampling
    loop runs inside (``sd.sampling_context()``)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    networks = (sd.unet, sd.vae) + sd.text_encoders
    for name, model in zip(("unet", "vae", "text", "text"), networks):
        layout = torch.channels_last if wants_channels_last(options, device, name, dtype) else torch.contiguous_format
        model.to(dtype=dtype)
        model.to(memory_format=layout)  # only 4-D weights (the convolutions) change
        set_attention_chunk(model, options.attention_chunk)
        # the fast blocks are swapped in below the network's top, which itself stays the same object
        if device.type == "cpu":
            optimize(model, device, dtype)
        else:
            deoptimize(model)
    sd.vae_tiling = options.vae_tiling
    sd.sampling_hooks.pop("prepack", None)
    if wants_prepack(options, device, dtype):
        sd.sampling_hooks["prepack"] = lambda: packed_weights(sd.unet)
    if options.offload == "model":
        enable_model_offload(sd, device)
    elif options.offload == "sequential":
        enable_sequential_offload(sd, device)
    else:
        for model in networks:
            model.to(device)
    if options.compile is not None:
        sd.denoiser.unet = compile_unet(sd.unet, options.compile, fullgraph=options.compile_fullgraph,
                                        freeze=options.freeze)
    return sd


def compile_unet(unet: torch.nn.Module, mode: str = "default", *, fullgraph: bool = False, freeze: bool = False):
    """``torch.compile`` of the U-Net's forward with static shapes (a new size recompiles once).

    Returns a callable for the denoiser; ``unet`` itself (and its state dict) is unchanged."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    from torch._inductor import list_mode_options

    inductor = dict(list_mode_options(mode))
    if freeze:
        inductor["freezing"] = True
    return torch.compile(unet, fullgraph=fullgraph, dynamic=False, options=inductor or None)


class CUDAGraphUNet:
    """Replays one captured CUDA graph of the U-Net per input shape: the whole step is one launch.

    Inputs are copied into static buffers, so the caller's tensors may change between calls; the
    output is copied out, so it stays valid after the next replay. Only for CUDA and eager or
    compiled-without-cudagraphs U-Nets; the weights must stay where they are (no offload)."""

    def __init__(self, unet, warmup: int = 2):
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device; this machine has none (drop the CUDA-graph option)")
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need inputs on a CUDA device; got {x.device}")
        timesteps = torch.as_tensor(timesteps, device=x.device).float().expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, tuple(context.shape), context.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, timesteps, context)
        graph, (sx, st, sc), out = self.graphs[key]
        sx.copy_(x)
        st.copy_(timesteps)
        sc.copy_(context)
        graph.replay()
        return out.clone()

    def _capture(self, x, timesteps, context):
        static = (x.clone(), timesteps.clone(), context.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # let lazy initialisation (cuDNN plans, allocator) happen outside
                self.unet(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = self.unet(*static)
        return graph, static, out


# --- command-line flags ---------------------------------------------------------------------------

def add_runtime_arguments(p) -> None:
    """The ``RuntimeOptions`` flags every command that loads a model takes."""
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout for convolutions (default: on CUDA; on CPU for the VAE only)")
    p.add_argument("--attention-chunk", type=int, default=None, metavar="N",
                   help="attend N queries at a time (saves memory on large images)")
    p.add_argument("--vae-tiling", type=_tiling, nargs="?", const=VAETiling(), default=None, metavar="TILE[:OVERLAP]",
                   help="decode/encode images larger than TILE pixels tile by tile (default tile 512:64)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="keep networks in CPU memory until they run: whole ('model') or layer by layer")
    p.add_argument("--compile", choices=COMPILE_MODES, nargs="?", const="default", default=None,
                   help="torch.compile the U-Net (minutes of compilation first)")
    p.add_argument("--free-text-encoders", action=argparse.BooleanOptionalAction, default=None,
                   help="SD 3 / FLUX.1: drop the text encoders (T5-XXL: 9.5 GB) once the prompts are encoded, read "
                        "them again for a new prompt (default: on when running on a CPU)")
    p.add_argument("--prepack", action="store_true",
                   help="CPU: hold the U-Net's conv weights in oneDNN's layout while sampling, reordered once "
                        "rather than at every step (faster steps for a one-time cost: for long runs)")


def runtime_options_from_args(args) -> RuntimeOptions:
    """Options from parsed flags; a namespace without them (built by hand) gets the defaults."""
    return RuntimeOptions(channels_last=getattr(args, "channels_last", None),
                          attention_chunk=getattr(args, "attention_chunk", None),
                          vae_tiling=getattr(args, "vae_tiling", None), offload=getattr(args, "offload", "none"),
                          compile=getattr(args, "compile", None), prepack=getattr(args, "prepack", False),
                          free_text_encoders=getattr(args, "free_text_encoders", None))


def _tiling(text: str) -> VAETiling:
    try:
        parts = [int(v) for v in text.split(":")]
        if len(parts) > 2:
            raise ValueError
        return VAETiling(*parts)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--vae-tiling takes TILE or TILE:OVERLAP in pixels, e.g. 512:64; "
                                         f"got {text!r} ({err})") from None


# --- the one place the Python API, the CLI and the server get their defaults -------------------------

def load_pipeline(path: str | Path | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, *, runtime: RuntimeOptions | None = None,
                  lora_dirs: list[str | Path] = (), embedding_dirs: list[str | Path] = (),
                  taesd: str | Path | None = None, fast_decode: bool = False, **options):
    """A ready ``StableDiffusion`` from a diffusers folder or single file (``None``: the bundled model).

    ``device`` defaults to CUDA where there is one, else the CPU; ``dtype`` to ``default_dtype(device)``
    (bfloat16 on a CPU with native bf16: pass ``torch.float32`` for the reference's exact numbers);
    ``runtime``: ``RuntimeOptions`` (defaults: see the module doc). ``taesd``: a TAESD file or folder for
    previews; ``fast_decode``: decode final images with it too. ``options``: see
    ``checkpoints.read_checkpoint`` (``vae=``, ``use_ema=``, ``prediction_type=`` …)."""
    from .checkpoints.flow_pipeline import flow_family
    from .pipeline import StableDiffusion

    runtime = runtime or RuntimeOptions()  # validated before the (slow) load
    if fast_decode and taesd is None:
        raise ValueError("fast_decode decodes with TAESD: give one (--taesd PATH: taesd_decoder.pth, or a diffusers "
                         "AutoencoderTiny folder)")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if flow_family(path) is not None:  # SD 3 / 3.5 and FLUX.1: pipeline/flow_model.py
        return load_flow(path, device, dtype, runtime, lora_dirs, embedding_dirs, taesd, fast_decode, options)
    if options.keys() & {"text_encoders", "t5_tokenizer", "without_t5"}:
        raise ValueError(f"{path}: --text-encoder, --t5-tokenizer and --without-t5 are for SD 3 / FLUX.1 models")
    if runtime.free_text_encoders:
        raise ValueError(f"{path}: free_text_encoders (--free-text-encoders) is for SD 3 / FLUX.1, whose T5-XXL is "
                         f"9.5 GB; an SD 1/2/XL model's CLIP encoders stay loaded (use --offload on a GPU)")
    sd = StableDiffusion.from_checkpoint(path, device="cpu", dtype=dtype, lora_dirs=lora_dirs,
                                         embedding_dirs=embedding_dirs, **options)
    if taesd is not None:
        attach_taesd(sd, taesd, device, dtype, fast_decode, "sdxl" if sd.config.is_sdxl else sd.config.family)
    apply_runtime(sd, runtime, device, dtype)
    # a second model a request names (the refiner) runs as this one does; it only samples, so no previews
    sd.model_loader = lambda other: load_pipeline(other, device, dtype, runtime=runtime)
    return sd


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model: which model, where and how it runs."""
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or .safetensors/.ckpt file (default: bundled model)")
    p.add_argument("--variant", default=None,
                   help="diffusers folder weights variant: fp16 reads *.fp16.safetensors where a part has them")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps … (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None,
                   help="fp32, fp16 or bf16 (default: fp16 on GPU; bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--vae", type=Path, default=None,
                   help="use this VAE instead of the model's (file or diffusers folder)")
    p.add_argument("--text-encoder", dest="text_encoders", type=Path, action="append", default=[], metavar="FILE",
                   help="SD 3 / FLUX.1 single files: a text encoder file the model lacks (clip_l, clip_g, t5xxl; "
                        "repeat the flag); default: found in a text_encoder/ folder beside the model")
    p.add_argument("--t5-tokenizer", type=Path, default=None, metavar="PATH",
                   help="SD 3 / FLUX.1 single files: T5's tokenizer.json (or a folder with one)")
    p.add_argument("--without-t5", action="store_true",
                   help="SD 3 / 3.5: run without the T5-XXL encoder (zeros in its place, as diffusers' "
                        "text_encoder_3=None): 9.5 GB less, prompts followed less closely")
    p.add_argument("--taesd", "--preview-vae", dest="taesd", type=Path, default=None, metavar="PATH",
                   help="TAESD (taesd_decoder.pth, a folder of taesd_*.pth, or a diffusers AutoencoderTiny folder): "
                        "the server's live previews (default there: <models-dir>/VAE-taesd)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode final images with --taesd too: much faster, a little blurrier")
    add_runtime_arguments(p)


def load_from_args(args: argparse.Namespace):
    """``load_pipeline`` with the flags of ``add_model_arguments``."""
    options = runtime_options_from_args(args)  # validate before the (slow) load
    flow = {name: getattr(args, name) for name in ("text_encoders", "t5_tokenizer", "without_t5")
            if getattr(args, name, None)}
    return load_pipeline(args.model, args.device, args.dtype, runtime=options, vae=getattr(args, "vae", None),
                         variant=getattr(args, "variant", None), taesd=getattr(args, "taesd", None),
                         fast_decode=getattr(args, "fast_decode", False), **flow)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be one of fp32, fp16, bf16; got {text!r}") from None


def attach_taesd(sd, taesd: str | Path, device: torch.device, dtype: torch.dtype, fast_decode: bool,
                 family: str) -> None:
    """The TAESD of ``family`` (from a file, or a folder of several families' files) as ``sd.taesd``, refused
    where its latent space is not the model's."""
    from .checkpoints.taesd import load_taesd

    sd.taesd, sd.fast_decode = load_taesd(taesd, device, dtype, family=family), fast_decode
    tiny, vae = sd.taesd.config, sd.config.vae
    if (tiny.downscale_factor, tiny.latent_channels) != (vae.downscale_factor, vae.latent_channels):
        raise ValueError(f"{taesd}: this TAESD downsamples by {tiny.downscale_factor} into {tiny.latent_channels} "
                         f"latent channels; the model's VAE by {vae.downscale_factor} into "
                         f"{vae.latent_channels}: it is for another model family (taesd for SD 1/2, "
                         f"taesdxl for SDXL, taesd3 for SD 3, taef1 for FLUX.1)")


def load_flow(path, device: torch.device, dtype: torch.dtype, runtime: RuntimeOptions, lora_dirs, embedding_dirs,
              taesd, fast_decode: bool, options: dict):
    """``load_pipeline`` for SD 3 / 3.5 and FLUX.1 (``pipeline.flow_model``): the model on ``device`` in ``dtype``,
    or offloaded to it (``accel/offload.py``: text encoders, transformer and VAE one at a time, or layer by
    layer); the text encoders freed after use (``free_text_encoders``; by default on a CPU); TAESD previews.
    The U-Net's CPU speed-ups, compile and prepack are not wired to these models."""
    from .pipeline.flow_model import load_flow_pipeline

    unsupported = [name for name, value in (("compile", runtime.compile), ("prepack", runtime.prepack)) if value]
    if unsupported:
        raise ValueError(f"{path}: {', '.join(unsupported)} is not available for SD 3 / FLUX.1 models yet; drop it")
    free = runtime.free_text_encoders if runtime.free_text_encoders is not None else device.type == "cpu"
    offloaded = runtime.offload != "none"
    pipe = load_flow_pipeline(path, device="cpu" if offloaded else device, dtype=dtype, lora_dirs=lora_dirs,
                              embedding_dirs=embedding_dirs, free_text_encoders=free, **options)
    pipe.attention_chunk = runtime.attention_chunk
    for network in pipe.networks:
        set_attention_chunk(network, runtime.attention_chunk)
    pipe.vae_tiling = runtime.vae_tiling
    if taesd is not None:
        attach_taesd(pipe, taesd, device, dtype, fast_decode, pipe.family)
    if runtime.offload == "model":
        enable_model_offload(pipe, device)
    elif runtime.offload == "sequential":
        enable_sequential_offload(pipe, device)
    return pipe

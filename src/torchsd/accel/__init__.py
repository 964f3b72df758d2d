"""Speed-ups swapped in beside the models, never written into them.

``optimize(model, device, dtype)`` swaps a model's plain blocks for fast equivalents holding the same
layers (``optimize.py``); the runtime applies it to every network that runs on a CPU. The kernels:
oneDNN post-op fusion and few-pixel convolutions as matmuls (``fused.py``), Winograd 3x3 convolutions
(``winograd.py``), sub-pixel upsampling (``subpixel.py``), bf16 attention (``cpu_attention.py``), weights
packed for oneDNN during a sampling loop (``prepacked.py``). ``offload.py`` keeps weights in CPU memory
until they run on an accelerator.
"""

from .offload import Offload, enable_model_offload, enable_sequential_offload
from .optimize import deoptimize, optimize
from .prepacked import packed_weights, prepacking_available

__all__ = ["optimize", "deoptimize", "packed_weights", "prepacking_available", "Offload", "enable_model_offload",
           "enable_sequential_offload"]

"""LoRA fine-tuning (Hu et al. 2021) of any Stable Diffusion U-Net, saved in kohya's format.

Each attention projection W gets a trainable low-rank update: W x + (alpha / rank) * up(down(x)),
with ``up`` initialised to zero so training starts from the base model exactly. The file holds
``lora_unet_<module path with _>.{lora_down.weight, lora_up.weight, alpha}``, as AUTOMATIC1111 and kohya's
scripts read it: diffusers' module paths for SD 1/2, the original layout's for SDXL
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as kohya's SDXL scripts write them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoints.diffusers import UNET_RULES, _rename
from ..checkpoints.io import save_safetensors
from ..checkpoints.lora import original_unet_names
from .config import TrainConfig
from .distributed import Distributed
from .unet_task import UNetTask

TARGETS = ("to_q", "to_k", "to_v", "to_out")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * (self.alpha / self.rank)


def inject_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every attention projection of the U-Net's transformers; returns {module path: wrapper}."""
    unet.requires_grad_(False)
    wrapped = {}
    for name, module in list(unet.named_modules()):
        for target in TARGETS:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear) and ".transformer_blocks." in f".{name}.":
                wrapper = LoRALinear(child, rank, alpha)
                setattr(module, target, wrapper)
                wrapped[f"{name}.{target}"] = wrapper
    if not wrapped:
        raise ValueError("found no attention projections to train a LoRA on")
    return wrapped


def kohya_state_dict(model: nn.Module, original: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every ``LoRALinear`` of ``model`` in kohya's layout; ``original``: diffusers -> original-layout module
    paths (``checkpoints.lora.original_unet_names``), for SDXL."""
    state = {}
    for path, lora in model.named_modules():
        if not isinstance(lora, LoRALinear):
            continue
        theirs = _rename(path + ".weight", UNET_RULES)[: -len(".weight")]
        name = "lora_unet_" + (original or {}).get(theirs, theirs).replace(".", "_")
        state[f"{name}.lora_down.weight"] = lora.down.weight.detach().float().cpu()
        state[f"{name}.lora_up.weight"] = lora.up.weight.detach().float().cpu()
        state[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    return state


class LoRATask(UNetTask):
    use_ema = False

    def __init__(self, config: TrainConfig, dist: Distributed):
        super().__init__(config, dist)
        self.original_names = original_unet_names(self.sd)  # SDXL's kohya names (before the wrappers go in)
        self.wrapped = inject_lora(self.model, config.lora_rank, config.lora_alpha)
        self.model.enable_gradient_checkpointing(config.gradient_checkpointing)

    def export(self, model, output: Path) -> list[Path]:
        path = output / "lora.safetensors"
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.config.lora_rank),
                    "ss_network_alpha": str(self.config.lora_alpha), "ss_base_model": self.config.model}
        if self.sd.config.family == "sdxl":
            metadata["ss_base_model_version"] = "sdxl_base_v1-0"  # as kohya's sdxl_train_network.py writes
        save_safetensors(kohya_state_dict(model, self.original_names), path, metadata=metadata)
        return [path]

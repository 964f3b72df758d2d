"""The registry of generation features. Adding one: a module here with a ``Feature`` subclass, one line
below, and its tests. The order is the order of the run's wrappers, hooks and infotext keys."""

from __future__ import annotations

from .base import A1111Fields, Feature, Run
from .clip_guidance import CLIP_GUIDANCE
from .control import CONTROL
from .flow import FLOW
from .hires import HIRES
from .img2img import IMG2IMG
from .inpaint import INPAINT
from .ip_adapter import IP_ADAPTER
from .lora import LORA
from .prompt_editing import PROMPT_EDITING
from .refiner import REFINER
from .sdxl import SDXL
from .step_cost import DEEP_CACHE, TOKEN_MERGING
from .styles import STYLES
from .tiling import TILING
from .variation import VARIATION

FEATURES: tuple[Feature, ...] = (STYLES, IMG2IMG, INPAINT, VARIATION, REFINER, HIRES, LORA, CONTROL, IP_ADAPTER,
                                  PROMPT_EDITING, CLIP_GUIDANCE, TILING, DEEP_CACHE, TOKEN_MERGING, SDXL, FLOW)

_OWNER: dict[str, Feature] = {}
for _feature in FEATURES:
    for _name in _feature.flat_names():
        if _name in _OWNER:
            raise RuntimeError(f"features {_OWNER[_name].name} and {_feature.name} both claim the keyword {_name!r}")
        _OWNER[_name] = _feature


def owner_of(name: str) -> Feature:
    """The feature whose options hold the flat keyword ``name``."""
    try:
        return _OWNER[name]
    except KeyError:
        raise ValueError(f"unknown generation option {name!r}; the options are the core fields (prompt, steps, "
                         f"seed …) and: {', '.join(sorted(_OWNER))}") from None


__all__ = ["FEATURES", "Feature", "Run", "A1111Fields", "owner_of"]

"""torchsd: Stable Diffusion written from scratch on PyTorch."""

from .config import CLIPTextConfig, CLIPVisionConfig, ModelConfig, PredictionType, ScheduleConfig, UNetConfig, VAEConfig
from .pipeline import GenerationRequest, GenerationResult, StableDiffusion
from .pipeline.features.control import ControlUnit
from .runtime import load_pipeline

__version__ = "0.1.0"
__all__ = ["load_pipeline", "StableDiffusion", "GenerationRequest", "GenerationResult", "ControlUnit", "ModelConfig",
           "UNetConfig", "VAEConfig", "CLIPTextConfig", "CLIPVisionConfig", "ScheduleConfig", "PredictionType"]

"""The pipeline: a request, a plan, the numbered steps of a run (``run.py``), and the feature modules
(``features/``) that each add one capability to every interface."""

from .model import StableDiffusion
from .request import GenerationRequest, GenerationResult

__all__ = ["StableDiffusion", "GenerationRequest", "GenerationResult"]

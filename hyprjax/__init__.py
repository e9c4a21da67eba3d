"""hyprjax: a pure-JAX LLM runtime for Qwen-family models."""

from .adapters.registry import LoraRequest
from .config import PRESETS, ModelConfig, RopeScaling
from .errors import HyprjaxError
from .generate import Completion
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "LoraRequest", "Completion", "ModelConfig", "RopeScaling", "PRESETS", "HyprjaxError"]
__version__ = "0.1.0"

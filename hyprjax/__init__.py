"""hyprjax: a pure-JAX LLM runtime for Qwen-family models."""

from . import xla_flags

xla_flags.apply()  # before anything creates JAX's CPU backend (xla_flags.py says why)

from .adapters.registry import LoraRequest
from .config import PRESETS, ModelConfig, RopeScaling
from .errors import HyprjaxError
from .generate import Completion
from .llm import LLM
from .sampling import SamplingParams
from .training import train

__all__ = ["LLM", "SamplingParams", "LoraRequest", "Completion", "ModelConfig", "RopeScaling", "PRESETS", "HyprjaxError",
           "train"]
__version__ = "0.1.0"

"""af2-jax: Audio Flamingo 2 in JAX/Flax NNX."""

from af2_jax import audio, config
from af2_jax.checkpoint.native import load, save
from af2_jax.generate import generate
from af2_jax.nn.af2 import relayout
from af2_jax.pipeline import answer
from af2_jax.config import AF2Config, preset
from af2_jax.engine import Engine, EngineFull, Request, Sampling
from af2_jax.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["AF2Config", "Engine", "EngineFull", "Request", "Sampling", "answer", "audio", "config", "generate", "load",
           "load_tokenizer", "preset", "relayout", "save"]

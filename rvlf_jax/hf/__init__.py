"""HuggingFace interop: one small key table per family, shared conversion and I/O."""

from rvlf_jax.hf.api import load_hf, save_hf
from rvlf_jax.hf.convert import ConversionError

__all__ = ['load_hf', 'save_hf', 'ConversionError']

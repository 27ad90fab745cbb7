"""kvjax: transformers whose key/value cache is small, in JAX/Flax.

Importing kvjax has no side effects: no mesh, no flags, no downloads.
"""

from kvjax import decode
from kvjax.checks import load_config
from kvjax.config import Config
from kvjax.errors import ConfigError
from kvjax.models import build_model

__all__ = ["Config", "ConfigError", "build_model", "decode", "load_config"]
__version__ = "0.1.0"

"""kvjax: transformers whose key/value cache is small, in JAX/Flax.

Importing kvjax has no side effects: no mesh, no flags, no downloads.

Shape suffixes name the axes of arrays (`q_BxTxHxD`); adjacent letters multiply (`BK` = B * K),
a digit after a letter adds (`T1` = T + 1) and `1` alone is an axis of size one:
  A  attention-gate heads               N  rows of a flat buffer whose heads own row ranges
  B  batch (sequences)                  O  output features of a checkpoint matrix
  C  positions in one block             P  splits of a sequence (kernels)
  D  head dimension                     Q  query rows of one kernel program
  E  model width                        R  prefix vectors (Block Transformer)
  F  feed-forward width, features       S  key positions, cache slots
  G  query heads per K/V head           T  positions of a sequence (the chunk's tokens)
  H  query heads                        U  lengths a MoA plan is profiled at
  I  input features of a checkpoint     V  vocabulary
  J  blocks a MoA query block reads     W  width of a kernel's K/V row (K * D, or D)
  K  K/V heads                          X  head tiles of a kernel (programs per sequence)
  L  layers                             Y  K/V heads in one tile
  M  blocks (of a sequence, or a head's block table)   Z  rules of a MoA plan search
"""

from kvjax import decode
from kvjax.checks import load_config
from kvjax.config import Config
from kvjax.errors import ConfigError
from kvjax.models import build_model

__all__ = ["Config", "ConfigError", "build_model", "decode", "load_config"]
__version__ = "0.1.0"

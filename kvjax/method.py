"""What a KV-cache method declares to the library: one `Method` per method, listed in
`kvjax.registry`, which is the only place that combines them.

A method is its own module(s) and one registry entry. The entry names its config section, says
when it is on, what it can be combined with (capabilities), how it checks a config beyond its own
section, its tag in decode.py's report, the parameters it adds to a base model, and the pieces it
plugs into the model and the cache: the layouts of its cache, its layouts for whole sequences
(training, scoring), a K/V filter for the attention layer, and how cache entries are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvjax.config import ModelConfig

if TYPE_CHECKING:  # types only: the layouts are built by the methods' own modules
  import flax.linen as nn

  from kvjax.cache.storage import Storage
  from kvjax.layers.cache import Layout

# Roles: at most one active method per role (two ways of choosing the kept tokens do not stack).
TOKENS = "which tokens the cache keeps"
LAYERS = "which layers store K/V"
ENTRIES = "how each K/V entry is stored"


def _nothing(cfg: ModelConfig) -> None:  # noqa: ARG001
  """No check beyond the method's own config section."""


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  section: str  # its section of ModelConfig, e.g. "moa" (`model.moa.*`)
  key: str  # the config key that turns it on, as named in error messages
  role: str  # TOKENS, LAYERS or ENTRIES
  active: Callable[[ModelConfig], bool]
  tag: Callable[[ModelConfig], str]  # its part of decode.py's method tag
  models: tuple[str, ...] = ("llama",)  # the `model.kind`s it works with ...
  models_why: str = ""  # ... and why not the others
  scan: bool = False  # works with `model.scan_layers` ...
  scan_why: str = ""  # ... or why not
  shards_kv_heads: bool = True  # its cache splits over K/V heads on a mesh (else batch only)
  check: Callable[[ModelConfig], None] = _nothing  # e.g. reads and checks a file it names
  # cfg -> why a whole-sequence forward (or a prefill's logits) does not show what its cache
  # keeps; "" when it does. Scoring such a method needs decoding.
  sequence_why: Callable[[ModelConfig], str] = lambda cfg: ""
  param_scope: tuple[str, ...] = ()  # e.g. ("attn", "filter"): parameters it adds to a layer
  # (cfg, batch, max_len, impl, storage) -> one cache layout per K/V-producing layer.
  layouts: Callable[[ModelConfig, int, int, str, Storage], tuple[Layout, ...]] | None = None
  # cfg -> one whole-sequence layout per layer (training and scoring).
  sequence_layouts: Callable[[ModelConfig], tuple[Layout, ...]] | None = None
  # cfg -> the factory of the attention layer's K/V filter submodule.
  kv_filter: Callable[[ModelConfig], Callable[..., nn.Module]] | None = None
  # cfg -> how every layout stores an entry (a method of the ENTRIES role).
  storage: Callable[[ModelConfig], Storage] | None = None
  # cfg -> what its cache hands the decode kernels at each step: a layout of
  # `kvjax.pallas_kernels.eligibility` and the rows per block-table entry (None: the kernel's).
  kernel: Callable[[ModelConfig], tuple[str, int | None]] | None = None

"""Attention-Gate (arXiv 2410.12876): learned in-context K/V eviction. The gate (`layer`) is the
attention layer's K/V filter; its flags are applied by the full-sequence layout in training and
by the compacted cache (`kvjax.cache.compact`) at inference."""

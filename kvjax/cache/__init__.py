"""Cache layouts every method builds on (`kvjax.layers.cache` is the protocol they implement):
dense buffers (`dense`), one flat buffer shared by per-head row ranges (`flat`), compacted
survivors of eviction (`compact`), and full-sequence layouts for training and scoring
(`sequence`). Method-specific layouts live with their method (`kvjax.moa.layout`, ...).

This package's `__init__` imports nothing, so each module imports only what it uses.
"""

"""Pure-functional Flax Linen layers: norms, RoPE, SwiGLU, projections, attention, and the cache
protocol (`kvjax.layers.cache`) through which attention meets any method's K/V layout.

Nothing here knows a KV-cache method: methods plug in through the protocol and the registry.
"""

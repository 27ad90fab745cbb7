"""Quantized K/V cache entries: codes and scales through the cache's `Storage` protocol."""

from kvjax.quant.storage import Quantized, QuantStorage, dequantize, quantize

__all__ = ["Quantized", "QuantStorage", "dequantize", "quantize"]

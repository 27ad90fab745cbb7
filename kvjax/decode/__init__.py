"""Decoding: caches (`init_cache`, built by the model kind from its methods' layouts), the one
prefill path, the jitted generate loop, samplers and the throughput harness."""

from kvjax.decode.generate import GenerateOutput, decode_loop, decode_step, generate
from kvjax.decode.prefill import DecodeState, prefill, prefill_cache, start_decoding
from kvjax.decode.sampling import SamplingConfig, sample
from kvjax.layers.cache import Cache, KVCache, Layout
from kvjax.models import init_cache

__all__ = ["Cache", "DecodeState", "GenerateOutput", "KVCache", "Layout", "SamplingConfig",
           "decode_loop", "decode_step", "generate", "init_cache", "prefill", "prefill_cache",
           "sample", "start_decoding"]

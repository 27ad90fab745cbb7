"""Cache pytrees, prefill, the jitted generate loop and samplers."""

from kvjax.decode.cache import KVCache, init_cache
from kvjax.decode.generate import GenerateOutput, decode_loop, decode_step, generate, prefill
from kvjax.decode.sampling import SamplingConfig, sample

__all__ = ["GenerateOutput", "KVCache", "SamplingConfig", "decode_loop", "decode_step",
           "generate", "init_cache", "prefill", "sample"]

"""Pallas decode kernels (GPU Triton, TPU Mosaic), each with a jnp reference beside it."""

from kvjax.pallas_kernels.block_sparse_decode import block_sparse_decode, range_tables
from kvjax.pallas_kernels.block_sparse_decode_ref import block_sparse_decode_ref
from kvjax.pallas_kernels.shared_kv_decode import shared_kv_decode
from kvjax.pallas_kernels.shared_kv_decode_ref import shared_kv_decode_ref

__all__ = ["block_sparse_decode", "block_sparse_decode_ref", "range_tables", "shared_kv_decode",
           "shared_kv_decode_ref"]

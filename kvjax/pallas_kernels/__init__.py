"""Pallas decode kernels (GPU Triton, TPU Mosaic), each with a jnp reference beside it, and the
one function that says where they apply."""

from kvjax.pallas_kernels.block_sparse_decode import block_sparse_decode, range_tables
from kvjax.pallas_kernels.block_sparse_decode_ref import block_sparse_decode_ref
from kvjax.pallas_kernels.eligibility import LAYOUTS, Eligibility, eligibility
from kvjax.pallas_kernels.shared_kv_decode import shared_kv_decode
from kvjax.pallas_kernels.shared_kv_decode_ref import shared_kv_decode_ref

__all__ = ["LAYOUTS", "Eligibility", "block_sparse_decode", "block_sparse_decode_ref",
           "eligibility", "range_tables", "shared_kv_decode", "shared_kv_decode_ref"]

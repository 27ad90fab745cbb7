"""MoA (arXiv 2406.14909): heterogeneous elastic sparse attention for a pretrained model.

Plans (`plan`), the masks they stand for (`masks`), block-sparse prefill (`prefill`), the decode
cache (`kvjax.decode.moa_cache`), attention-influence profiling (`profile`, `calibration`), the
plan search (`search`, `pipeline`) and a CLI: `python -m kvjax.moa`. A model runs a plan with
`model.moa_plan: PATH`.
"""

from kvjax.moa.plan import Plan, load_plan, uniform_plan

__all__ = ["Plan", "load_plan", "uniform_plan"]

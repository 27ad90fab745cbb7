"""MoA (arXiv 2406.14909): heterogeneous elastic sparse attention for a pretrained model.

Plans (`plan`), the masks they stand for (`masks`), block-sparse prefill (`prefill`), the
layouts (`layout`: windows over a whole sequence, and the ring-buffer decode cache), the registry
entry (`method`), attention-influence profiling (`profile`, `calibration`), the plan search
(`search`, `pipeline`) and a CLI: `python -m kvjax.moa`. A model runs a plan with
`model.moa.plan: PATH`.
"""

from kvjax.moa.plan import Plan, load_plan, uniform_plan

__all__ = ["Plan", "load_plan", "uniform_plan"]

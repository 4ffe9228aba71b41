"""Engine-free Attention Matching maths: key selection, β by bounded NNLS, values by ridge least squares,
budgets, eviction baselines and a reference model forward. Pure torch; must never import vllm.

Entry point: :func:`compact` (method names in :data:`METHODS`), budgets: :func:`budget`.
"""

from . import h2o, highest_attention, omp, random_subset, snapkv, streaming, tova, truncate  # noqa: F401  (register)
from .base import REGISTRY, CompactionInputs, CompactionResult, Method, compact
from .budgets import budget, global_head_budgets, head_budgets, load_head_shares, save_head_shares
from .chunked import compact_chunked
from .fit import FitConfig
from .nonuniform import PAD_BETA, compact_per_head, head_scores
from .on_policy import compact_model_on_policy
from .queries import group_queries

METHODS = ("highest_attention", "omp", "snapkv", "h2o", "tova", "streaming", "truncate", "random")
BASELINES = ("snapkv", "h2o", "tova", "streaming", "truncate", "random")
AM_METHODS = ("highest_attention", "omp")
DEFAULT_METHOD = "highest_attention"

assert set(METHODS) == set(REGISTRY), (METHODS, tuple(REGISTRY))

__all__ = [
    "AM_METHODS", "BASELINES", "DEFAULT_METHOD", "METHODS", "REGISTRY", "CompactionInputs", "CompactionResult",
    "FitConfig", "Method", "budget", "compact", "compact_chunked", "compact_model_on_policy", "global_head_budgets", "group_queries",
    "head_budgets", "head_scores", "load_head_shares", "save_head_shares", "compact_per_head", "PAD_BETA",
]

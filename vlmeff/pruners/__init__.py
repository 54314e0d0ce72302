"""Model-agnostic token reduction: scorers (token importance), selectors (how many, which) and reducers (drop or
merge). Pure tensor functions; shapes are in the docstrings."""
from .reduce import contextual_merge, drop_tokens, gather_rows, merge_into_kept, reduce_by_assignment
from .scores import cls_attention, random_scores, received_attention
from .select import resolve_keep, topk_keep_indices
from .pool import pool_assignment, pool_views
from .tome import bipartite_soft_matching

__all__ = [
    "bipartite_soft_matching", "cls_attention", "contextual_merge", "drop_tokens", "gather_rows", "merge_into_kept",
    "pool_assignment", "pool_views", "random_scores", "received_attention", "reduce_by_assignment", "resolve_keep", "topk_keep_indices",
]

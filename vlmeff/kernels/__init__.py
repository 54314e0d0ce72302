"""Gather-and-merge of retained tokens (`gather_merge`: the merges by assignment end in it; see `pruners.reduce`).

`segments.py` builds and checks the segment format, `dispatch.py` picks the implementation (the custom op),
`triton_gather_merge.py` is the fused kernel, `triton_tome_merge.py` ToMe's fused merge (`tome_merge`),
`triton_nearest_kept.py` the fused assignment of tokens to their most similar kept token (`nearest_kept`),
`reference.py` the PyTorch references and test oracles, `compile_check.py` AOT-compiles every kernel variant,
`attention_rows.py` scores [CLS] / query rows.
"""
from .dispatch import BACKEND_CALLS, KernelFallbackWarning, gather_merge, nearest_kept, tome_merge
from .reference import gather_merge_reference
from .segments import segments_from_assignment, validate_segments

__all__ = ["BACKEND_CALLS", "KernelFallbackWarning", "gather_merge", "gather_merge_reference",
           "nearest_kept", "segments_from_assignment", "tome_merge", "validate_segments"]

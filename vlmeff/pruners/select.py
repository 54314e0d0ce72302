"""Selectors: turn a budget and scores into the indices of the tokens to keep."""
import numbers



def check_keep(keep):
    """Validate a budget's type and range without knowing the token count (see `resolve_keep`)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int token count >= 1 or a float ratio in (0, 1], got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep={keep}: a token count must be >= 1 (or pass a float ratio in (0, 1])")
    elif not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep}: a ratio must lie in (0, 1] (or pass an int token count >= 1)")


def resolve_keep(keep, n):
    """Number of tokens to keep out of `n`: an int is a count (1 <= keep <= n), a float a ratio in (0, 1]."""
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if keep > n:
            raise ValueError(f"keep={keep} exceeds the {n} visual tokens per image; use a count <= {n} or a ratio")
        return int(keep)
    return max(1, min(n, round(keep * n)))


def topk_keep_indices(scores, k):
    """Indices [B, k] of the k highest scores [B, N], sorted ascending so kept tokens keep their original order."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values

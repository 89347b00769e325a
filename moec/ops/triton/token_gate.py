"""Launch gates by token count: a grid multiplied by 0 or 1, decided from the (maybe symbolic) T.

A compiled step has one graph for every T (decode and prefill). A kernel that only some token
counts need has its grid multiplied by a gate: 1 inside its range, else 0. With a concrete T the
gate is a plain int; with a symbolic one (export, AOTInductor) an integer expression of T —
floor divisions and min/max, no branch and so no guard — and a launch whose grid comes to 0
does not happen (AOTInductor's C++ launcher returns on a zero grid, as Triton's does; inside a
CUDA graph it is no node at all).
"""

from __future__ import annotations

import torch


def token_range_gate(num_tokens, lo: int, hi: int | None):
    """1 if lo < T <= hi (hi None: no upper bound) else 0: an int for a concrete T, an integer
    expression of T (no guard) for a symbolic one."""
    if isinstance(num_tokens, int):
        return int(lo < num_tokens and (hi is None or num_tokens <= hi))
    gate = 1
    if lo > 0:
        gate = torch.sym_min(num_tokens // (lo + 1), 1)
    if hi is not None:
        gate = gate * torch.sym_max(1 - num_tokens // (hi + 1), 0)
    return gate


def never(gate) -> bool:
    """A gate known to be 0 here (a concrete token count outside the range): nothing to launch."""
    return isinstance(gate, int) and gate == 0

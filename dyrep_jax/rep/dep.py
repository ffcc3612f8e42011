"""Branch importance and the Dep rule (which branches of a block to cut), as the reference.

Importance of a branch = mean |gamma| of its last BN / mean |gamma| of kxk's BN (kxk: 1).
Dep: the valid values are the present non-kxk importances that are not exactly 1. With at
least two of them and an *unbiased* std (n - 1) above `std_threshold`, cut every non-kxk
branch whose importance is below the valid mean *and* below `abs_threshold`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dyrep_jax.rep.branches import LAST_BN

__all__ = ["LAST_BN", "branch_importance", "dep_decision"]


def mean_abs(gamma) -> float:
    return float(np.mean(np.abs(np.asarray(gamma, np.float64))))


def branch_importance(params) -> dict[str, float]:
    """{branch: importance} for every branch of a block; kxk is 1 by definition."""
    ref = max(mean_abs(params["kxk"][LAST_BN["kxk"]]["scale"]), 1e-12)
    out = {"kxk": 1.0}
    for branch, bp in params.items():
        if branch != "kxk":
            out[branch] = mean_abs(bp[LAST_BN[branch]]["scale"]) / ref
    return out


def dep_decision(importances: Mapping[str, float], std_threshold: float = 0.02,
                 abs_threshold: float = 0.1) -> list[str]:
    """Names of the branches to cut; `importances` names the present branches (kxk never cut)."""
    others = {b: float(v) for b, v in importances.items() if b != "kxk"}
    valid = np.array([v for v in others.values() if v != 1.0], np.float64)
    if valid.size < 2 or not valid.std(ddof=1) > std_threshold:
        return []
    mean = valid.mean()
    return [b for b, v in others.items() if v < mean and v < abs_threshold]

"""Branch importance and the Dep rule (which branches of a block to cut).

Importance of a branch = mean |gamma| of its last BN / mean |gamma| of kxk's BN.
Dep: if the std of the non-kxk importances exceeds `std_threshold`, cut the
branches whose importance is below their mean *and* below `abs_threshold`.
"""

from __future__ import annotations

import numpy as np

LAST_BN = {"kxk": "bn", "1x1": "bn", "1x1_kxk": "bn2", "1x1_avg": "avgbn", "1xk": "bn",
           "kx1": "bn", "id": "bn"}


def branch_importance(params) -> dict[str, float]:
    """{branch: importance} for every non-kxk branch of a block."""
    ref = float(np.mean(np.abs(np.asarray(params["kxk"]["bn"]["scale"]))))
    ref = max(ref, 1e-12)
    out = {}
    for branch, bp in params.items():
        if branch == "kxk":
            continue
        gamma = np.asarray(bp[LAST_BN[branch]]["scale"])
        out[branch] = float(np.mean(np.abs(gamma))) / ref
    return out


def dep_decision(importance: dict[str, float], std_threshold: float = 0.02,
                 abs_threshold: float = 0.1) -> tuple[str, ...]:
    """Branches to cut under the Dep rule (population std over non-kxk branches)."""
    if len(importance) < 2:
        return ()
    values = np.array(list(importance.values()), dtype=np.float64)
    if values.std() <= std_threshold:
        return ()
    mean = values.mean()
    return tuple(b for b, v in importance.items() if v < mean and v < abs_threshold)

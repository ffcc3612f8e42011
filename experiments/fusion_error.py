"""Largest fusion error per branch kind: block (branch by branch, inference mode) vs its fused conv.

For every branch kind x groups {1, 2, depthwise} x stride {1, 2} x kernel {3, 5, 7}, a
block kxk + that branch with random weights, BN parameters and running statistics is
compared with `fuse_slot`'s conv on random inputs (float32). Prints one JSON line per
branch kind with the max absolute and relative (to max |y|) error.

  python experiments/fusion_error.py
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from rep_helpers import randomize_bn_params, randomize_stats  # noqa: E402

from dyrep_jax.rep import BRANCH_NAMES, ConvGeometry, fuse_slot, grow_slot  # noqa: E402
from dyrep_jax.rep.apply import apply_slot, apply_slot_branchwise  # noqa: E402
from dyrep_jax.rep.geometry import branch_refusal  # noqa: E402


def main():
    worst = {b: {"abs": 0.0, "rel": 0.0, "cases": 0} for b in BRANCH_NAMES}
    for branch, groups, stride, k in itertools.product(BRANCH_NAMES, (1, 2, "dw"), (1, 2),
                                                       (3, 5, 7)):
        c = 8
        g = c if groups == "dw" else groups
        geom = ConvGeometry(c, c, k, stride, None, g)
        if branch_refusal(geom, branch):
            continue
        key = jax.random.PRNGKey(len(worst) * 100 + k * 10 + stride)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        plain = {"kernel": jax.random.normal(k1, (k, k, c // g, c)) * 0.3,
                 "bias": jnp.zeros((c,))}
        params, stats = grow_slot(k1, plain, geom, [branch])
        params, stats = randomize_bn_params(k2, params), randomize_stats(k3, stats)
        x = jax.random.normal(k4, (4, 15, 15, c))
        y, _ = apply_slot_branchwise(params, stats, x, geom, train=False)  # branch by branch
        y_fused, _ = apply_slot(fuse_slot(params, stats), {}, x, geom, train=False)
        err = float(jnp.max(jnp.abs(y - y_fused)))
        w = worst[branch]
        w["abs"] = max(w["abs"], err)
        w["rel"] = max(w["rel"], err / float(jnp.max(jnp.abs(y))))
        w["cases"] += 1
    for branch, w in worst.items():
        print(json.dumps({"branch": branch, "max_abs_err": w["abs"], "max_rel_err": w["rel"],
                          "cases": w["cases"], "dtype": "float32"}))


if __name__ == "__main__":
    main()

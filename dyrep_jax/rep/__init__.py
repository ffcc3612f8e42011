"""Re-parameterization algebra: conv slots as pytrees; apply, fuse, grow, cut.

Pure functions only; no training code. See README "Python API". What each branch kind
is (init, forward, fusion, MACs, torch name) is one record in `branches.KINDS`.
"""

from dyrep_jax.rep.apply import apply_slot, apply_slot_branchwise, inner_slot_input
from dyrep_jax.rep.bn import EPS, MOMENTUM, batch_norm
from dyrep_jax.rep.branches import KINDS, LAST_BN, NESTABLE, BranchKind
from dyrep_jax.rep.cut import cut_branches
from dyrep_jax.rep.dep import branch_importance, dep_decision
from dyrep_jax.rep.fuse import fold_bn, fuse_slot
from dyrep_jax.rep.geometry import (
    BRANCH_NAMES,
    MAX_NESTING,
    ConvGeometry,
    RepError,
    allowed_branches,
    check_branches,
    child_geometry,
)
from dyrep_jax.rep.grow import grow_slot, rebalance_kxk, regrow_matching
from dyrep_jax.rep.module import BatchNorm, RepConv, forward_options
from dyrep_jax.rep.ops import is_block
from dyrep_jax.rep.tree import all_slots, get_at, set_at, structure_of, top_level_slots

__all__ = [
    "BRANCH_NAMES", "EPS", "KINDS", "LAST_BN", "MAX_NESTING", "MOMENTUM", "NESTABLE",
    "BatchNorm", "BranchKind", "ConvGeometry", "RepConv", "RepError", "all_slots",
    "allowed_branches", "apply_slot", "apply_slot_branchwise", "batch_norm",
    "branch_importance", "check_branches", "child_geometry", "cut_branches", "dep_decision",
    "fold_bn", "forward_options", "fuse_slot", "get_at", "grow_slot", "inner_slot_input",
    "is_block", "rebalance_kxk", "regrow_matching", "set_at", "structure_of", "top_level_slots",
]

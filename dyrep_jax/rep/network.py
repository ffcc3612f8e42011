"""Grow and cut at a path inside a whole network's (params, batch_stats).

Adds the two rules that need the network context: the nesting limit (a slot
inside two blocks may not grow) and the geometry of nested slots, derived from
their top-level slot's geometry.
"""

from __future__ import annotations

from dyrep_jax.rep.branches import NESTABLE
from dyrep_jax.rep.cut import cut_branches
from dyrep_jax.rep.geometry import MAX_NESTING, ConvGeometry, RepError, child_geometry
from dyrep_jax.rep.grow import grow_slot
from dyrep_jax.rep.tree import dotted, get_at, is_block_node, is_slot, set_at, top_level_slots


def split_slot_path(params, path) -> tuple[tuple, list[str]]:
    """(top-level slot path, [branch names walked into]) for any slot path."""
    path = tuple(path)
    for top in top_level_slots(params):
        if path[: len(top)] == top:
            rest = path[len(top):]
            if len(rest) % 2:
                break
            branches = list(rest[0::2])
            node = get_at(params, top)
            for branch, conv in zip(branches, rest[1::2], strict=True):
                if not is_block_node(node) or branch not in node or NESTABLE.get(branch) != conv:
                    raise RepError(f"{dotted(path)}: no slot at this path")
                node = node[branch][conv]
            return top, branches
    raise RepError(f"{dotted(path)}: not a slot path of this network")


def slot_depth(params, path) -> int:
    """Number of blocks enclosing the slot at `path`."""
    return len(split_slot_path(params, path)[1])


def geometry_at(params, path, top_geometries: dict) -> ConvGeometry:
    """Geometry of any (possibly nested) slot, from its top-level slot's geometry."""
    top, branches = split_slot_path(params, path)
    geom = top_geometries[top]
    geom = getattr(geom, "geometry", geom)
    for branch in branches:
        geom = child_geometry(geom, branch)
    return geom


def grow_at(key, params, stats, path, geom: ConvGeometry, branches):
    """Grow the plain slot at `path`; returns new (params, stats). Function preserved."""
    path = tuple(path)
    slot = get_at(params, path)
    if not is_slot(slot):
        raise RepError(f"{dotted(path)}: no slot at this path")
    depth = slot_depth(params, path)
    if depth >= MAX_NESTING:
        raise RepError(
            f"{dotted(path)}: cannot grow a slot nested {depth} blocks deep "
            f"(nesting depth is at most {MAX_NESTING})"
        )
    block_p, block_s = grow_slot(key, slot, geom, branches, path=dotted(path))
    return set_at(params, path, block_p), set_at(stats, path, block_s)


def cut_at(params, stats, path, names):
    """Cut `names` from the block at `path`; returns new (params, stats). Function preserved."""
    path = tuple(path)
    slot_p = get_at(params, path)
    slot_s = get_at(stats, path, {})
    new_p, new_s = cut_branches(slot_p, slot_s, names, path=dotted(path))
    return set_at(params, path, new_p), set_at(stats, path, new_s)

"""Finding and replacing slots inside a whole network's variables.

A slot is recognised by its shape in the params tree: a dict with a 4-d
`kernel` (plain) or with a `kxk` entry (block). Paths are tuples of keys from
the root of `params`; the slot's batch_stats live at the same path in the
`batch_stats` tree (absent for a plain slot). Nested slots sit at
`path + ('kxk', 'conv')` and `path + ('1x1_kxk', 'conv2')`.
"""

from __future__ import annotations

from collections.abc import Mapping

from dyrep_jax.rep.branches import NESTABLE

Path = tuple


def is_slot(node) -> bool:
    if not isinstance(node, Mapping):
        return False
    if "kxk" in node:
        return True
    kernel = node.get("kernel")
    return kernel is not None and getattr(kernel, "ndim", 0) == 4


def is_block_node(node) -> bool:
    return isinstance(node, Mapping) and "kxk" in node


def top_level_slots(params, prefix: Path = ()) -> list[Path]:
    """Paths of the outermost slots (the model's RepConv modules), in tree order."""
    out = []
    for key, node in params.items():
        path = (*prefix, key)
        if is_slot(node):
            out.append(path)
        elif isinstance(node, Mapping):
            out.extend(top_level_slots(node, path))
    return out


def nested_slots(slot, path: Path, depth: int = 0) -> list[tuple[Path, int]]:
    """(path, depth) of `slot` and every slot nested in it; depth = enclosing blocks."""
    out = [(path, depth)]
    if is_block_node(slot):
        for branch, conv_key in NESTABLE.items():
            if branch in slot:
                out.extend(nested_slots(slot[branch][conv_key], (*path, branch, conv_key),
                                        depth + 1))
    return out


def all_slots(params) -> list[tuple[Path, int]]:
    """Every slot in the network, outer before inner, with its nesting depth."""
    out = []
    for path in top_level_slots(params):
        out.extend(nested_slots(get_at(params, path), path))
    return out


def get_at(tree, path: Path, default=None):
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def set_at(tree, path: Path, value):
    """A copy of `tree` with `path` set to `value`; an empty dict value removes the key."""
    if not path:
        return value
    tree = dict(tree) if isinstance(tree, Mapping) else {}
    key = path[0]
    if len(path) == 1:
        if isinstance(value, Mapping) and not value:
            tree.pop(key, None)
        else:
            tree[key] = value
        return tree
    child = set_at(tree.get(key, {}), path[1:], value)
    if isinstance(child, Mapping) and not child:
        tree.pop(key, None)
    else:
        tree[key] = child
    return tree


def dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def slot_branches(slot) -> tuple[str, ...]:
    return tuple(slot) if is_block_node(slot) else ()


def structure_of(params) -> dict[str, list[str]]:
    """{dotted slot path: branch names} for every block in the network (plain slots omitted)."""
    return {
        dotted(path): list(slot_branches(get_at(params, path)))
        for path, _ in all_slots(params)
        if is_block_node(get_at(params, path))
    }


def to_plain_dict(tree):
    """FrozenDict/Mapping trees -> nested plain dicts (structural ops work on dicts)."""
    if isinstance(tree, Mapping):
        return {k: to_plain_dict(v) for k, v in tree.items()}
    return tree

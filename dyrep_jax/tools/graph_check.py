"""Cross-check of a DyRep file's `dbb_graph` against the blocks found in its weights.

The weights decide the structure (they are what gets imported); the graph is
the reference trainer's own record of it. When both exist and disagree the
file is inconsistent and we refuse it rather than guess which one is right.
"""

from __future__ import annotations

from dyrep_jax.tools.errors import ToolError

KXK_ONLY = ("kxk",)


def graph_problems(blocks: dict, graph: dict) -> list[str]:
    """Disagreements between `blocks` (from tensors) and `graph` (from the file)."""
    problems = []
    for path, branches in graph.items():
        found = blocks.get(path)
        if found is None:
            # a block left with only kxk holds the same function as a plain conv: no conflict
            if tuple(branches) != KXK_ONLY:
                problems.append(f"{path}: dbb_graph lists branches {list(branches)} but the "
                                "weights hold a plain conv (or nothing) there")
        elif set(found) != set(branches):
            problems.append(f"{path}: dbb_graph lists branches {list(branches)} but the "
                            f"weights hold {list(found)}")
    for path, found in blocks.items():
        if path not in graph:
            problems.append(f"{path}: the weights hold a block {list(found)} that dbb_graph "
                            "does not list")
    return problems


def check_graph(blocks: dict, graph: dict | None) -> None:
    if graph is None:
        return
    problems = graph_problems(blocks, graph)
    if problems:
        raise ToolError("inconsistent file: its dyrep.dbb_graph and its weights disagree:\n  "
                        + "\n  ".join(problems))

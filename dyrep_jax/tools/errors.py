"""One error type for every tool, and the `main` wrapper that turns it into an exit code.

A tool failure is the user's input (a wrong path, a file that does not match
the model), so it is reported as one clear message, not a traceback.
"""

from __future__ import annotations

import os
import sys


class ToolError(RuntimeError):
    """A problem with the tool's input, reported to the user as it is."""


def run_main(body, argv) -> int:
    """Run `body(argv)`; print a ToolError on stderr and return 2, else return 0."""
    try:
        body(argv)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def name_list(names, limit: int = 40) -> str:
    """`a, b, c` for an error message, shortened past `limit` names."""
    names = list(names)
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return f"{shown}, ... and {more} more" if more > 0 else shown


def check_directory_arg(path: str, flag: str, file_hint: str = "") -> None:
    """Refuse a file passed where a network directory is expected, saying what is expected."""
    if os.path.isfile(path):
        hint = f"; {file_hint}" if file_hint else ""
        raise ToolError(f"{flag} {path} is a file; expected a directory: a training workdir, an "
                        f"imported run (import_torch --out) or a fused export (DIR/fused){hint}")

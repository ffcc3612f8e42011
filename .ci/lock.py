"""Write requirements-lock.txt: the exact installed versions of the project's requirements.

Walks the requirement files named on the command line (default: the dev and interop sets)
through their installed dependencies, so the lock holds what CI tested and nothing else on
the machine. Run after a green CI: `python .ci/lock.py > requirements-lock.txt`.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def top_level(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            reqs += top_level(path.parent / line[3:].strip())
        elif line:
            reqs.append(Requirement(line))
    return reqs


def closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of roots and everything they pull in."""
    seen: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = metadata.distribution(req.name)
        seen[name] = dist.version
        for dep in map(Requirement, dist.requires or []):
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append((dep, frozenset(dep.extras)))
    return seen


def main(files: list[str]) -> None:
    roots = [r for f in files for r in top_level(ROOT / f)]
    print("# Exact versions CI tested (python .ci/lock.py > requirements-lock.txt); "
          ".ci/run installs with -c this file.")
    for name, version in sorted(closure(roots).items()):
        # A local label (torch 2.13.0+cpu) is not on PyPI; `==2.13.0` still matches it.
        print(f"{name}=={re.sub(r'[+].*$', '', version)}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["requirements-dev.txt", "requirements-interop.txt"])

"""Compile overhead of the quickstart: `compile_s_total / wall_s`, cold and warm cache.

Runs `python -m dyrep_jax.main --config configs/quickstart.py` twice from the checkout
`--repo` (default: this one), each time in a new workdir, with XDG_CACHE_HOME pointed at
a fresh, empty folder: the first run starts with an empty persistent compilation cache
(cold), the second finds what the first stored (warm). Prints one JSON line per run with
the final metrics record's figures and the 1-minute load average before and after it
(the machine may be shared: say so next to the figures).

  python experiments/bench_compile.py                     # this checkout, cold then warm
  python experiments/bench_compile.py --repo /tmp/clone   # e.g. a fresh clone of main
  python experiments/bench_compile.py -- --config.compilation_cache_dir=   # extra flags
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def final_record(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    if not record.get("final"):
        raise SystemExit(f"no final record in {workdir}/metrics.jsonl: the run did not finish")
    return record


def run_once(repo: Path, workdir: Path, cache_home: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dyrep_jax.main", "--config", "configs/quickstart.py",
           "--workdir", str(workdir), *extra]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    r = final_record(workdir)
    return {"command": " ".join(["python", *cmd[1:]]), "compile_s_total": r["compile_s_total"],
            "wall_s": r["wall_s"], "ratio": r["compile_s_total"] / r["wall_s"],
            "compile_wait_s": r.get("compile_wait_s"),
            "compile_thread_s": r.get("compile_thread_s"), "test_top1": r["test_top1"],
            "fused_test_top1": r["fused_test_top1"], "process_s": seconds,
            "load1_before": load_before, "load1_after": os.getloadavg()[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--runs", default="cold,warm", help="labels of the runs, in order")
    p.add_argument("extra", nargs="*", help="extra flags for dyrep_jax.main (after --)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    cache_home = root / "cache"
    cache_home.mkdir()
    for label in args.runs.split(","):
        result = run_once(Path(args.repo), root / f"qs_{label}", cache_home, args.extra)
        print(json.dumps({"run": label, "repo": args.repo, **result}), flush=True)


if __name__ == "__main__":
    main()

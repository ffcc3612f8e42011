"""What a run writes for people: log lines, metrics.jsonl, structure.jsonl, TensorBoard, plots."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("dyrep_jax")


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class JsonlLog:
    """Append-only JSON lines; `truncate_after_epoch` drops records a resume will redo."""

    def __init__(self, path: str):
        self.path = path

    def append(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after_epoch(self, epoch: int):
        kept = [r for r in self.read() if not r.get("final") and r.get("epoch", 0) <= epoch]
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")


class TensorBoard:
    """Scalars to DIR/tb via tensorboardX when it is installed (a no-op otherwise)."""

    def __init__(self, directory: str, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX not installed: no TensorBoard scalars")
            return
        self.writer = SummaryWriter(directory)

    def scalars(self, step: int, values: dict):
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def describe_decision(d: dict) -> str:
    if d["op"] == "grow":
        what = f"grow {d['slot']} -> [{','.join(d['branches'])}]"
    else:
        what = f"cut {d['slot']} [{','.join(d['branches'])}] -> [{','.join(d['remaining'])}]"
    return f"{what} params {human(d['params'])} MACs {human(d['macs'])}"


def plot_structure(workdir: str) -> str | None:
    """DIR/structure.png: slots grown/cut over epochs (top) and accuracy curves (bottom)."""
    metrics = JsonlLog(os.path.join(workdir, "metrics.jsonl")).read()
    decisions = JsonlLog(os.path.join(workdir, "structure.jsonl")).read()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no structure.png")
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), height_ratios=[2, 1])
    slots = sorted({d["slot"] for d in decisions}, key=lambda s: (s.count("."), s))
    index = {s: i for i, s in enumerate(slots)}
    for d in decisions:
        y = index[d["slot"]]
        if d["op"] == "grow":
            ax1.scatter(d["epoch"], y, marker="^", color="tab:green", s=30 + 8 * len(d["branches"]))
        else:
            ax1.scatter(d["epoch"], y, marker="v", color="tab:red", s=30 + 15 * len(d["branches"]))
    ax1.set_yticks(range(len(slots)), slots, fontsize=6)
    ax1.set_xlabel("epoch")
    ax1.set_title("structure changes (green: grow, red: cut; size ~ branches)")
    epochs = [m for m in metrics if "epoch" in m and not m.get("final")]
    if epochs:
        ax2.plot([m["epoch"] for m in epochs], [m.get("train_top1", 0) for m in epochs],
                 label="train top-1")
        tests = [m for m in epochs if m.get("test_top1") is not None]
        ax2.plot([m["epoch"] for m in tests], [m["test_top1"] for m in tests], label="test top-1")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("accuracy")
        ax2.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "structure.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

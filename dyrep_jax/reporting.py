"""What a run writes for people: log lines, metrics.jsonl, structure.jsonl, TensorBoard, plots.

Every file goes through etils.epath, so a workdir on `gs://` works like a local one.
"""

from __future__ import annotations

import io
import json
import logging

from etils import epath

from dyrep_jax import paths

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

    def __init__(self, path):
        self.path = epath.Path(path)

    def append(self, record: dict):
        paths.append_line(self.path, json.dumps(record, sort_keys=False))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after_epoch(self, epoch: int):
        kept = [r for r in self.read() if not r.get("final") and r.get("epoch", 0) <= epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def remove(self):
        if self.path.exists():
            self.path.unlink()


class TensorBoard:
    """Scalars, text and hparams in DIR/tb via tensorboardX (a no-op without it, or when off).

    Events are buffered and written every `flush_secs` and on `flush()`/`close()`
    (the trainer flushes once per epoch): on `gs://` each write rewrites the file.
    """

    def __init__(self, directory, enabled: bool = True, flush_secs: int = 60):
        self.writer = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX not installed: no TensorBoard events")
            return
        if not paths.is_local(directory):
            paths.route_tensorboardx_through_epath()
        self.writer = SummaryWriter(str(directory), flush_secs=flush_secs, max_queue=1000)

    def scalars(self, step: int, values: dict):
        """Every int/float in `values` as a scalar at `step` (other values are skipped)."""
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, float(v), int(step))

    def text(self, tag: str, text: str, step: int):
        if self.writer is not None:
            self.writer.add_text(tag, text, int(step))

    def hparams(self, values: dict):
        """`values` (flat; str/int/float/bool) in the HParams tab, for this run's folder."""
        if self.writer is None:
            return
        from tensorboardX.summary import hparams

        for summary in hparams(values, {}):
            self.writer.file_writer.add_summary(summary)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def flat_hparams(config) -> dict:
    """A config as `{dotted.name: value}` with values TensorBoard's HParams tab takes."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                walk(value, f"{name}.")
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = str(value)

    walk(config, "")
    return out


def describe_decision(d: dict) -> str:
    if d["op"] == "grow":
        what = f"grow {d['slot']} -> [{','.join(d['branches'])}]"
    else:
        what = f"cut {d['slot']} [{','.join(d['branches'])}] -> [{','.join(d['remaining'])}]"
    return f"{what} params {human(d['params'])} MACs {human(d['macs'])}"


def plot_structure(workdir) -> str | None:
    """DIR/structure.png: slots grown/cut over epochs (top) and accuracy curves (bottom)."""
    workdir = epath.Path(workdir)
    metrics = JsonlLog(workdir / "metrics.jsonl").read()
    decisions = JsonlLog(workdir / "structure.jsonl").read()
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = workdir / "structure.png"
    path.write_bytes(buffer.getvalue())
    return str(path)


def parse_profile_steps(spec) -> tuple[int, int] | None:
    """`"A,B"` -> (A, B), the first and last global step to trace (step 1 is the first)."""
    if not spec:
        return None
    try:
        first, last = (int(v) for v in str(spec).split(","))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise ValueError(f"profile_steps must be 'A,B' with 1 <= A <= B (the first and last "
                         f"global step to trace, e.g. '10,12'), got {spec!r}")
    return first, last


class StepProfiler:
    """A `jax.profiler` trace of global steps A..B into DIR/profile/.

    For a cloud workdir the trace goes to a local temporary folder first and is
    copied through epath when it stops.
    """

    def __init__(self, spec, directory):
        self.steps = parse_profile_steps(spec)
        self.directory = epath.Path(directory)
        self.local = None

    def before(self, step: int):
        """Call before running global step `step` (1-based)."""
        if self.steps is None or self.local is not None:
            return
        first, last = self.steps
        if first <= step <= last:
            import tempfile

            import jax

            self.local = (str(self.directory) if paths.is_local(self.directory)
                          else tempfile.mkdtemp(prefix="dyrep_profile_"))
            jax.profiler.start_trace(self.local)
            log.info("profiling steps %d..%d into %s", step, last, self.directory)

    def after(self, step: int, result):
        """Call after global step `step` was dispatched; `result` is waited for before stopping."""
        if self.local is not None and step >= self.steps[1]:
            import jax

            jax.block_until_ready(result)
            self.stop()
            self.steps = None  # once per run

    def stop(self):
        if self.local is None:
            return
        import jax

        jax.profiler.stop_trace()
        local, self.local = epath.Path(self.local), None
        if local != self.directory:
            for f in local.rglob("*"):
                if f.is_file():
                    target = self.directory / f.relative_to(local)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(f.read_bytes())

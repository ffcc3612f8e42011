"""Results pages from the JSON lines of `experiments/device_check.py`, nothing typed by hand.

Fills the block between the device-results markers of `experiments/results/perf-h200.md`
(targets with their measured cells, then every measurement) and, when part 3 ran, writes
`experiments/results/cifar10_reduced_gpu.md`, linking the structure plots found beside
the lines.

  python experiments/render_device_results.py experiments/results/h200

Arguments are part*.jsonl files or folders holding them. When an item ran more than once
(a rerun with --only), the run that started last counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BEGIN = "<!-- device-results:begin (written by experiments/render_device_results.py) -->"
END = "<!-- device-results:end -->"
MAIN_ITEM = {"vgg16_cifar": "vgg", "resnet18": "resnet18"}  # model -> its bench_train item
CIFAR_MODES = ("plain", "dbb", "rep", "dyrep")


class Results:
    """The latest run of every item: its status line, its records and its part's env line."""

    def __init__(self, paths: list[Path]):
        self.status, self.records, self.env, self.dirs = {}, {}, {}, []
        runs = [read_part(f) for f in jsonl_files(paths)]
        for env, by_item, status in sorted(runs, key=lambda run: run[0].get("started", "")):
            for name, st in status.items():
                self.status[name], self.env[name] = st, env
                self.records[name] = by_item.get(name, [])
        self.dirs = sorted({f.parent for f in jsonl_files(paths)})

    def pick(self, item: str, field: str, **match):
        """`field` of the first record of `item` whose fields equal `match`, else None."""
        for rec in self.records.get(item, []):
            if all(rec.get(k) == v for k, v in match.items()):
                return rec.get(field)
        return None

    def of(self, item: str, **match) -> list[dict]:
        return [r for r in self.records.get(item, [])
                if all(r.get(k) == v for k, v in match.items())]

    def envs(self) -> list[dict]:
        unique = {json.dumps(e, sort_keys=True): e for e in self.env.values()}
        return sorted(unique.values(), key=lambda e: (str(e.get("part")), e.get("started", "")))


def jsonl_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.exists():
            files.append(path)
        else:
            sys.exit(f"{path} not found: pass part*.jsonl files or folders holding them")
    return files


def read_part(path: Path) -> tuple[dict, dict, dict]:
    """(env record, item -> measurement records, item -> status record) of one part file."""
    env, by_item, status = {}, {}, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "env":
            env = rec
        elif rec.get("kind") == "item":
            status[rec["item"]] = rec
        else:
            by_item.setdefault(rec.get("item"), []).append(rec)
    return env, by_item, status


# ---------------------------------------------------------------------------- formatting


def num(value) -> str:
    """A number as the script printed it (JSON), or n/a."""
    return "n/a" if value is None else str(value)


def ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def verdict(value, low=None, high=None) -> str:
    ok = (low is None or value >= low) and (high is None or value <= high)
    return "met" if ok else "missed"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# ---------------------------------------------------------------------------- perf page


def ran(res: Results, model: str, *items: str) -> bool:
    return all(i in res.status for i in (MAIN_ITEM[model], *items))


def vs_anchor(res: Results, model: str) -> str:
    if not ran(res, model, "anchor"):
        return ""
    ours = res.pick(MAIN_ITEM[model], "img_per_s", kind="train", mode="plain")
    bare = res.pick("anchor", "img_per_s", model=model, variant="plain")
    return quotient(ours, bare, "img/s", low=0.95)


def dbb_vs_plain(res: Results, model: str, field: str, low=None, high=None, unit="img/s"):
    if not ran(res, model):
        return ""
    item = MAIN_ITEM[model]
    return quotient(res.pick(item, field, kind="train", mode="dbb"),
                    res.pick(item, field, kind="train", mode="plain"), unit, low, high)


def fused_vs_plain(res: Results, model: str) -> str:
    if not ran(res, model):
        return ""
    item = MAIN_ITEM[model]
    return quotient(res.pick(item, "img_per_s", kind="infer", mode="fused"),
                    res.pick(item, "img_per_s", kind="infer", mode="plain"), "img/s", 0.95)


def single(res: Results, item: str, value, unit: str, high) -> str:
    if item not in res.status:
        return ""
    return "n/a" if value is None else f"{value}{unit} ({verdict(value, high=high)})"


def target_rows(res: Results) -> list[list[str]]:
    """The targets table: one row per target, a measured cell per model ('—' where the
    target does not apply, empty where its item has not run)."""
    vgg, rn = "vgg16_cifar", "resnet18"
    regrow = res.pick("vgg", "compile_s", kind="regrow")
    frac = res.pick("vgg", "recipe_compile_frac_est", kind="ratios")
    host = res.pick("input", "host_images_per_s")
    plain = res.pick("vgg", "img_per_s", kind="train", mode="plain")
    feed = quotient(host, plain, "img/s", low=1.5) if ran(res, vgg, "input") else ""
    return [
        ["plain ≥ 0.95× bare Flax", "`train/plain img_per_s` ÷ anchor `plain img_per_s`",
         vs_anchor(res, vgg), vs_anchor(res, rn)],
        ["dbb ≥ 0.40× our plain (VGG), ≥ 0.45× (ResNet)", "train `dbb img_per_s` ÷ `plain`",
         dbb_vs_plain(res, vgg, "img_per_s", low=0.40),
         dbb_vs_plain(res, rn, "img_per_s", low=0.45)],
        ["dbb peak memory ≤ 1.5× plain (ResNet-18)", "train `dbb peak_mem_gib` ÷ `plain`", "—",
         dbb_vs_plain(res, rn, "peak_mem_gib", high=1.5, unit="GiB")],
        ["re-jit after a grow ≤ 10 s (VGG)", "`regrow compile_s`",
         single(res, "vgg", regrow, " s", 10), "—"],
        ["total compile ≤ 5% of the CIFAR recipe's wall time",
         "`ratios recipe_compile_frac_est`", single(res, "vgg", frac, "", 0.05), "—"],
        ["fused inference within 5% of plain", "infer `fused img_per_s` ÷ `plain` ≥ 0.95",
         fused_vs_plain(res, vgg), fused_vs_plain(res, rn)],
        ["CIFAR host input ≥ 1.5× plain step images/s",
         "`input host_images_per_s` ÷ `train/plain img_per_s`", feed, "—"],
    ]


def quotient(a, b, unit: str, low=None, high=None) -> str:
    value = ratio(a, b)
    if value is None:
        return f"n/a ({num(a)} / {num(b)} {unit})"
    return f"{value} = {a} / {b} {unit} ({verdict(value, low, high)})"


def measurement_tables(res: Results) -> list[str]:
    """Every train, inference, regrow, anchor and input line, as printed."""
    items = [i for i in ("vgg", "resnet18", "ab_unshared", "ab_branchwise") if i in res.status]
    train = [[i, r["model"], r["mode"], r.get("blocks_impl"), r["batch"], r["image_size"],
              r["dtype"], num(r["img_per_s"]), num(r["step_ms"]), num(r["compile_s"]),
              num(r.get("peak_mem_gib")), num(r.get("xla_temp_gib")), num(r.get("params_m")),
              num(r.get("blocks"))] for i in items for r in res.of(i, kind="train")]
    infer = [[r["model"], r["mode"], num(r["img_per_s"]), num(r["step_ms"]), num(r["compile_s"]),
              num(r.get("params_m"))] for i in items for r in res.of(i, kind="infer")]
    regrow = [[r["model"], r.get("slot"), num(r["compile_s"]), num(r["eval_compile_s"]),
               num(r["calib_s"])] for i in items for r in res.of(i, kind="regrow")]
    anchor = [[r.get("model"), r.get("variant"), r.get("mode"), r.get("batch"),
               num(r.get("img_per_s")), num(r.get("step_ms")), num(r.get("peak_mem_gib")),
               r.get("framework") or r.get("error")] for r in res.records.get("anchor", [])]
    feed = [[r.get("data"), r.get("batch"), num(r.get("host_images_per_s"))]
            for r in res.records.get("input", [])]
    out = []
    for title, header, rows in (
        ("Train step (`bench_train.py`)", ["item", "model", "mode", "blocks impl", "batch", "px",
         "dtype", "img/s", "step ms", "compile s", "peak GiB", "XLA temp GiB", "params M",
         "blocks"], train),
        ("Inference (eval step; `fused` is the deploy network)", ["model", "mode", "img/s",
         "step ms", "compile s", "params M"], infer),
        ("Re-jit after one more grow (dyrep structure)", ["model", "slot", "train compile s",
         "eval compile s", "calibration s"], regrow),
        ("Bare-Flax anchor (`.bench/flax_anchor.py`)", ["model", "variant", "mode", "batch",
         "img/s", "step ms", "peak GiB", "framework or error"], anchor),
        ("Host input (`bench_input.py`)", ["data", "batch", "host img/s"], feed),
        ("Block implementation A/B (VGG-16 dbb train step)", ["blocks impl", "item", "img/s",
         "step ms", "compile s", "peak GiB", "XLA temp GiB"], block_ab_rows(res)),
    ):
        if rows:
            out += ["", f"#### {title}", "", *table(header, rows)]
    return out


def block_ab_rows(res: Results) -> list[list]:
    """`fast` (the default) from the main VGG run, the other two from their A/B items."""
    rows = []
    for impl, item in (("fast", "vgg"), ("unshared", "ab_unshared"),
                       ("branchwise", "ab_branchwise")):
        for r in res.of(item, kind="train", mode="dbb", blocks_impl=impl):
            rows.append([impl, item, num(r["img_per_s"]), num(r["step_ms"]), num(r["compile_s"]),
                         num(r.get("peak_mem_gib")), num(r.get("xla_temp_gib"))])
    return rows


def status_rows(res: Results, names) -> list[list]:
    return [[st["part"], name, num(st["rc"]), "yes" if st["timed_out"] else "no",
             num(st["wall_s"]), num(st["timeout_s"]), st.get("error") or ""]
            for name, st in res.status.items() if name in names]


def source_lines(res: Results, parts) -> list[str]:
    """Where and when: one line per part run, and a warning for --tiny smoke output."""
    lines = []
    for env in res.envs():
        if env.get("part") not in parts:
            continue
        lines.append(f"- part {env['part']}: started {env.get('started')}, commit "
                     f"{env.get('commit') or 'n/a'}, GPU {env.get('gpu') or 'none (CPU)'}")
        if env.get("tiny"):
            lines.append("  **`--tiny` smoke output on a CPU: not H200 figures.**")
    return lines


def perf_block(res: Results) -> str:
    perf_items = ("vgg", "anchor", "input", "ab_unshared", "ab_branchwise", "resnet18")
    ran = [n for n in perf_items if n in res.status]
    lines = [BEGIN, "", "## Targets (one H200, bf16) and every measurement", ""]
    if not ran:
        lines += ["No device run yet: every measured cell is empty.", ""]
    else:
        lines += ["Runs:", "", *source_lines(res, ("1", "2")), ""]
    lines += table(["target", "from", "VGG-16 CIFAR (b128, 32 px) measured",
                    "ResNet-18 (b256, 224 px) measured"], target_rows(res))
    if ran:
        def values(field):
            found = {str(r[field]) for i in ran for r in res.records[i] if r.get(field)}
            return ", ".join(sorted(found)) or "n/a"

        lines += ["", f"jax {values('jax')}. Devices: {values('device')}."]
        lines += measurement_tables(res)
        lines += ["", "#### Items (what ran, how long)", "",
                  *table(["part", "item", "rc", "timed out", "wall s", "timeout s", "error"],
                         status_rows(res, perf_items))]
    return "\n".join([*lines, "", END])


def fill_perf_page(path: Path, res: Results) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{path} has no device-results markers: restore them from git "
                 f"({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + perf_block(res) + tail)


# ---------------------------------------------------------------------------- CIFAR page


def pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}"


def cifar_row(r: dict) -> list[str]:
    """As reproduce_cifar.py's own table formats one mode."""
    return [r["mode"], pct(r["test_top1"]), pct(r["fused_test_top1"]), f"{r['wall_s']:.0f}",
            f"{r['img_per_s']:.0f}", f"{r['compile_s']:.1f}", f"{r['params'] / 1e6:.3f}M",
            f"{r['macs'] / 1e6:.1f}M", f"{r['fused_params'] / 1e6:.3f}M",
            f"{r['fused_macs'] / 1e6:.1f}M"]


def structure_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["mode"] in ("rep", "dyrep"):
            cuts = "; ".join(f"{slot}: {branches}" for slot, branches in r["cuts"]) or "none"
            lines.append(f"- {r['mode']} (seed {r.get('seed')}): {len(r['grows'])} grows "
                         f"({', '.join(r['grows']) or 'none'}); {len(r['cuts'])} cuts ({cuts})")
    return lines


def cifar_page(res: Results, plots: list[str]) -> str:
    names = [f"cifar_{m}" for m in CIFAR_MODES if f"cifar_{m}" in res.status]
    rows = [r for n in names for r in res.of(n) if "test_top1" in r]
    commands = [re.sub(r"^\S*python\S*", "python", c)  # not this machine's interpreter path
                for n in names for c in res.status[n].get("inner_cmd", [])]
    lines = [
        "# CIFAR-10 ablation at reduced scale (gpu)", "",
        "Written by `experiments/render_device_results.py` from the JSON lines of "
        "`python3 experiments/device_check.py --part 3`: one `experiments/reproduce_cifar.py "
        "--profile gpu` run per mode (VGG-16 CIFAR, the reference recipe scaled to 30 epochs, "
        "adjust every 2 epochs until epoch 25, bfloat16, batch 128) on `cifar10_16k.npz`, the "
        "first 16k train and 4k test images of real CIFAR-10. Test top-1 is on those 4k.", "",
        *source_lines(res, ("3",)), "",
        *table(["mode", "test top-1 %", "fused top-1 %", "wall s", "img/s", "compile s",
                "train params", "train MACs", "deploy params", "deploy MACs"],
               [cifar_row(r) for r in rows]),
        "", "Structure at the end:", "", *(structure_lines(rows) or ["- (no rep/dyrep run)"]),
    ]
    lines += ["", *(f"![{p}]({p})" for p in plots)] if plots else []
    lines += ["", "Runs:", "", *table(["part", "item", "rc", "timed out", "wall s", "timeout s",
                                       "error"], status_rows(res, names))]
    lines += ["", "Training commands (as reproduce_cifar.py ran them):", "", "```",
              *commands, "```", ""]
    return "\n".join(lines)


def plot_links(res: Results, page: Path) -> list[str]:
    """The rep/dyrep structure plots that part 3 left beside its lines, relative to page."""
    links = []
    for mode in ("rep", "dyrep"):
        found = [d / f"cifar10_reduced_gpu_{mode}.png" for d in res.dirs]
        found = [f for f in found if f.exists()]
        if found and f"cifar_{mode}" in res.status:
            links.append(os.path.relpath(found[-1], page.parent))
    return links


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS / "h200"],
                        help="part*.jsonl files or folders (default experiments/results/h200)")
    parser.add_argument("--perf", type=Path, default=RESULTS / "perf-h200.md")
    parser.add_argument("--cifar", type=Path, default=RESULTS / "cifar10_reduced_gpu.md")
    args = parser.parse_args(argv)
    res = Results(args.paths)
    fill_perf_page(args.perf, res)
    print(f"wrote {args.perf}")
    if any(n.startswith("cifar_") for n in res.status):
        args.cifar.write_text(cifar_page(res, plot_links(res, args.cifar)))
        print(f"wrote {args.cifar}")
    else:
        print("no part 3 lines: the CIFAR page is left as it is")


if __name__ == "__main__":
    main()

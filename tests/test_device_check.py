"""The device check runs end to end on a CPU (--tiny) and its pages show what it printed.

The smoke run takes a few items of `experiments/device_check.py --tiny` (ResNet-18 plain,
the host input, one CIFAR mode, a missing anchor) to keep the suite short; the
renderer's target arithmetic is checked on hand-made lines, where the answer is known.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import device_check  # noqa: E402
import render_device_results as render  # noqa: E402

PERF = ROOT / "experiments" / "results" / "perf-h200.md"


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render_into(tmp_path: Path, *sources: Path) -> tuple[str, Path]:
    """(perf block rendered into a copy of the committed page, path of the CIFAR page)."""
    perf, cifar = tmp_path / "perf.md", tmp_path / "cifar.md"
    shutil.copyfile(PERF, perf)
    render.main([*map(str, sources), "--perf", str(perf), "--cifar", str(cifar)])
    text = perf.read_text()
    return text[text.index(render.BEGIN):text.index(render.END)], cifar


def test_tiny_run_renders_the_numbers_it_printed(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "device_check.py"), "--tiny",
           "--only", "input,resnet18,anchor,cifar_plain", "--anchor", "no/such/anchor.py",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "part1.jsonl", "part1.log", "part2.jsonl", "part2.log", "part3.jsonl", "part3.log",
        "reproduce_gpu.md"]
    part1, part2, part3 = (lines_of(out / f"part{p}.jsonl") for p in "123")
    status = {r["item"]: r for r in part1 + part2 + part3 if r.get("kind") == "item"}
    assert {n: status[n]["rc"] for n in status} == {
        "input": 0, "resnet18": 0, "anchor": None, "cifar_plain": 0}, status
    assert "no/such/anchor.py not found" in status["anchor"]["error"]

    block, cifar = render_into(tmp_path, out)
    train = next(r for r in part2 if r.get("kind") == "train")
    assert (train["item"], train["model"], train["mode"]) == ("resnet18", "resnet18", "plain")
    assert f"| {train['img_per_s']} | {train['step_ms']} | {train['compile_s']} |" in block
    infer = {r["mode"]: r["img_per_s"] for r in part2 if r.get("kind") == "infer"}
    assert f"= {infer['fused']} / {infer['plain']} img/s" in block  # the fused target cell
    host = next(r for r in part1 if r.get("item") == "input")["host_images_per_s"]
    assert f"| {host} |" in block
    assert "no/such/anchor.py not found" in block
    assert "`--tiny` smoke output on a CPU" in block
    run = next(r for r in part3 if r.get("mode") == "plain" and "test_top1" in r)
    page = cifar.read_text()
    assert (f"| plain | {run['test_top1'] * 100:.2f} | {run['fused_test_top1'] * 100:.2f} | "
            f"{run['wall_s']:.0f} | {run['img_per_s']:.0f} | {run['compile_s']:.1f} |") in page


def test_committed_page_is_the_render_of_no_lines(tmp_path):
    """The committed block is the renderer's own empty state (nobody typed cells in)."""
    (tmp_path / "none").mkdir()
    _, cifar = render_into(tmp_path, tmp_path / "none")
    assert (tmp_path / "perf.md").read_text() == PERF.read_text()
    assert not cifar.exists()


def write_part(path: Path, part: str, started: str, records: list[dict]) -> None:
    env = {"kind": "env", "part": part, "tiny": False, "started": started,
           "gpu": "NVIDIA H200, 143771 MiB, 580.159.04", "commit": "abc1234"}
    items = sorted({r["item"] for r in records})
    status = [{"kind": "item", "item": i, "part": part, "cmd": "x", "inner_cmd": [], "rc": 0,
               "timed_out": False, "timeout_s": 100, "wall_s": 50.0, "error": None}
              for i in items]
    path.write_text("".join(json.dumps(r) + "\n" for r in [env, *records, *status]))


def train(item, model, mode, img, mem=None, **extra):
    return {"item": item, "kind": "train", "model": model, "mode": mode, "img_per_s": img,
            "peak_mem_gib": mem, "blocks_impl": "fast", **extra}


def test_targets_are_computed_from_the_lines(tmp_path):
    vgg, rn = "vgg16_cifar", "resnet18"
    write_part(tmp_path / "part1.jsonl", "1", "2026-01-01T00:00:00", [
        train("vgg", vgg, "plain", 60000.0), train("vgg", vgg, "dbb", 30000.0),
        {"item": "vgg", "kind": "infer", "model": vgg, "mode": "plain", "img_per_s": 100000.0},
        {"item": "vgg", "kind": "infer", "model": vgg, "mode": "fused", "img_per_s": 90000.0},
        {"item": "vgg", "kind": "regrow", "model": vgg, "compile_s": 7.5},
        {"item": "vgg", "kind": "ratios", "model": vgg, "recipe_compile_frac_est": 0.08},
        {"item": "anchor", "model": vgg, "variant": "plain", "mode": "bf16", "img_per_s": 62500.0},
        {"item": "anchor", "model": rn, "variant": "plain", "mode": "bf16", "img_per_s": 20000.0},
        {"item": "input", "host_images_per_s": 120000.0},
    ])
    write_part(tmp_path / "part2.jsonl", "2", "2026-01-01T01:00:00", [
        train("resnet18", rn, "plain", 18000.0, mem=3.0),
        train("resnet18", rn, "dbb", 9000.0, mem=6.0),
    ])
    rows = {r[0]: r[2:] for r in render.target_rows(render.Results([tmp_path]))}
    assert rows["plain ≥ 0.95× bare Flax"] == [
        "0.96 = 60000.0 / 62500.0 img/s (met)", "0.9 = 18000.0 / 20000.0 img/s (missed)"]
    assert rows["dbb ≥ 0.40× our plain (VGG), ≥ 0.45× (ResNet)"] == [
        "0.5 = 30000.0 / 60000.0 img/s (met)", "0.5 = 9000.0 / 18000.0 img/s (met)"]
    assert rows["dbb peak memory ≤ 1.5× plain (ResNet-18)"] == [
        "—", "2.0 = 6.0 / 3.0 GiB (missed)"]
    assert rows["re-jit after a grow ≤ 10 s (VGG)"] == ["7.5 s (met)", "—"]
    assert rows["total compile ≤ 5% of the CIFAR recipe's wall time"] == ["0.08 (missed)", "—"]
    assert rows["fused inference within 5% of plain"] == [
        "0.9 = 90000.0 / 100000.0 img/s (missed)", "n/a (n/a / n/a img/s)"]
    assert rows["CIFAR host input ≥ 1.5× plain step images/s"] == [
        "2.0 = 120000.0 / 60000.0 img/s (met)", "—"]


def test_the_run_that_started_last_counts(tmp_path):
    write_part(tmp_path / "part2-rerun.jsonl", "2", "2026-01-02T00:00:00",
               [train("resnet18", "resnet18", "plain", 2.0)])
    write_part(tmp_path / "part2.jsonl", "2", "2026-01-01T00:00:00",
               [train("resnet18", "resnet18", "plain", 1.0)])
    res = render.Results([tmp_path])
    assert res.pick("resnet18", "img_per_s", kind="train") == 2.0


def process_gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


def test_a_timeout_ends_the_item_and_its_children_and_keeps_its_lines(tmp_path):
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('{\"child\": %d}' % p.pid, flush=True)\n"
            "time.sleep(60)\n")
    item = device_check.Item("sleeper", ("-c", code), 2)
    start = time.monotonic()
    rc, timed_out, _, stdout, _ = device_check.run_item(item, 3, dict(os.environ), tmp_path)
    assert timed_out and rc != 0 and time.monotonic() - start < 30
    records, _ = device_check.split_output(item, "1", stdout)
    assert records[0]["item"] == "sleeper"
    deadline = time.monotonic() + 10
    while not process_gone(records[0]["child"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(records[0]["child"])


@pytest.mark.parametrize("argv, message", [
    ([], "--part 1|2|3 is required"),
    (["--tiny", "--only", "vgg,nope"], "unknown item(s) nope"),
])
def test_bad_arguments_say_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit):
        device_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_carried_inputs_are_named(tmp_path, monkeypatch):
    args = device_check.parse_args(["--part", "3", "--npz", str(tmp_path / "none.npz")])
    item = device_check.Item("cifar_plain", (), 1)
    assert "none.npz not found" in device_check.missing_input(item, args)
    args.npz = __file__  # exists
    monkeypatch.setattr(device_check.importlib.util, "find_spec", lambda name: None)
    assert "install the carried .whl" in device_check.missing_input(item, args)

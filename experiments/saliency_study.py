"""Is the growth signal noise? Synflow's precision, stability and agreement, on real CIFAR-10.

Trains each model briefly in float32, then freezes the weights and scores one adjustment
interval (K batches) of accumulated per-slot saliency in three precisions (float64 with
`jax_enable_x64` and the project's float32 casts widened, float32, bf16 compute) and under
a second data order (another batch seed, same weights). Weights stay frozen while scoring
so that only precision (or data order) differs between the runs compared. `--bench` times
a train step scoring synflow_naive against one scoring synflow_stable, side by side.

  (real CIFAR-10 as npz, uint8 x_train/y_train/x_test/y_test, e.g. data_local/cifar10_16k.npz)
  python experiments/saliency_study.py --bench \
      --data data_local/cifar10_16k.npz --out experiments/results/saliency.md

Prints every table; with --out writes them to that page (text under an existing
"## Reading" heading is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dyrep_jax import models, saliency  # noqa: E402
from dyrep_jax.data.device_augment import augment_on_device  # noqa: E402
from dyrep_jax.data.npz import load_npz_source  # noqa: E402
from dyrep_jax.dyrep import eligible_slots  # noqa: E402
from dyrep_jax.models import layers as model_layers  # noqa: E402
from dyrep_jax.models import norm as model_norm  # noqa: E402
from dyrep_jax.rep import bn as rep_bn  # noqa: E402
from dyrep_jax.rep import kernels as rep_kernels  # noqa: E402
from dyrep_jax.rep import ops as rep_ops  # noqa: E402
from dyrep_jax.rep import share as rep_share  # noqa: E402
from dyrep_jax.rep.introspect import slot_geometries  # noqa: E402
from dyrep_jax.rep.tree import dotted, get_at  # noqa: E402

PRECISIONS = ("float64", "float32", "bf16")
METRICS = ("synflow_naive", "synflow_stable", "snip", "grad_norm")
OUT = []  # every printed line, for the results page


def say(line: str = "") -> None:
    print(line, flush=True)
    OUT.append(line)


class _WideNumpy:
    """jax.numpy with float32 meaning float64 (widens the project's explicit casts)."""

    def __getattr__(self, name):
        return jnp.float64 if name == "float32" else getattr(jnp, name)


@contextlib.contextmanager
def float64_numerics():
    """x64 on and every float32 cast of BN, block and head code made float64."""
    modules = (rep_bn, rep_ops, rep_share, rep_kernels, model_layers, model_norm)
    saved = [m.jnp for m in modules]
    try:
        with jax.enable_x64(True):
            for m in modules:
                m.jnp = _WideNumpy()
            yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            m.jnp = old


def loss_fn(model, params, stats, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
    return loss, updates["batch_stats"]


def train(model, variables, data, args, seed):
    """A short float32 SGD run with the CIFAR device augmentation; returns variables."""
    images, labels, mean, std = data
    steps_per_epoch = len(images) // args.batch
    tx = optax.sgd(optax.cosine_decay_schedule(args.lr, steps_per_epoch * args.epochs), 0.9)

    @jax.jit
    def step(params, stats, opt_state, xb, yb, key):
        x = augment_on_device(key, xb, mean, std, "cifar")
        (loss, stats), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, stats, x, yb), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(images))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            key = jax.random.PRNGKey(epoch * 100_000 + i)
            params, stats, opt_state, loss = step(params, stats, opt_state, images[idx],
                                                  labels[idx], key)
        say(f"  epoch {epoch + 1}: last batch loss {float(loss):.3f}")
    return {"params": params, "batch_stats": stats}


def scoring_batches(data, seed: int, k: int, batch: int):
    """K augmented, normalized float32 batches (numpy): the same inputs for every precision."""
    images, labels, mean, std = data
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=(k, batch), replace=False)
    aug = jax.jit(lambda key, xb: augment_on_device(key, xb, mean, std, "cifar"))
    return [(np.asarray(aug(jax.random.PRNGKey(seed * 1000 + j), images[i])), labels[i])
            for j, i in enumerate(idx)]


def make_score_step(model, paths, counts, wide: bool):
    """(params, stats, x, y) -> {metric: per-slot scores, 'factor': eps/(s^2+eps) per slot}."""
    def step(params, stats, x, y):
        (_, new_stats), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, stats, x, y), has_aux=True)(params)
        key = jax.random.PRNGKey(0)
        out = {m: saliency.slot_scores(grads, params, stats, new_stats, paths, m, key, counts)
               for m in METRICS}
        if wide:  # the naive sum in float64 itself: the reference
            out["synflow_naive"] = jnp.stack([
                jnp.sum(get_at(grads, p)["kernel"] * get_at(params, p)["kernel"])
                for p in paths])
        out["factor"] = jnp.concatenate([
            rep_bn.EPS / (saliency.batch_var_from_update(
                get_at(stats, b)["var"], get_at(new_stats, b)["var"], c) + rep_bn.EPS)
            for p, c in zip(paths, counts, strict=True)
            if (b := saliency.following_bn(params, p)) is not None])
        return out

    return jax.jit(step)


PRECISION_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bf16": jnp.bfloat16}


_SCORE_STEPS = {}  # (model name, precision) -> jitted score step: compile once per precision


def score_interval(name, width, variables, batches, precision, paths, counts):
    """Mean per-slot scores over `batches` with frozen weights in one precision."""
    wide = precision == "float64"
    ctx = float64_numerics() if wide else contextlib.nullcontext()
    with ctx:
        dtype = PRECISION_DTYPES[precision]
        if (name, precision) not in _SCORE_STEPS:
            model = models.create_model(name, 10, width, dtype=dtype)
            _SCORE_STEPS[name, precision] = make_score_step(model, paths, counts, wide)
        step = _SCORE_STEPS[name, precision]
        cast = (lambda a: jnp.asarray(a, jnp.float64)) if wide else jnp.asarray
        params = jax.tree_util.tree_map(cast, variables["params"])
        stats = jax.tree_util.tree_map(cast, variables["batch_stats"])
        total, first_factor = None, None
        for x, y in batches:
            out = step(params, stats, jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32))
            out = {k: np.asarray(v, np.float64) for k, v in out.items()}
            if wide:
                assert out["synflow_naive"].dtype == np.float64
            first_factor = out["factor"] if first_factor is None else first_factor
            total = out if total is None else {k: total[k] + out[k] for k in total}
    means = {k: v / len(batches) for k, v in total.items() if k != "factor"}
    means["factor0"] = first_factor
    return means


def ranks(v):
    return np.argsort(np.argsort(v)).astype(np.float64)


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def top1(v) -> int:
    return int(np.argmax(v))


def table(header, rows):
    say("| " + " | ".join(header) + " |")
    say("|" + "---|" * len(header))
    for row in rows:
        say("| " + " | ".join(str(c) for c in row) + " |")
    say()


def relerr(a, ref):
    return np.abs(np.asarray(a) - ref) / np.maximum(np.abs(ref), 1e-30)


def report_precision(runs, names):
    """Precision and identity: each form in each precision against float64 naive (seed A)."""
    ref = runs["float64", "A"]["synflow_naive"]
    say("float64 naive synflow, top slots: " + ", ".join(
        f"{names[i]} {ref[i]:.3e}" for i in np.argsort(-ref)[:3]))
    say(f"gap top-1 - top-2: {np.sort(ref)[-1] - np.sort(ref)[-2]:.3e}; "
        f"median |synflow| / snip over slots: "
        f"{np.median(np.abs(ref) / runs['float64', 'A']['snip']):.2e}")
    say()
    rows = []
    for prec in PRECISIONS:
        for form in ("synflow_naive", "synflow_stable"):
            v = runs[prec, "A"][form]
            err = relerr(v, ref)
            rows.append([prec, form, f"{spearman(v, ref):.4f}", names[top1(v)],
                         "yes" if top1(v) == top1(ref) else "**no**",
                         f"{np.median(err):.1e}", f"{np.max(err):.1e}",
                         f"{np.max(np.abs(v - ref)):.1e}"])
    table(["compute", "form", "Spearman vs f64 naive", "top-1 slot", "same top-1",
           "median rel. err", "max rel. err", "max abs. err"], rows)
    f64 = runs["float64", "A"]["factor0"]
    rows = [[prec, f"{np.median(relerr(runs[prec, 'A']['factor0'], f64)):.1e}",
             f"{np.max(relerr(runs[prec, 'A']['factor0'], f64)):.1e}"]
            for prec in ("float32", "bf16")]
    say("eps/(s^2+eps) from the running-var update (first batch, every BN channel) "
        "vs the float64 run:")
    say()
    table(["compute", "median rel. err", "max rel. err"], rows)


def report_stability(runs, names):
    """Does the chosen slot repeat under another data order (same weights)?"""
    rows = []
    for prec in PRECISIONS:
        for m in METRICS:
            a, b = runs[prec, "A"][m], runs[prec, "B"][m]
            rows.append([prec, m, names[top1(a)], names[top1(b)],
                         "yes" if top1(a) == top1(b) else "**no**", f"{spearman(a, b):.3f}"])
    table(["compute", "metric", "top-1 seed A", "top-1 seed B", "repeats",
           "Spearman A vs B"], rows)


def report_agreement(runs, names):
    """synflow vs snip vs grad_norm (float64 naive synflow; float32 for the others)."""
    rows = []
    for seed in ("A", "B"):
        syn = runs["float64", seed]["synflow_naive"]
        snip, gn = runs["float32", seed]["snip"], runs["float32", seed]["grad_norm"]
        rows.append([seed, names[top1(syn)], names[top1(snip)], names[top1(gn)],
                     f"{spearman(syn, snip):.3f}", f"{spearman(syn, gn):.3f}",
                     f"{spearman(snip, gn):.3f}"])
    table(["seed", "top-1 synflow", "top-1 snip", "top-1 grad_norm", "rho(syn,snip)",
           "rho(syn,gn)", "rho(snip,gn)"], rows)


def study_model(name, data, args):
    say(f"## {name}, width {args.width}")
    say()
    model = models.create_model(name, 10, args.width)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
    start = time.perf_counter()
    variables = train(model, variables, data, args, seed=0)
    say(f"  trained {args.epochs} epochs on {len(data[0])} images in "
        f"{time.perf_counter() - start:.0f}s")
    paths = eligible_slots(variables["params"])
    names = [dotted(p[:-1] if p[-1] == "conv" else p) for p in paths]  # ConvBN unit names
    x_spec = jax.ShapeDtypeStruct((args.batch, 32, 32, 3), jnp.float32)
    counts = saliency.bn_counts(slot_geometries(model, variables, x_spec), paths, args.batch)
    plan = saliency.score_plan(variables["params"], paths)
    say(f"  {len(paths)} eligible slots, {sum(b is None for _, b in plan)} without a following "
        f"train-mode BN (naive fallback); scoring {args.interval} batches of {args.batch}")
    say()
    runs = {}
    for seed_name, seed in (("A", 1), ("B", 2)):
        batches = scoring_batches(data, seed, args.interval, args.batch)
        for prec in PRECISIONS:
            start = time.perf_counter()
            runs[prec, seed_name] = score_interval(name, args.width, variables, batches, prec,
                                                   paths, counts)
            print(f"  scored {prec} seed {seed_name} in {time.perf_counter() - start:.0f}s",
                  flush=True)
    say("### Precision and the identity (seed A)")
    say()
    report_precision(runs, names)
    say("### Stability (seed B: other batches, same weights)")
    say()
    report_stability(runs, names)
    say("### Metric agreement")
    say()
    report_agreement(runs, names)
    if args.long:
        report_long_interval(name, args, data, variables, paths, counts, names)
    return runs, names


def report_long_interval(name, args, data, variables, paths, counts, names):
    """Stability again with `--long` times the batches per interval (float32 and bf16)."""
    k = args.interval * args.long
    say(f"### Stability over a {args.long}x longer interval ({k} batches of {args.batch})")
    say()
    rows = []
    for prec in ("float32", "bf16"):
        runs = {seed: score_interval(name, args.width, variables,
                                     scoring_batches(data, seed, k, args.batch), prec, paths,
                                     counts) for seed in (11, 12)}
        for m in METRICS:
            a, b = runs[11][m], runs[12][m]
            rows.append([prec, m, names[top1(a)], names[top1(b)],
                         "yes" if top1(a) == top1(b) else "**no**", f"{spearman(a, b):.3f}"])
    table(["compute", "metric", "top-1 seed C", "top-1 seed D", "repeats",
           "Spearman C vs D"], rows)


def make_bench_step(model, tx, paths, counts, metric, mean, std):
    """The train step's shape (augment, grad, score, SGD update) with one scoring metric."""

    def step(state, images, labels, rng):
        aug_key, score_key = jax.random.split(rng)
        x = augment_on_device(aug_key, images, mean, std, "cifar")
        (loss, stats), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, state["batch_stats"], x, labels), has_aux=True)(
            state["params"])
        scores = state["scores"]
        if metric is not None:
            scores = saliency.accumulate(scores, grads, state["params"], state["batch_stats"],
                                         stats, paths, metric, score_key, counts)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt_state": opt_state, "scores": scores}, loss

    return jax.jit(step, donate_argnums=0)


def bench(name, data, args):
    """Median step time with no scoring, synflow_naive and synflow_stable, interleaved."""
    images, labels, mean, std = data
    model = models.create_model(name, 10, args.width)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
    paths = eligible_slots(variables["params"])
    batch = args.bench_batch
    x_spec = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    counts = saliency.bn_counts(slot_geometries(model, variables, x_spec), paths, batch)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, 0.9))
    variants = {"none": None, "synflow_naive": "synflow_naive",
                "synflow_stable": "synflow_stable"}
    steps = {k: make_bench_step(model, tx, paths, counts, m, mean, std)
             for k, m in variants.items()}
    fresh = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731 (donated per variant)
    states = {k: fresh({**variables, "opt_state": tx.init(variables["params"]),
                        "scores": jnp.zeros(len(paths))}) for k in variants}
    xb, yb = jnp.asarray(images[:batch]), jnp.asarray(labels[:batch])
    costs = {k: compiled_cost(steps[k], states[k], xb, yb) for k in variants}
    times = {k: [] for k in variants}
    for r in range(args.bench_rounds + 1):
        for k in variants:
            start = time.perf_counter()
            for i in range(args.bench_steps):
                states[k], loss = steps[k](states[k], xb, yb, jax.random.PRNGKey(i))
            loss.block_until_ready()
            if r > 0:  # round 0 compiles and warms up
                times[k].append((time.perf_counter() - start) / args.bench_steps)
    say(f"## Step time, {name} width {args.width}, batch {batch}, float32, "
        f"{jax.devices()[0].platform}: {args.bench_rounds} interleaved rounds of "
        f"{args.bench_steps} steps")
    say()
    base = np.median(times["synflow_naive"])
    best = np.min(times["synflow_naive"])
    table(["scoring", "median step ms", "min step ms", "median vs naive", "min vs naive",
           "XLA flops", "XLA bytes accessed"],
          [[k, f"{1e3 * np.median(v):.1f}", f"{1e3 * np.min(v):.1f}",
            f"{100 * (np.median(v) / base - 1):+.1f}%", f"{100 * (np.min(v) / best - 1):+.1f}%",
            f"{costs[k][0]:.4g}", f"{costs[k][1]:.4g}"] for k, v in times.items()])
    alone = time_scoring_alone(model, variables, paths, counts, xb, yb, 200)
    say("The scoring computation alone (jitted on its own from one step's gradients, "
        "200 interleaved calls):")
    say()
    table(["scoring", "median ms", "min ms", "median as % of the naive step's median"],
          [[m, f"{a:.3f}", f"{b:.3f}", f"{100 * a / (1e3 * base):.2f}%"]
           for m, (a, b) in alone.items()])


def time_scoring_alone(model, variables, paths, counts, xb, yb, reps: int):
    """Median/min ms of the scoring computation by itself (from fixed grads), per metric."""
    (_, after), grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, variables["batch_stats"], xb.astype(jnp.float32) / 255.0,
                          yb), has_aux=True)(variables["params"])
    args = (grads, variables["params"], variables["batch_stats"], after)
    fns = {m: jax.jit(lambda g, p, b, a, m=m: saliency.slot_scores(
        g, p, b, a, paths, m, jax.random.PRNGKey(0), counts)) for m in
        ("synflow_naive", "synflow_stable")}
    times = {m: [] for m in fns}
    for r in range(reps + 1):
        for m, fn in fns.items():
            start = time.perf_counter()
            fn(*args).block_until_ready()
            if r > 0:
                times[m].append(1e3 * (time.perf_counter() - start))
    return {m: (np.median(v), np.min(v)) for m, v in times.items()}


def compiled_cost(step, state, xb, yb):
    """(flops, bytes accessed) of the compiled step, from XLA's cost analysis."""
    cost = step.lower(state, xb, yb, jax.random.PRNGKey(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", np.nan)), float(cost.get("bytes accessed", np.nan))


def write_page(path: Path, command: str):
    reading = ""
    if path.exists() and "\n## Reading" in path.read_text():
        reading = path.read_text()[path.read_text().index("\n## Reading"):]
    head = ["# Saliency study: synflow's precision, stability and agreement (CIFAR-10)", "",
            "Printed by (from the repository root):", "", "    " + command, ""]
    path.write_text("\n".join(head + OUT).rstrip() + "\n" + reading)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data_local/cifar10_16k.npz")
    parser.add_argument("--models", default="resnet18_cifar,vgg16_cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--interval", type=int, default=8, help="batches scored per run")
    parser.add_argument("--long", type=int, default=0,
                        help="also check stability over this many times longer intervals")
    parser.add_argument("--bench", action="store_true", help="also time naive vs stable")
    parser.add_argument("--bench-only", action="store_true")
    parser.add_argument("--bench-model", default="resnet18_cifar")
    parser.add_argument("--bench-batch", type=int, default=32)
    parser.add_argument("--bench-rounds", type=int, default=5)
    parser.add_argument("--bench-steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="write the results page here")
    args = parser.parse_args(argv)
    source = load_npz_source(args.data)
    n = min(args.train_images, len(source.train.images))
    data = (source.train.images[:n], source.train.labels[:n], source.mean, source.std)
    say(f"data {args.data}: {n} training images; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}")
    say()
    if not args.bench_only:
        for name in args.models.split(","):
            study_model(name, data, args)
    if args.bench or args.bench_only:
        bench(args.bench_model, data, args)
    if args.out:
        write_page(Path(args.out), "python experiments/saliency_study.py " + " ".join(
            sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

"""The DyRep controller: saliency in the step, growth choice, function preservation, remap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rep_helpers import randomize_bn_params, randomize_stats
from train_helpers import branchwise_logits

from dyrep_jax import models
from dyrep_jax.calibration import calibrate_block, calibrate_network
from dyrep_jax.config_base import base_config
from dyrep_jax.data import normalize_images
from dyrep_jax.dyrep import (
    Controller,
    ControllerConfig,
    adjust,
    eligible_slots,
    pick_slots,
)
from dyrep_jax.models import dbb_initial_branches
from dyrep_jax.optim import cosine_schedule, make_optimizer, remap_opt_state
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.network import grow_at
from dyrep_jax.rep.tree import dotted, get_at, is_block_node, set_at, structure_of
from dyrep_jax.saliency import plain_score
from dyrep_jax.state import new_train_state
from dyrep_jax.steps import StepCache, make_train_step

SHAPE = (8, 8, 3)
MEAN, STD = jnp.full((3,), 0.5), jnp.full((3,), 0.25)


@pytest.fixture(scope="module")
def tiny():
    model = models.create_model("resnet18_cifar", num_classes=4, width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0), SHAPE)
    x = jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)
    geoms = {k: v.geometry for k, v in slot_geometries(model, variables, x).items()}
    return model, variables, geoms


def batches(n, seed=0, size=8):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield (rng.integers(0, 256, (size, *SHAPE), dtype=np.uint8),
               rng.integers(0, 4, (size,), dtype=np.int32))


def ctrl_config(**overrides) -> ControllerConfig:
    """The base config's controller fields, with `overrides`."""
    return ControllerConfig.from_config(base_config(), **overrides)


def logits_of(model, variables, images):
    """Inference logits from the branchwise reference (not the fused path under test)."""
    return branchwise_logits(model, variables, images)


def test_eligible_slots_rules(tiny):
    model, variables, geoms = tiny
    params = variables["params"]
    paths = eligible_slots(params)
    assert ("conv1", "conv") in paths  # 3x3 stem
    assert all(get_at(params, p)["kernel"].shape[0] == 3 for p in paths)
    assert not any("downsample" in p for p in paths)  # 1x1 convs are not eligible
    # after growing a slot, its kxk conv (depth 1) is eligible, the block is not
    path = paths[0]
    stats = variables["batch_stats"]
    params, stats = grow_at(jax.random.PRNGKey(1), params, stats, path, geoms[path], ["1x1"])
    inner = (*path, "kxk", "conv")
    paths1 = eligible_slots(params)
    assert path not in paths1 and inner in paths1
    params, stats = grow_at(jax.random.PRNGKey(2), params, stats, inner, geoms[path], ["1x1"])
    paths2 = eligible_slots(params)
    assert inner not in paths2 and (*inner, "kxk", "conv") not in paths2  # depth 2: never


def run_and_compare_scores(model, variables, metric, score_of):
    """Scores accumulated by the jitted train step vs jax.grad over the same batches."""
    tx = make_optimizer(schedule=cosine_schedule(0.05, 10), momentum=0.9)
    paths = eligible_slots(variables["params"])
    step = jax.jit(make_train_step(
        model, tx, cosine_schedule(0.05, 10), eligible=paths, metric=metric, num_classes=4,
        label_smoothing=0.0, mean=MEAN, std=STD, augment_kind="none", dtype=jnp.float32))
    state = new_train_state(variables, tx.init(variables["params"]), num_scores=len(paths))
    expected = np.zeros(len(paths))
    for i, (images, labels) in enumerate(batches(3)):
        params, bstats = state["params"], state["batch_stats"]

        def loss_fn(p, images=images, labels=labels, bstats=bstats):
            x = normalize_images(images, MEAN, STD)
            logits, _ = model.apply({"params": p, "batch_stats": bstats}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 4)).mean()

        grads = jax.jit(jax.grad(loss_fn))(params)
        expected += np.array([score_of(get_at(grads, p)["kernel"], get_at(params, p)["kernel"])
                              for p in paths])
        state, _ = step(state, images, labels, jax.random.PRNGKey(i))
    assert int(state["score_steps"]) == 3 and len(paths) > 3
    return np.asarray(state["scores"]), expected


def test_accumulated_synflow_equals_direct_grad():
    # Without the BN after its 3x3 convs, `synflow` (the stable form) falls back to the
    # naive sum(g*w) for those slots, so the accumulation can be checked against jax.grad
    # directly. With a train-mode BN after the conv the score is small but not zero (BN's
    # eps breaks the scale invariance); tests/test_saliency.py checks that identity.
    model = models.create_model("resnet18_cifar", num_classes=4, width=0.125,
                                with_bn_after_3x3=False)
    variables = models.init_variables(model, jax.random.PRNGKey(0), SHAPE)
    got, expected = run_and_compare_scores(
        model, variables, "synflow", lambda g, w: float(jnp.sum(g * w)))
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_accumulated_snip_equals_direct_grad(tiny):
    model, variables, _ = tiny
    got, expected = run_and_compare_scores(
        model, variables, "snip", lambda g, w: float(jnp.sum(jnp.abs(g * w))))
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_metrics():
    g, w = jnp.array([1.0, -2.0]), jnp.array([3.0, 1.0])
    assert float(plain_score("synflow_naive", g, w)) == pytest.approx(1.0)
    assert float(plain_score("snip", g, w)) == pytest.approx(5.0)
    assert float(plain_score("grad_norm", g, w)) == pytest.approx(np.sqrt(5.0))
    r = float(plain_score("random", g, w, jax.random.PRNGKey(0)))
    assert 0.0 <= r <= 1.0
    with pytest.raises(ValueError, match="unknown saliency metric 'foo'"):
        plain_score("foo", g, w)


def test_pick_slots_takes_argmax_and_topk():
    paths = [("a",), ("b",), ("c",)]
    assert pick_slots(np.array([0.1, 0.5, -1.0]), paths, 1) == [("b",)]
    assert pick_slots(np.array([0.1, 0.5, -1.0]), paths, 2) == [("b",), ("a",)]
    assert pick_slots(np.array([]), [], 1) == []


def make_calibrate(model, geoms, n=3):
    def calibrate(current, path):
        imgs = (normalize_images(i, MEAN, STD) for i, _ in batches(n, seed=7))
        return calibrate_block(model, current, path, geoms, imgs)

    return calibrate


def test_grow_picks_argmax_and_preserves_network_output(tiny):
    model, variables, geoms = tiny
    paths = eligible_slots(variables["params"])
    scores = np.zeros(len(paths))
    scores[3] = 5.0
    images = normalize_images(next(batches(1, seed=3))[0], MEAN, STD)
    before = logits_of(model, variables, images)
    cfg = ctrl_config(mode="rep", calib_batches=3)
    new, decisions = adjust(jax.random.PRNGKey(0), variables, geoms, scores, paths, cfg,
                            make_calibrate(model, geoms), grow=True, cut=False)
    assert [d["slot"] for d in decisions] == [dotted(paths[3])]
    assert decisions[0]["branches"] == ["1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1", "id"]
    block_stats = get_at(new["batch_stats"], paths[3])
    assert float(jnp.abs(block_stats["1x1"]["bn"]["var"] - 1).max()) > 1e-3  # calibrated
    after = logits_of(model, new, images)
    scale = float(jnp.max(jnp.abs(before)))
    # float32, block re-associates sums: 1e-4 of the logit scale
    assert float(jnp.max(jnp.abs(before - after))) <= 1e-4 * (1 + scale)


def test_dep_cuts_exactly_and_records_importances(tiny):
    model, variables, geoms = tiny
    params, stats = variables["params"], variables["batch_stats"]
    path = eligible_slots(params)[2]
    params, stats = grow_at(jax.random.PRNGKey(4), params, stats, path, geoms[path],
                            ["1x1", "1x1_avg", "1xk", "id"])
    block = randomize_bn_params(jax.random.PRNGKey(5), get_at(params, path))
    block["kxk"]["bn"]["scale"] = jnp.ones_like(block["kxk"]["bn"]["scale"])
    block["1x1"]["bn"]["scale"] = jnp.full_like(block["1x1"]["bn"]["scale"], 0.5)
    block["1xk"]["bn"]["scale"] = jnp.full_like(block["1xk"]["bn"]["scale"], 0.01)
    block["id"]["bn"]["scale"] = jnp.full_like(block["id"]["bn"]["scale"], 0.02)
    params = set_at(params, path, block)
    stats = set_at(stats, path, randomize_stats(jax.random.PRNGKey(6), get_at(stats, path)))
    variables = {"params": params, "batch_stats": stats}
    images = normalize_images(next(batches(1, seed=3))[0], MEAN, STD)
    before = logits_of(model, variables, images)
    new, decisions = adjust(jax.random.PRNGKey(0), variables, geoms, np.zeros(0), [],
                            ctrl_config(), make_calibrate(model, geoms), grow=False,
                            cut=True)
    assert len(decisions) == 1 and decisions[0]["op"] == "cut"
    assert set(decisions[0]["branches"]) == {"1xk", "id"}
    assert set(decisions[0]["importance"]) == {"kxk", "1x1", "1x1_avg", "1xk", "id"}
    assert structure_of(new["params"])[dotted(path)] == ["1x1", "1x1_avg", "kxk"]
    after = logits_of(model, new, images)
    assert float(jnp.max(jnp.abs(before - after))) <= 1e-4 * (1 + float(jnp.max(jnp.abs(before))))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_remap_keeps_survivors_drops_removed_inits_new(tiny, name):
    model, variables, geoms = tiny
    tx = make_optimizer(name=name, schedule=cosine_schedule(0.1, 100), momentum=0.9,
                        weight_decay=1e-4, decay_bn_and_bias=False)
    params = variables["params"]
    opt = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, params)
    for _ in range(3):  # non-trivial state and step count
        _, opt = tx.update(grads, opt, params)
    path = eligible_slots(params)[1]
    new_params, _ = grow_at(jax.random.PRNGKey(0), params, variables["batch_stats"], path,
                            geoms[path], ["1x1", "id"])
    new_opt, report = remap_opt_state(tx, opt, new_params)
    old_leaves = {jax.tree_util.keystr(k): v for k, v in
                  jax.tree_util.tree_flatten_with_path(opt)[0]}
    fresh = {jax.tree_util.keystr(k): v for k, v in
             jax.tree_util.tree_flatten_with_path(tx.init(new_params))[0]}
    grown = "".join(f"['{p}']" for p in path)
    n_new = 0
    for k, v in jax.tree_util.tree_flatten_with_path(new_opt)[0]:
        key = jax.tree_util.keystr(k)
        if grown in key and ("'1x1'" in key or "'id'" in key or "'kxk'" in key):
            np.testing.assert_array_equal(v, fresh[key])  # new parameters start from init
            n_new += 1
        else:
            np.testing.assert_array_equal(v, old_leaves[key])  # survivors bit-identical
    assert n_new > 0 and report["fresh"] == n_new
    assert report["dropped"] >= 1  # the old plain kernel's state is gone
    assert not any(jax.tree_util.keystr(k).endswith(f"{grown}['kernel']")
                   for k, _ in jax.tree_util.tree_flatten_with_path(new_opt)[0])
    counts = [v for k, v in jax.tree_util.tree_flatten_with_path(new_opt)[0]
              if "count" in jax.tree_util.keystr(k)]
    assert counts and all(int(c) == 3 for c in counts)  # step count continues


def test_one_compiled_step_per_structure(tiny):
    model, variables, geoms = tiny
    cache = StepCache()

    def fn(v, x):
        return model.apply(v, x, train=False)

    x = jnp.zeros((2, *SHAPE))
    cache.get("fwd", fn, (variables, x))
    cache.get("fwd", fn, (variables, x))
    assert len(cache.compile_log) == 1
    path = eligible_slots(variables["params"])[0]
    p, s = grow_at(jax.random.PRNGKey(0), variables["params"], variables["batch_stats"], path,
                   geoms[path], ["1x1"])
    cache.get("fwd", fn, ({"params": p, "batch_stats": s}, x))
    assert len(cache.compile_log) == 2 and cache.compile_seconds > 0


def test_modes_and_dbb_initial_structure():
    with pytest.raises(ValueError, match="unknown mode 'grow'.*plain, dbb, rep, dyrep"):
        ctrl_config(mode="grow")
    assert not ctrl_config(mode="plain").grows
    assert ctrl_config(mode="rep").grows and not ctrl_config(mode="rep").cuts
    assert ctrl_config(mode="dyrep").cuts
    model = models.create_model("resnet18_cifar", num_classes=4, width=0.125,
                                with_bn_after_3x3=False)
    variables = models.init_variables(model, jax.random.PRNGKey(0), SHAPE,
                                      initial_branches=dbb_initial_branches)
    structure = structure_of(variables["params"])
    assert structure and all(b == ["1x1", "1x1_kxk", "1x1_avg", "kxk"] for b in structure.values())
    inner = eligible_slots(variables["params"])
    assert inner  # the kxk convs inside the blocks are still eligible
    for path in inner:
        assert is_block_node(get_at(variables["params"], path[:-2]))  # only kxk convs inside


def conv_same(x, kernel, pad):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def mean_of_moments(outputs):
    """Mean over batches of each batch's per-channel mean and unbiased variance (float64)."""
    flat = [np.asarray(z, np.float64).reshape(-1, z.shape[-1]) for z in outputs]
    return (np.mean([f.mean(0) for f in flat], 0), np.mean([f.var(0, ddof=1) for f in flat], 0))


def train_mode_slot_input(model, variables, x, path):
    """The input of slot `path` with the network in training mode (batch statistics)."""
    import flax.linen as nn

    found = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.scope.path) == path:
            found["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    return found["x"]


def test_network_calibration_is_the_mean_of_per_batch_moments(tiny):
    model, variables, _ = tiny
    xs = [normalize_images(i, MEAN, STD) for i, _ in batches(3, seed=11)]
    got = calibrate_network(model, variables, xs)
    for unit in (("conv1",), ("layer1_1", "conv2")):  # the stem and a BN deep inside
        path = (*unit, "conv")
        kernel = get_at(variables["params"], path)["kernel"]
        outs = [conv_same(train_mode_slot_input(model, variables, x, path), kernel, 1)
                for x in xs]
        mean, var = mean_of_moments(outs)
        bn = get_at(got, (*unit, "bn"))
        np.testing.assert_allclose(bn["mean"], mean, atol=1e-5)
        np.testing.assert_allclose(bn["var"], var, rtol=1e-4, atol=1e-6)


def test_block_calibration_is_the_mean_of_per_batch_moments(tiny):
    model, variables, geoms = tiny
    path = ("conv1", "conv")  # the stem: its input is the image itself
    params, stats = grow_at(jax.random.PRNGKey(1), variables["params"], variables["batch_stats"],
                            path, geoms[path], ["1x1", "kxk"])
    xs = [normalize_images(i, MEAN, STD) for i, _ in batches(3, seed=12)]
    got = calibrate_block(model, {"params": params, "batch_stats": stats}, path, geoms, xs)
    block = get_at(params, path)
    for branch, pad in (("kxk", 1), ("1x1", 0)):
        mean, var = mean_of_moments([conv_same(x, block[branch]["conv"]["kernel"], pad)
                                     for x in xs])
        np.testing.assert_allclose(got[branch]["bn"]["mean"], mean, atol=1e-5)
        np.testing.assert_allclose(got[branch]["bn"]["var"], var, rtol=1e-4, atol=1e-6)


def test_controller_schedule_adjusts_on_interval_and_recalibrates_between():
    def plans(**overrides):
        fields = dict(adjust_interval=2, max_adjust_epochs=5, recal_bn_every_epoch=True,
                      num_epochs=8)
        cfg = ctrl_config(**{**fields, **overrides})
        ctrl = Controller(cfg, None, SHAPE, jax.random.PRNGKey(0), batches=None,
                          replicate=None, to_host=None)
        got = [ctrl.plan(e) for e in range(1, 9)]
        return ([e for e, p in enumerate(got, 1) if p.adjust],
                [e for e, p in enumerate(got, 1) if p.recalibrate])

    assert plans() == ([2, 4], [1, 3, 5])
    assert plans(mode="plain") == ([], [1, 2, 3, 4, 5])
    assert plans(num_epochs=4) == ([2], [1, 3, 4, 5])  # never adjust after the last epoch
    assert plans(recal_bn_every_epoch=False)[1] == []


def test_controller_recalibration_uses_recal_batches_and_keeps_structure(tiny):
    model, variables, _ = tiny
    xs = [normalize_images(i, MEAN, STD) for i, _ in batches(4, seed=13)]
    asked = []

    def lend(epoch, count):
        asked.append((epoch, count))
        return iter(xs[:count])

    cfg = ctrl_config(mode="dyrep", recal_bn_every_epoch=True, recal_bn_batches=3, num_epochs=4,
                      adjust_interval=2)
    ctrl = Controller(cfg, model, SHAPE, jax.random.PRNGKey(0), batches=lend,
                      replicate=lambda t: t, to_host=lambda t: t)
    assert ctrl.plan(2).adjust and not ctrl.plan(1).adjust
    out = ctrl.after_epoch(1, variables, np.zeros(0), 4)
    assert out.plan.recalibrate and out.decisions == [] and asked == [(1, 3)]
    assert out.variables["params"] is variables["params"]
    expected = calibrate_network(model, variables, xs[:3])
    for a, b in zip(jax.tree_util.tree_leaves(out.variables["batch_stats"]),
                    jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)

"""The re-parameterization algebra: exact fusion, grow, cut, BN semantics, errors.

Tolerance: blocks and fused convs compute the same affine map with different
summation orders in float32. With O(1) inputs and outputs of magnitude ~1-10,
the rounding difference is ~1e-6 * sqrt(k*k*cin) per term; we require
max |diff| <= 1e-4 * (1 + max |y|), which a real fusion bug (a wrong pad value,
a missed BN, a transposed group) exceeds by orders of magnitude.

Blocks run here through `apply_slot_branchwise`, the branch-by-branch reference (the
one block forward with `share_1x1=False, fuse_inference=False`): the default runs an
inference-mode block *as* its fused conv (and a shared-1x1 path in training), which the
"fast paths" tests below check against it.

BN fixtures include a dead channel (running var 0) and a near-zero-variance one (1e-7)
where eps decides the scale; the structural ops are also checked in float64 (tolerance
1e-10), where a slip of ~5e-6 relative (e.g. a BN std of 1 for sqrt(1 + eps)) shows.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rep_helpers import max_abs, randomize_bn_params, randomize_stats

from dyrep_jax.rep import (
    BRANCH_NAMES,
    ConvGeometry,
    RepError,
    allowed_branches,
    branch_importance,
    child_geometry,
    cut_branches,
    dep_decision,
    fuse_slot,
    grow_slot,
    is_block,
    regrow_matching,
)
from dyrep_jax.rep.apply import apply_slot as apply_fast
from dyrep_jax.rep.apply import apply_slot_branchwise as apply_slot
from dyrep_jax.rep.apply import inner_slot_input
from dyrep_jax.rep.bn import EPS, batch_norm, bn_affine
from dyrep_jax.rep.geometry import branch_refusal
from dyrep_jax.rep.network import cut_at, grow_at, slot_depth
from dyrep_jax.rep.share import concat_channels, split_channels
from dyrep_jax.rep.tree import all_slots, get_at, set_at, structure_of

KEY = jax.random.PRNGKey(0)


def tol(y):
    return 1e-4 * (1.0 + float(jnp.max(jnp.abs(y))))


def plain_slot(key, geom, bias=True):
    k = geom.kernel_size
    kernel = jax.random.normal(key, (k, k, geom.in_channels // geom.groups, geom.out_channels))
    slot = {"kernel": kernel * 0.3}
    if bias:
        slot["bias"] = jax.random.normal(jax.random.fold_in(key, 1), (geom.out_channels,)) * 0.1
    return slot


def random_block(geom, branches, seed=0, tiny_var=True):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params, stats = grow_slot(k1, plain_slot(k1, geom), geom, branches)
    return randomize_bn_params(k2, params), randomize_stats(k3, stats, tiny_var)


def inputs(geom, size=9, seed=3, dtype=jnp.float32):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, size, size, geom.in_channels))
    return x.astype(dtype)


def assert_fuses_exactly(params, stats, geom, x):
    y, _ = apply_slot(params, stats, x, geom, train=False)
    fused = fuse_slot(params, stats)
    y_fused, _ = apply_slot(fused, {}, x, geom, train=False)
    assert y.shape == y_fused.shape
    err = max_abs(y, y_fused)
    assert err <= tol(y), err
    return err


GROUPS = {"g1": 1, "g2": 2, "dw": "dw"}


@pytest.mark.parametrize(
    "branch,groups,stride,k",
    list(itertools.product(BRANCH_NAMES, GROUPS, (1, 2), (3, 5))),
)
def test_every_branch_fuses_exactly(branch, groups, stride, k):
    g = 4 if groups == "dw" else GROUPS[groups]
    geom = ConvGeometry(4, 4, k, stride, None, g)
    if branch_refusal(geom, branch) is not None:
        assert branch == "id" and stride == 2
        with pytest.raises(RepError, match="identity"):
            grow_slot(KEY, plain_slot(KEY, geom), geom, [branch], path="net.conv")
        return
    params, stats = random_block(geom, [branch])
    assert set(params) == {branch, "kxk"}
    assert_fuses_exactly(params, stats, geom, inputs(geom))


@pytest.mark.parametrize("k,stride", [(7, 2), (7, 1), (5, 2)])
def test_all_branches_large_kernels_and_odd_sizes(k, stride):
    geom = ConvGeometry(6, 6, k, stride, None, 2)
    params, stats = random_block(geom, allowed_branches(geom), seed=5)
    for size in (7, 10, 13):
        assert_fuses_exactly(params, stats, geom, inputs(geom, size))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_padding_zero_allows_only_padding_free_branches(groups):
    geom = ConvGeometry(4, 4, 3, 1, 0, groups)
    assert allowed_branches(geom) == ("1x1_kxk", "1x1_avg", "kxk")
    params, stats = random_block(geom, allowed_branches(geom))
    y, _ = apply_slot(params, stats, inputs(geom), geom, train=False)
    assert y.shape == (2, 7, 7, 4)
    assert_fuses_exactly(params, stats, geom, inputs(geom))
    with pytest.raises(RepError, match=r"net\.c.*'1x1'.*padding 0"):
        grow_slot(KEY, plain_slot(KEY, geom), geom, ["1x1"], path="net.c")


def test_channel_changing_grouped_and_multiplier_depthwise():
    for geom in (ConvGeometry(4, 8, 3, 2, None, 4), ConvGeometry(6, 3, 3, 1, None, 3),
                 ConvGeometry(3, 9, 5, 1, None, 1)):
        params, stats = random_block(geom, allowed_branches(geom), seed=7)
        assert "id" not in params
        assert_fuses_exactly(params, stats, geom, inputs(geom))


def nested_network(geom, seed=0):
    """A one-slot 'network' with a block whose kxk conv and 1x1_kxk conv2 are blocks too."""
    key = jax.random.PRNGKey(seed)
    params = {"layer": {"conv": plain_slot(key, geom)}}
    stats = {}
    params, stats = grow_at(key, params, stats, ("layer", "conv"), geom, allowed_branches(geom))
    inner = ConvGeometry(geom.in_channels, geom.out_channels, geom.kernel_size, geom.stride,
                         geom.padding, geom.groups)
    params, stats = grow_at(jax.random.fold_in(key, 1), params, stats,
                            ("layer", "conv", "kxk", "conv"), inner, ["1x1", "1x1_avg"])
    conv2_geom = ConvGeometry(geom.in_channels, geom.out_channels, geom.kernel_size,
                              geom.stride, 0, geom.groups)
    params, stats = grow_at(jax.random.fold_in(key, 2), params, stats,
                            ("layer", "conv", "1x1_kxk", "conv2"), conv2_geom,
                            ["1x1_kxk", "1x1_avg"])
    params = randomize_bn_params(jax.random.fold_in(key, 3), params)
    stats = randomize_stats(jax.random.fold_in(key, 4), stats, tiny_var=True)
    return params, stats


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2), (4, 1)])
def test_nested_blocks_fuse_exactly(groups, stride):
    geom = ConvGeometry(4, 4, 3, stride, None, groups)
    params, stats = nested_network(geom)
    slots = dict(all_slots(params))
    assert slots[("layer", "conv", "kxk", "conv")] == 1
    assert slots[("layer", "conv", "1x1_kxk", "conv2", "kxk", "conv")] == 2
    assert structure_of(params)["layer.conv.kxk.conv"] == ["1x1", "1x1_avg", "kxk"]
    slot_p, slot_s = params["layer"]["conv"], stats["layer"]["conv"]
    assert_fuses_exactly(slot_p, slot_s, geom, inputs(geom))


def test_nesting_deeper_than_two_is_refused():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = nested_network(geom)
    deep = ("layer", "conv", "kxk", "conv", "kxk", "conv")
    assert slot_depth(params, deep) == 2
    with pytest.raises(RepError, match=r"layer\.conv\.kxk\.conv\.kxk\.conv.*nesting depth"):
        grow_at(KEY, params, stats, deep, geom, ["1x1"])


def test_grow_preserves_inference_output_with_calibrated_stats():
    geom = ConvGeometry(4, 8, 3, 1, None, 2)
    old = plain_slot(KEY, geom)
    x = inputs(geom)
    y_old, _ = apply_slot(old, {}, x, geom, train=False)
    block, stats = grow_slot(KEY, old, geom, allowed_branches(geom))
    y_new, _ = apply_slot(block, stats, x, geom, train=False)
    assert max_abs(y_old, y_new) <= tol(y_old)
    # calibration changes the new branches' statistics; re-matching kxk restores the function
    _, batch_stats = apply_slot(block, stats, x, geom, train=True, momentum=1.0)
    block, stats = regrow_matching(block, batch_stats, old)
    y_cal, _ = apply_slot(block, stats, x, geom, train=False)
    assert max_abs(y_old, y_cal) <= tol(y_old)
    assert float(jnp.abs(stats["1x1"]["bn"]["var"] - 1.0).max()) > 1e-3  # stats really moved
    np.testing.assert_allclose(block["1x1"]["bn"]["scale"], 0.01)
    np.testing.assert_allclose(block["1x1_kxk"]["bn1"]["scale"], 1.0)


def test_new_branch_init_follows_reference():
    geom = ConvGeometry(16, 32, 3, 1, None, 1)
    block, _ = grow_slot(KEY, plain_slot(KEY, geom), geom, ["1x1", "1x1_kxk"])
    std = float(jnp.std(block["1x1_kxk"]["conv2"]["kernel"]))
    assert abs(std - np.sqrt(2.0 / (3 * 3 * 32))) < 0.2 * np.sqrt(2.0 / (3 * 3 * 32))
    np.testing.assert_allclose(block["1x1_kxk"]["bn2"]["scale"], 0.01)
    np.testing.assert_allclose(block["1x1"]["bn"]["bias"], 0.0)


@pytest.mark.parametrize("names", [("1x1",), ("id", "1x1_avg"), ("1xk", "kx1", "1x1_kxk")])
def test_cut_preserves_output(names):
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = random_block(geom, allowed_branches(geom), seed=11)
    x = inputs(geom)
    y, _ = apply_slot(params, stats, x, geom, train=False)
    new_p, new_s = cut_branches(params, stats, names)
    assert not set(names) & set(new_p)
    y2, _ = apply_slot(new_p, new_s, x, geom, train=False)
    assert max_abs(y, y2) <= tol(y)


def test_cut_to_kxk_only_reverts_to_plain_slot_with_bias():
    geom = ConvGeometry(4, 4, 5, 2, None, 2)
    params, stats = random_block(geom, allowed_branches(geom), seed=12)
    x = inputs(geom)
    y, _ = apply_slot(params, stats, x, geom, train=False)
    rest = [b for b in params if b != "kxk"]
    plain, plain_stats = cut_branches(params, stats, rest)
    assert set(plain) == {"kernel", "bias"} and plain_stats == {}
    assert max_abs(y, apply_slot(plain, {}, x, geom, train=False)[0]) <= tol(y)
    regrown, regrown_stats = grow_slot(KEY, plain, geom, ["1x1"])  # eligible to grow again
    assert max_abs(y, apply_slot(regrown, regrown_stats, x, geom, train=False)[0]) <= tol(y)


def test_cut_with_zero_kxk_gamma_stays_exact():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = random_block(geom, ["1x1", "id"], seed=13)
    params["kxk"]["bn"]["scale"] = params["kxk"]["bn"]["scale"].at[0].set(0.0)
    x = inputs(geom)
    y, _ = apply_slot(params, stats, x, geom, train=False)
    new_p, new_s = cut_branches(params, stats, ["1x1"])
    assert max_abs(y, apply_slot(new_p, new_s, x, geom, train=False)[0]) <= tol(y)


def test_cut_in_nested_network_folds_or_keeps_the_inner_block():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = nested_network(geom)
    x = inputs(geom)
    path = ("layer", "conv")
    y, _ = apply_slot(get_at(params, path), get_at(stats, path), x, geom, train=False)
    # cutting every branch but kxk leaves one plain conv, the nested block folded in
    others = [b for b in get_at(params, path) if b != "kxk"]
    new_p, new_s = cut_at(params, stats, path, others)
    slot = get_at(new_p, path)
    assert set(slot) == {"kernel", "bias"} and get_at(new_s, path) is None
    assert max_abs(y, apply_slot(slot, {}, x, geom, train=False)[0]) <= tol(y)
    # cutting some: the nested kxk block keeps its branches, its kxk takes the remainder
    new_p, new_s = cut_at(params, stats, path, ["1x1", "id"])
    slot, slot_s = get_at(new_p, path), get_at(new_s, path)
    inner = slot["kxk"]["conv"]
    assert set(inner) == {"1x1", "1x1_avg", "kxk"}
    for name in ("1x1", "1x1_avg"):
        old = get_at(params, (*path, "kxk", "conv", name))
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, inner[name], old))
    for bn_p, bn_s in ((slot["kxk"]["bn"], slot_s["kxk"]["bn"]),
                       (inner["kxk"]["bn"], slot_s["kxk"]["conv"]["kxk"]["bn"])):
        assert_identity_bn(bn_p, bn_s)
    assert max_abs(y, apply_slot(slot, slot_s, x, geom, train=False)[0]) <= tol(y)
    # cutting inside the nested block keeps the whole slot's function
    new_p, new_s = cut_at(params, stats, (*path, "kxk", "conv"), ["1x1"])
    y3, _ = apply_slot(get_at(new_p, path), get_at(new_s, path), x, geom, train=False)
    assert max_abs(y, y3) <= tol(y)


def assert_identity_bn(bn_p, bn_s):
    """gamma 1, beta 0, mean 0 and var + eps == 1 exactly: BN(z) == z in inference mode."""
    a, c = bn_affine(bn_p, bn_s["mean"], bn_s["var"], EPS)
    assert bool(jnp.all(a == 1.0)) and bool(jnp.all(c == 0.0))
    assert bool(jnp.all(bn_p["scale"] == 1.0)) and bool(jnp.all(bn_s["mean"] == 0.0))


def test_train_mode_bn_matches_pytorch_semantics():
    geom = ConvGeometry(3, 3, 3, 1, None, 1)
    params, stats = random_block(geom, ["id"], seed=2)
    x = inputs(geom)
    _, new_stats = apply_slot(params, stats, x, geom, train=True)
    xs = np.asarray(x).reshape(-1, 3)
    expect_mean = 0.9 * np.asarray(stats["id"]["bn"]["mean"]) + 0.1 * xs.mean(0)
    expect_var = 0.9 * np.asarray(stats["id"]["bn"]["var"]) + 0.1 * xs.var(0, ddof=1)
    np.testing.assert_allclose(new_stats["id"]["bn"]["mean"], expect_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_stats["id"]["bn"]["var"], expect_var, rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(stats)


def test_train_mode_output_uses_batch_statistics():
    geom = ConvGeometry(3, 3, 3, 1, None, 1)
    params, stats = random_block(geom, ["id"], seed=2)
    params["kxk"]["bn"]["scale"] = jnp.zeros(3)
    params["kxk"]["bn"]["bias"] = jnp.zeros(3)
    params["id"]["bn"] = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    y, _ = apply_slot(params, stats, inputs(geom), geom, train=True)
    flat = np.asarray(y).reshape(-1, 3)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-3)


def test_bfloat16_apply_runs_and_stays_close():
    geom = ConvGeometry(8, 8, 3, 1, None, 1)
    params, stats = random_block(geom, allowed_branches(geom), seed=4, tiny_var=False)
    x = inputs(geom)
    y32, _ = apply_slot(params, stats, x, geom, train=False)
    y16, st16 = apply_slot(params, stats, x.astype(jnp.bfloat16), geom, train=True)
    y16_inf, _ = apply_slot(params, stats, x.astype(jnp.bfloat16), geom, train=False)
    assert y16_inf.dtype == jnp.bfloat16
    assert st16["kxk"]["bn"]["mean"].dtype == jnp.float32
    rel = max_abs(y32, y16_inf) / float(jnp.max(jnp.abs(y32)))
    assert rel < 0.05, rel


def test_branch_importance_and_dep_rule():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, _ = grow_slot(KEY, plain_slot(KEY, geom), geom, ["1x1", "1x1_avg", "id"])
    params["kxk"]["bn"]["scale"] = jnp.full(4, 2.0)
    params["1x1"]["bn"]["scale"] = jnp.full(4, 1.0)
    params["1x1_avg"]["avgbn"]["scale"] = jnp.array([0.1, -0.1, 0.1, -0.1])
    params["id"]["bn"]["scale"] = jnp.full(4, 0.6)
    imp = branch_importance(params)
    assert imp == pytest.approx({"kxk": 1.0, "1x1": 0.5, "1x1_avg": 0.05, "id": 0.3})
    assert dep_decision(imp, 0.02, 0.1) == ["1x1_avg"]
    assert dep_decision(imp, 0.02, 0.01) == []
    assert dep_decision({"1x1": 0.05, "id": 0.06}, 0.02, 0.1) == []  # unbiased std 0.0071
    assert dep_decision({"1x1": 0.05, "id": 0.09}, 0.02, 0.1) == ["1x1"]  # 0.028; pop. 0.02
    assert dep_decision({"kxk": 1.0, "1x1": 0.05}, 0.02, 0.1) == []  # one valid value
    # an importance of exactly 1 is not a valid value (here: leaves one, so no cut)
    assert dep_decision({"1x1": 1.0, "id": 0.01}, 0.02, 0.1) == []


def reference_dep(vector, std_threshold, abs_threshold):
    """The reference's rule on its 7-vector (order BRANCH_NAMES, -1 = absent, kxk = 1):
    valid = non-kxk entries that are neither -1 nor exactly 1; no cut unless the sample
    std (n - 1; NaN, so no cut, with under 2 values) exceeds the threshold; then cut
    every present non-kxk branch below the valid mean and below `abs_threshold`."""
    kxk = BRANCH_NAMES.index("kxk")
    valid = [v for i, v in enumerate(vector) if i != kxk and v not in (-1.0, 1.0)]
    if len(valid) < 2 or not np.std(valid, ddof=1) > std_threshold:
        return []
    mean = np.mean(valid)
    return [BRANCH_NAMES[i] for i, v in enumerate(vector)
            if i != kxk and v != -1.0 and v < mean and v < abs_threshold]


def random_importance_vector(rng):
    kxk = BRANCH_NAMES.index("kxk")
    vector = [1.0 if i == kxk else -1.0 for i in range(len(BRANCH_NAMES))]
    others = [i for i in range(len(BRANCH_NAMES)) if i != kxk]
    present = rng.choice(others, size=rng.integers(0, len(others) + 1), replace=False)
    for i in present:
        r = rng.random()
        vector[i] = 1.0 if r < 0.15 else float(rng.uniform(0, 0.2) if r < 0.8 else rng.uniform(0, 2))
    return vector


def test_dep_decision_agrees_with_reference_rule_on_random_vectors():
    rng = np.random.default_rng(0)
    seen = {"cut": 0, "no cut": 0, "has exact 1": 0, "single valid": 0, "absent": 0}
    for _ in range(1500):
        vector = random_importance_vector(rng)
        std_thr = 0.02 if rng.random() < 0.5 else float(rng.uniform(0, 0.1))
        abs_thr = 0.1 if rng.random() < 0.5 else float(rng.uniform(0, 0.5))
        importances = {b: v for b, v in zip(BRANCH_NAMES, vector, strict=True) if v != -1.0}
        ours = dep_decision(importances, std_thr, abs_thr)
        assert ours == reference_dep(vector, std_thr, abs_thr), (vector, std_thr, abs_thr)
        without_kxk = {b: v for b, v in importances.items() if b != "kxk"}
        assert dep_decision(without_kxk, std_thr, abs_thr) == ours  # kxk optional
        valid = [v for b, v in without_kxk.items() if v != 1.0]
        seen["cut" if ours else "no cut"] += 1
        seen["has exact 1"] += 1.0 in without_kxk.values()
        seen["single valid"] += len(valid) == 1
        seen["absent"] += len(importances) < len(BRANCH_NAMES)
    assert min(seen.values()) >= 100, seen


def test_bad_input_errors_name_slot_branch_and_reason():
    geom = ConvGeometry(4, 8, 3, 1, None, 1)
    slot = plain_slot(KEY, geom)
    with pytest.raises(RepError, match=r"stem\.conv: branch 'id' not allowed: identity needs"):
        grow_slot(KEY, slot, geom, ["id"], path="stem.conv")
    with pytest.raises(RepError, match=r"stem\.conv: branch '3x3' not allowed: unknown branch"):
        grow_slot(KEY, slot, geom, ["3x3"], path="stem.conv")
    wrong = ConvGeometry(4, 16, 3, 1, None, 1)
    with pytest.raises(RepError, match=r"stem\.conv: kernel shape .* does not match"):
        grow_slot(KEY, slot, wrong, ["1x1"], path="stem.conv")
    with pytest.raises(RepError, match=r"groups=3 must divide"):
        grow_slot(KEY, slot, ConvGeometry(4, 8, 3, 1, None, 3), ["1x1"], path="stem.conv")
    block, stats = grow_slot(KEY, slot, geom, ["1x1"])
    with pytest.raises(RepError, match="already a block"):
        grow_slot(KEY, block, geom, ["1x1"])
    with pytest.raises(RepError, match=r"'kxk' is the main branch"):
        cut_branches(block, stats, ["kxk"])
    with pytest.raises(RepError, match=r"'1xk' is not in this block"):
        cut_branches(block, stats, ["1xk"])


def test_set_at_is_pure():
    tree = {"a": {"b": 1, "c": 2}}
    new = set_at(tree, ("a", "b"), 5)
    assert tree == {"a": {"b": 1, "c": 2}} and new == {"a": {"b": 5, "c": 2}}
    assert set_at(tree, ("a", "b"), {}) == {"a": {"c": 2}}


@st.composite
def geometry_and_branches(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    cout = cin if depthwise else groups * draw(st.integers(1, 3))
    if depthwise:
        groups = cin
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([None, 0])) if k > 1 else None
    geom = ConvGeometry(cin, cout, k, stride, padding, groups)
    allowed = [b for b in allowed_branches(geom) if b != "kxk"]
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True)) if allowed else []
    to_cut = draw(st.lists(st.sampled_from(chosen), unique=True)) if chosen else []
    size = draw(st.integers(max(k, 3), 9))
    return geom, chosen, to_cut, size, draw(st.integers(0, 1000))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry_and_branches())
def test_property_random_geometries_fuse_and_cut_exactly(case):
    geom, chosen, to_cut, size, seed = case
    params, stats = random_block(geom, chosen, seed=seed)
    x = inputs(geom, size, seed=seed)
    assert_fuses_exactly(params, stats, geom, x)
    if to_cut:
        y, _ = apply_slot(params, stats, x, geom, train=False)
        new_p, new_s = cut_branches(params, stats, to_cut)
        assert max_abs(y, apply_slot(new_p, new_s, x, geom, train=False)[0]) <= tol(y)


# ----------------------------------------------------------------------------- fast paths
# The default block forward (shared 1x1 conv + BN in training, fused conv at inference)
# must equal the branchwise reference, outputs and running statistics, for every branch
# kind, groups, stride, padding and nesting. Inference runs the fused conv, so these are
# also checks that fusion is exact.


def assert_fast_equals_branchwise(params, stats, geom, share_1x1=True, dtype=jnp.float32):
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 9, 9, geom.in_channels)).astype(dtype)
    for train in (True, False):
        y, st = apply_fast(params, stats, x, geom, train, share_1x1=share_1x1)
        y_ref, st_ref = apply_slot(params, stats, x, geom, train)
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
        scale = 1.0 + float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
        bound = (1e-4 if dtype == jnp.float32 else 3e-2) * scale
        assert max_abs(y, y_ref) <= bound, (train, max_abs(y, y_ref))
        assert jax.tree_util.tree_structure(st) == jax.tree_util.tree_structure(stats)
        for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st_ref),
                        strict=True):
            assert a.dtype == jnp.float32
            assert max_abs(a, b) <= 1e-4 * (1.0 + float(jnp.max(jnp.abs(b)))), train


@pytest.mark.parametrize("groups,stride,k", list(itertools.product((1, 2, "dw"), (1, 2), (3, 5))))
@pytest.mark.parametrize("share", [True, False])
def test_fast_block_equals_branchwise_all_branches(groups, stride, k, share):
    g = 4 if groups == "dw" else groups
    geom = ConvGeometry(4, 4, k, stride, None, g)
    params, stats = random_block(geom, allowed_branches(geom), seed=k + stride)
    assert_fast_equals_branchwise(params, stats, geom, share)


@pytest.mark.parametrize("branches", [("1x1",), ("1x1_kxk",), ("1x1_avg",), ("1x1", "1x1_kxk"),
                                      ("1x1", "1x1_avg"), ("1x1_kxk", "1x1_avg"), ("id",)])
def test_fast_block_equals_branchwise_subsets(branches):
    geom = ConvGeometry(4, 8, 3, 1, None, 2) if "id" not in branches else \
        ConvGeometry(6, 6, 3, 1, None, 3)
    params, stats = random_block(geom, branches, seed=11)
    assert_fast_equals_branchwise(params, stats, geom)


@pytest.mark.parametrize("geom", [ConvGeometry(4, 4, 3, 1, 0, 2), ConvGeometry(4, 8, 3, 2, None, 4),
                                  ConvGeometry(3, 9, 5, 1, None, 1)])
def test_fast_block_equals_branchwise_padding_and_channel_changes(geom):
    params, stats = random_block(geom, allowed_branches(geom), seed=5)
    assert_fast_equals_branchwise(params, stats, geom)


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_fast_block_equals_branchwise_nested(groups, stride):
    geom = ConvGeometry(4, 4, 3, stride, None, groups)
    params, stats = nested_network(geom)
    slot_p, slot_s = params["layer"]["conv"], stats["layer"]["conv"]
    assert_fast_equals_branchwise(slot_p, slot_s, geom)
    assert_fast_equals_branchwise(slot_p, slot_s, geom, share_1x1=False)


def test_fast_block_bfloat16_close_to_branchwise():
    geom = ConvGeometry(8, 8, 3, 1, None, 1)
    params, stats = random_block(geom, allowed_branches(geom), seed=4, tiny_var=False)
    assert_fast_equals_branchwise(params, stats, geom, dtype=jnp.bfloat16)


def test_grouped_concat_round_trips():
    a = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)
    b = -jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4)
    for groups in (1, 2):
        joined = concat_channels([a, b], groups)
        assert joined.shape == (2, 10)
        back = split_channels(joined, [6, 4], groups)
        assert max_abs(back[0], a) == 0.0 and max_abs(back[1], b) == 0.0
    # group-major: group 0 holds a's first 3 and b's first 2 channels
    assert concat_channels([a, b], 2)[0].tolist() == [0, 1, 2, 0, -1, 3, 4, 5, -2, -3]


def test_inner_slot_input_is_what_the_nested_slot_sees():
    """The captured input of a nested slot, run through it, rebuilds the branch's output."""
    geom = ConvGeometry(4, 4, 3, 2, None, 2)
    params, stats = nested_network(geom)
    slot_p, slot_s = params["layer"]["conv"], stats["layer"]["conv"]
    x = inputs(geom)
    z = inner_slot_input(slot_p, slot_s, x, geom, ["1x1_kxk"])
    assert z.shape == (2, 11, 11, 4)  # BN-padded by k // 2
    conv2 = ("1x1_kxk", "conv2")
    inner, _ = apply_slot(get_at(slot_p, conv2), get_at(slot_s, conv2), z,
                          child_geometry(geom, "1x1_kxk"), train=False)
    bn2 = slot_p["1x1_kxk"]["bn2"], slot_s["1x1_kxk"]["bn2"]
    y_branch = inner * bn_affine(bn2[0], bn2[1]["mean"], bn2[1]["var"])[0] + \
        bn_affine(bn2[0], bn2[1]["mean"], bn2[1]["var"])[1]
    only = {"kxk": slot_p["kxk"], "1x1_kxk": slot_p["1x1_kxk"]}
    zero_kxk = {**slot_p["kxk"], "bn": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)}}
    y_ref, _ = apply_slot({**only, "kxk": zero_kxk}, slot_s, x, geom, train=False)
    assert max_abs(y_branch, y_ref) <= tol(y_ref)
    deep = inner_slot_input(slot_p, slot_s, x, geom, ["1x1_kxk", "kxk"])
    assert max_abs(deep, z) == 0.0  # a kxk passes its input through
    with pytest.raises(RepError, match="holds no nestable conv"):
        inner_slot_input(slot_p, slot_s, x, geom, ["1x1"])


# ----------------------------------------------------------------------------- state after a cut


def test_cut_leaves_identity_kxk_bn_and_raw_gamma_importances():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = random_block(geom, allowed_branches(geom), seed=21)
    x = inputs(geom)
    y, _ = apply_slot(params, stats, x, geom, train=False)
    new_p, new_s = cut_branches(params, stats, ["1x1", "1xk"])
    assert set(new_p) == {"1x1_kxk", "1x1_avg", "kxk", "kx1", "id"}
    assert_identity_bn(new_p["kxk"]["bn"], new_s["kxk"]["bn"])
    assert set(new_p["kxk"]["conv"]) == {"kernel", "bias"}
    for name in ("1x1_kxk", "1x1_avg", "kx1", "id"):  # the kept branches are untouched
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, new_p[name],
                                                             params[name]))
    importance = branch_importance(new_p)  # now ratios to 1: the raw last-BN gamma means
    for name, bn in (("1x1_kxk", "bn2"), ("1x1_avg", "avgbn"), ("kx1", "bn"), ("id", "bn")):
        raw = float(np.mean(np.abs(np.asarray(params[name][bn]["scale"], np.float64))))
        assert importance[name] == raw
    assert max_abs(y, apply_slot(new_p, new_s, x, geom, train=False)[0]) <= tol(y)


def test_bn_inference_uses_eps_on_dead_and_near_zero_channels():
    params = {"scale": jnp.array([1.0, 0.7, 1.3]), "bias": jnp.array([0.1, -0.2, 0.3])}
    stats = {"mean": jnp.array([0.5, -0.1, 0.2]), "var": jnp.array([0.0, 1e-7, 1.0])}
    x = jax.random.normal(KEY, (2, 3, 3, 3))
    y, _, _ = batch_norm(params, stats, x, False)
    p = {k: np.asarray(v, np.float64) for k, v in {**params, **stats}.items()}
    expect = (np.asarray(x, np.float64) - p["mean"]) / np.sqrt(p["var"] + 1e-5) * p["scale"] \
        + p["bias"]
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- float64
# Grow, cut and fusion claim exactness; in float64 their error is ~1e-13, so a slip of
# 1 - 1/sqrt(1 + eps) ~ 5e-6 (a BN reset to var 1 and read as std 1) fails 1e-10.
X64_TOL = 1e-10


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def assert_exact64(y, y_ref):
    assert y.dtype == jnp.float64 and y_ref.dtype == jnp.float64
    err = float(jnp.max(jnp.abs(y - y_ref)))
    assert err <= X64_TOL * (1.0 + float(jnp.max(jnp.abs(y_ref)))), err


@pytest.mark.parametrize("geom", [ConvGeometry(4, 4, 3, 1, None, 1),
                                  ConvGeometry(4, 8, 5, 2, None, 2)])
def test_grow_fuse_and_cut_are_exact_in_float64(x64, geom):
    old = to64(plain_slot(KEY, geom))
    x = inputs(geom, dtype=jnp.float64)
    y_old, _ = apply_slot(old, {}, x, geom, train=False)
    block, stats = grow_slot(KEY, old, geom, allowed_branches(geom))
    block = to64(randomize_bn_params(jax.random.PRNGKey(1), block))
    stats = to64(randomize_stats(jax.random.PRNGKey(2), stats, tiny_var=True))
    block, stats = regrow_matching(block, to64(stats), old)  # grow's rebalance, calibrated
    y, _ = apply_slot(block, to64(stats), x, geom, train=False)
    assert_exact64(y, y_old)
    fused = fuse_slot(block, to64(stats))
    assert_exact64(apply_slot(fused, {}, x, geom, train=False)[0], y_old)
    cut_p, cut_s = cut_branches(block, to64(stats), ["1x1", "1x1_avg"])
    assert_exact64(apply_slot(cut_p, cut_s, x, geom, train=False)[0], y_old)
    rest = [b for b in cut_p if b != "kxk"]
    plain, _ = cut_branches(cut_p, cut_s, rest)
    assert set(plain) == {"kernel", "bias"}
    assert_exact64(apply_slot(plain, {}, x, geom, train=False)[0], y_old)


def test_nested_cut_and_fuse_are_exact_in_float64(x64):
    geom = ConvGeometry(4, 4, 3, 1, None, 2)
    params, stats = to64(nested_network(geom))
    slot_p, slot_s = params["layer"]["conv"], stats["layer"]["conv"]
    x = inputs(geom, dtype=jnp.float64)
    y, _ = apply_slot(slot_p, slot_s, x, geom, train=False)
    assert_exact64(apply_slot(fuse_slot(slot_p, slot_s), {}, x, geom, train=False)[0], y)
    cut_p, cut_s = cut_branches(slot_p, slot_s, ["1x1", "id", "1xk"])
    assert is_block(cut_p["kxk"]["conv"])
    assert_exact64(apply_slot(cut_p, cut_s, x, geom, train=False)[0], y)
    plain, _ = cut_branches(cut_p, cut_s, [b for b in cut_p if b != "kxk"])
    assert_exact64(apply_slot(plain, {}, x, geom, train=False)[0], y)

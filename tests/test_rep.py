"""The re-parameterization algebra: exact fusion, grow, cut, BN semantics, errors.

Tolerance: blocks and fused convs compute the same affine map with different
summation orders in float32. With O(1) inputs and outputs of magnitude ~1-10,
the rounding difference is ~1e-6 * sqrt(k*k*cin) per term; we require
max |diff| <= 1e-4 * (1 + max |y|), which a real fusion bug (a wrong pad value,
a missed BN, a transposed group) exceeds by orders of magnitude.

Blocks run here through `apply_slot_branchwise`, the branch-by-branch reference:
the default `apply_slot` runs an inference-mode block *as* its fused conv (and a
faster shared-1x1 path in training), which tests/test_bench.py checks against it.
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
    cut_branches,
    dep_decision,
    fuse_slot,
    grow_slot,
    regrow_matching,
)
from dyrep_jax.rep.apply import apply_slot_branchwise as apply_slot
from dyrep_jax.rep.geometry import branch_refusal
from dyrep_jax.rep.network import cut_at, grow_at, slot_depth
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


def random_block(geom, branches, seed=0):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params, stats = grow_slot(k1, plain_slot(k1, geom), geom, branches)
    return randomize_bn_params(k2, params), randomize_stats(k3, stats)


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
    stats = randomize_stats(jax.random.fold_in(key, 4), stats)
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


def test_cut_with_tiny_kxk_gamma_uses_exact_fallback():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = random_block(geom, ["1x1", "id"], seed=13)
    params["kxk"]["bn"]["scale"] = params["kxk"]["bn"]["scale"].at[0].set(0.0)
    x = inputs(geom)
    y, _ = apply_slot(params, stats, x, geom, train=False)
    new_p, new_s = cut_branches(params, stats, ["1x1"])
    assert max_abs(y, apply_slot(new_p, new_s, x, geom, train=False)[0]) <= tol(y)


def test_cut_in_nested_network_and_dissolve_into_inner_block():
    geom = ConvGeometry(4, 4, 3, 1, None, 1)
    params, stats = nested_network(geom)
    x = inputs(geom)
    path = ("layer", "conv")
    y, _ = apply_slot(get_at(params, path), get_at(stats, path), x, geom, train=False)
    # cutting every branch but kxk leaves the nested block, with the outer BN folded in
    others = [b for b in get_at(params, path) if b != "kxk"]
    new_p, new_s = cut_at(params, stats, path, others)
    slot = get_at(new_p, path)
    assert set(slot) == {"1x1", "1x1_avg", "kxk"}
    assert max_abs(y, apply_slot(slot, get_at(new_s, path), x, geom, train=False)[0]) <= tol(y)
    # cutting inside the nested block absorbs through the outer kxk BN
    new_p, new_s = cut_at(params, stats, (*path, "kxk", "conv"), ["1x1"])
    y3, _ = apply_slot(get_at(new_p, path), get_at(new_s, path), x, geom, train=False)
    assert max_abs(y, y3) <= tol(y)


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
    params, stats = random_block(geom, allowed_branches(geom), seed=4)
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
    assert imp == pytest.approx({"1x1": 0.5, "1x1_avg": 0.05, "id": 0.3})
    assert dep_decision(imp) == ("1x1_avg",)
    assert dep_decision(imp, abs_threshold=0.01) == ()
    assert dep_decision({"1x1": 0.05, "id": 0.06}) == ()  # std 0.005 <= 0.02
    assert dep_decision({"1x1": 0.05}) == ()


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

"""Synflow through a train-mode BN: the identity, its stable form, and the step-side plumbing.

The identity sum(grad_W * W) = sum_c gamma_c dL/dgamma_c eps / (s_c^2 + eps) is checked
against float64 `jax.grad` of an independent conv + BN written here (not the project's
BN), for plain, strided, grouped, depthwise and biased convs, and for the slots nested in
a grown block (there through the project's `apply_slot`, its float32 casts widened to
float64 for the reference). Weight scales are chosen so eps/(s^2+eps) is neither ~0
nor ~1: dropping eps from the identity (or calling the score zero) fails these tests.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyrep_jax import models, saliency
from dyrep_jax.dyrep import eligible_slots
from dyrep_jax.models import layers as model_layers
from dyrep_jax.models import norm as model_norm
from dyrep_jax.rep import EPS, ConvGeometry, apply_slot, grow_slot
from dyrep_jax.rep import bn as rep_bn
from dyrep_jax.rep import kernels as rep_kernels
from dyrep_jax.rep import ops as rep_ops
from dyrep_jax.rep import share as rep_share
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.tree import get_at


class _WideNumpy:
    """jax.numpy with float32 meaning float64: widens the rep modules' explicit casts."""

    def __getattr__(self, name):
        return jnp.float64 if name == "float32" else getattr(jnp, name)


@contextlib.contextmanager
def float64_rep():
    """x64 on, and the rep modules' float32 casts made float64 (reference runs only)."""
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


def conv_bn_relu_loss(kernel, bias, gamma, beta, x, head, stride, groups):
    """An independent conv -> train-mode BN (biased var) -> ReLU -> pooled head -> loss."""
    k = kernel.shape[0]
    z = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((k // 2, k // 2),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups) + bias
    mean = jnp.mean(z, axis=(0, 1, 2))
    var = jnp.mean((z - mean) ** 2, axis=(0, 1, 2))
    y = jax.nn.relu(gamma * (z - mean) / jnp.sqrt(var + EPS) + beta)
    logits = jnp.mean(y, axis=(1, 2)) @ head
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]), var


def random_layer(seed, cin, cout, groups, scale, with_bias, dtype):
    """A conv whose output variance is about scale^2 * eps (inputs are unit normal)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    std = scale * np.sqrt(EPS / (9 * cin // groups))
    kernel = jax.random.normal(keys[0], (3, 3, cin // groups, cout), dtype) * std
    bias = (jax.random.normal(keys[1], (cout,), dtype) if with_bias else jnp.zeros(cout, dtype))
    gamma = jax.random.uniform(keys[2], (cout,), dtype, 0.5, 1.5)
    beta = jax.random.normal(keys[3], (cout,), dtype) * 0.3
    x = jax.random.normal(keys[4], (4, 8, 8, cin), dtype)
    head = jax.random.normal(keys[5], (cout, 5), dtype)
    return kernel, bias, gamma, beta, x, head


LAYERS = {  # name: (cin, cout, stride, groups, output std / sqrt(eps), conv bias)
    "plain": (6, 8, 1, 1, 1.0, False),
    "strided": (6, 8, 2, 1, 2.0, False),
    "grouped": (6, 8, 1, 2, 0.7, False),
    "depthwise": (8, 8, 1, 8, 1.0, False),
    "biased": (6, 8, 1, 1, 1.5, True),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_identity_matches_float64_grad(name):
    cin, cout, stride, groups, scale, with_bias = LAYERS[name]
    with jax.enable_x64(True):
        kernel, bias, gamma, beta, x, head = random_layer(1, cin, cout, groups, scale, with_bias,
                                                          jnp.float64)
        grad_fn = jax.grad(conv_bn_relu_loss, argnums=(0, 2), has_aux=True)
        (g_kernel, g_gamma), var = grad_fn(kernel, bias, gamma, beta, x, head, stride, groups)
        naive = float(jnp.sum(g_kernel * kernel))
        stable = float(saliency.synflow_through_bn(gamma, g_gamma, var.astype(jnp.float32)))
        exact = float(jnp.sum(gamma * g_gamma * EPS / (var + EPS)))
        without_eps = float(jnp.sum(gamma * g_gamma))
        factor = np.asarray(EPS / (var + EPS))
    assert np.isclose(naive, exact, rtol=1e-9, atol=0), (naive, exact)
    assert np.isclose(naive, stable, rtol=1e-5, atol=0), (naive, stable)
    assert 0.05 < factor.mean() < 0.95, factor  # eps matters here: both limits are wrong
    assert abs(naive) > 1e-6 and not np.isclose(naive, without_eps, rtol=0.05)


def test_float32_stable_equals_float64_naive_where_float32_naive_drifts():
    """s^2 >> eps: the naive float32 sum is cancellation; the stable one is not."""
    cin, cout = 16, 16
    with jax.enable_x64(True):
        args64 = random_layer(2, cin, cout, 1, 300.0, False, jnp.float64)
        grad_fn = jax.grad(conv_bn_relu_loss, argnums=(0, 2), has_aux=True)
        (g_kernel, _), _ = grad_fn(*args64, 1, 1)
        truth = float(jnp.sum(g_kernel * args64[0]))
        args32 = [np.asarray(a, np.float32) for a in args64]
    grad_fn = jax.grad(conv_bn_relu_loss, argnums=(0, 2), has_aux=True)
    (g_kernel, g_gamma), var = grad_fn(*[jnp.asarray(a) for a in args32], 1, 1)
    naive32 = float(saliency.synflow_naive(g_kernel, jnp.asarray(args32[0])))
    stable32 = float(saliency.synflow_through_bn(jnp.asarray(args32[2]), g_gamma, var))
    assert np.isclose(stable32, truth, rtol=1e-3), (stable32, truth)
    print(f"true {truth:.4e}  float32 naive {naive32:.4e}  float32 stable {stable32:.4e}")


def test_batch_var_recovered_from_running_update():
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (16, 4, 4, 5)) * jnp.array([1e-3, 0.01, 0.1, 1.0, 3.0])
    _, var = rep_bn.batch_moments(z)
    n = z.size // z.shape[-1]
    before = {"mean": jnp.zeros(5), "var": jnp.array([1.0, 0.5, 2.0, 1.0, 9.0])}
    _, after, _ = rep_bn.batch_norm({"scale": jnp.ones(5), "bias": jnp.zeros(5)}, before, z,
                                    True)
    recovered = saliency.batch_var_from_update(before["var"], after["var"], n)
    np.testing.assert_allclose(recovered, var, rtol=1e-5,
                               atol=5 * 2.0**-24 * float(after["var"].max()) * 1.01)


GROWN = ConvGeometry(6, 8, 3, 1, None, 1)
NESTED = (("kxk", "conv"), ("1x1_kxk", "conv2"))


def grown_block_scores(dtype):
    """(naive in `dtype`, stable) synflow of the block's nested slots, one train step."""
    key = jax.random.split(jax.random.PRNGKey(3), 4)
    f32 = jnp.float32  # draw in float32 either way: the same numbers for both runs
    plain = {"kernel": jax.random.normal(key[0], (3, 3, 6, 8), f32) * 0.05}
    block, stats = grow_slot(key[1], plain, GROWN, ("1x1", "1x1_kxk", "kxk"))
    cast = lambda t: jax.tree_util.tree_map(lambda a: a.astype(dtype), t)  # noqa: E731
    block, stats = cast(block), cast(stats)
    x = jax.random.normal(key[2], (4, 8, 8, 6), f32).astype(dtype)
    head = jax.random.normal(key[3], (8, 5), f32).astype(dtype)

    def loss(p):
        y, new_stats = apply_slot(p, stats, x, GROWN, True)
        logits = jnp.mean(jax.nn.relu(y), axis=(1, 2)) @ head
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), new_stats

    grads, new_stats = jax.grad(loss, has_aux=True)(block)
    paths = list(NESTED)
    counts = saliency.bn_counts({(): (GROWN, x.shape)}, paths, x.shape[0])
    assert counts == (256, 256)
    naive = [jnp.sum(get_at(grads, p)["kernel"] * get_at(block, p)["kernel"]) for p in paths]
    stable = saliency.slot_scores(grads, block, stats, new_stats, paths, "synflow_stable", key[0],
                                  counts)
    return np.asarray(naive, np.float64), np.asarray(stable, np.float64)


def test_grown_block_nested_slots_identity():
    with float64_rep():
        naive64, stable64 = grown_block_scores(jnp.float64)
    np.testing.assert_allclose(stable64, naive64, rtol=1e-4)  # float32 sum of float64 terms
    _, stable32 = grown_block_scores(jnp.float32)
    np.testing.assert_allclose(stable32, naive64, rtol=1e-3)
    assert np.all(np.abs(naive64) > 0)


def test_score_plan_and_fallback():
    params = {
        "unit": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4),
                                                                   "bias": jnp.zeros(4)}},
        "nobn": {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}},
    }
    paths = [("unit", "conv"), ("nobn", "conv")]
    assert saliency.score_plan(params, paths) == [(paths[0], ("unit", "bn")), (paths[1], None)]
    grads = jax.tree_util.tree_map(lambda a: a * 0.5, params)
    stats = {"unit": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    scores = saliency.accumulate(jnp.zeros(2), grads, params, stats, stats, paths,
                                 "synflow", jax.random.PRNGKey(0))
    # nobn falls back to naive: sum(0.5 * 1 * 1) over 72 weights
    assert float(scores[1]) == pytest.approx(36.0)


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown saliency metric 'synflw'"):
        saliency.resolve_metric("synflw")
    assert saliency.resolve_metric("synflow") == saliency.SYNFLOW


def test_accumulate_jits_without_host_sync():
    params = {"u": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))},
                    "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}}
    stats = {"u": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    after = {"u": {"bn": {"mean": jnp.zeros(4), "var": jnp.full(4, 0.9 + 0.1 * 2.0)}}}
    step = jax.jit(lambda s, g, p, b, a, r: saliency.accumulate(s, g, p, b, a, [("u", "conv")],
                                                                 "synflow_stable", r))
    out = step(jnp.zeros(1), params, params, stats, after, jax.random.PRNGKey(0))
    assert float(out[0]) == pytest.approx(4 * EPS / (2.0 + EPS), rel=1e-4)


def test_score_plan_on_models():
    """Every eligible slot of a ResNet has its BN; the BN-less (DBB-style) 3x3 convs fall back."""
    for with_bn, expect_bn in ((True, True), (False, False)):
        model = models.create_model("resnet18_cifar", 10, 0.0625, with_bn_after_3x3=with_bn)
        variables = jax.eval_shape(
            lambda m=model: models.init_variables(m, jax.random.PRNGKey(0), (8, 8, 3)))
        paths = eligible_slots(variables["params"])
        plan = saliency.score_plan(variables["params"], paths)
        assert len(plan) == 17
        assert all((bn is not None) == expect_bn for _, bn in plan), plan
        if expect_bn:
            assert plan[1] == (("layer1_0", "conv1", "conv"), ("layer1_0", "conv1", "bn"))


def network_scores(variables, dtype):
    """(naive in `dtype`, stable) accumulated over 2 steps of a tiny ResNet."""
    model = models.create_model("resnet18_cifar", 10, 0.0625, dtype=dtype)
    cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
    params, stats = cast(variables["params"]), cast(variables["batch_stats"])
    paths = eligible_slots(params)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 8, 3), jnp.float32).astype(dtype)
    y = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    counts = saliency.bn_counts(slot_geometries(model, variables, x[0]), paths, 4)
    assert counts[-1] == 4  # layer4 at 1x1: the n/(n-1) correction is 4/3 here

    @jax.jit
    def step(p, s, xb, yb):
        (_, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(p, s, xb, yb)
        naive = jnp.stack([jnp.sum(get_at(grads, q)["kernel"] * get_at(p, q)["kernel"])
                           for q in paths])
        stable = saliency.slot_scores(grads, p, s, new_stats, paths, "synflow_stable",
                                      jax.random.PRNGKey(0), counts)
        return naive, stable, new_stats

    def loss(p, s, xb, yb):
        logits, upd = model.apply({"params": p, "batch_stats": s}, xb, train=True,
                                  mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), yb]), upd["batch_stats"]

    naive, stable = 0.0, 0.0
    for xb, yb in zip(x, y, strict=True):  # weights fixed, running stats carried
        step_naive, step_stable, stats = step(params, stats, xb, yb)
        naive, stable = naive + step_naive, stable + step_stable
    return np.asarray(naive, np.float64), np.asarray(stable, np.float64)


def test_network_stable_float32_matches_float64_naive():
    model = models.create_model("resnet18_cifar", 10, 0.0625)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))  # float32 draw
    with float64_rep():
        naive64, stable64 = network_scores(variables, jnp.float64)
    np.testing.assert_allclose(stable64, naive64, rtol=1e-4, atol=1e-12)
    _, stable32 = network_scores(variables, jnp.float32)
    scale = np.max(np.abs(naive64))
    np.testing.assert_allclose(stable32, naive64, rtol=1e-2, atol=1e-4 * scale)

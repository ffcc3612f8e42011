"""The lr schedule against the reference's formula, and SGD weight decay against a hand step.

The reference formula is written out here in plain float64 Python. The reference wraps
torch's CosineAnnealingLR (T_max = total - warmup) in a gradual-warmup scheduler that steps
the warmup once per `step_size` steps and holds the peak for one extra step; without warmup,
the wrapper's own first step() makes step 0 use step 1's lr. (These are its values under the
torch 1.x it was run with; under torch >= 2.x its step W + 1 reads base * 2/(1 + cos(pi/T_max)),
from a change in CosineAnnealingLR's recursive form, which we do not copy.)
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyrep_jax.config_base import base_config
from dyrep_jax.optim import cosine_schedule, make_optimizer, make_schedule


def reference_lr(k, *, base, total, warmup, warmup_lr, min_lr, step_size):
    """lr of optimizer step k (0-based) in the reference training script."""
    if warmup == 0:
        t = max(k, 1) / total
    elif k <= warmup:
        return warmup_lr + (base - warmup_lr) * (k // step_size * step_size) / warmup
    else:
        t = (k - warmup - 1) / (total - warmup)
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * t)) / 2


def values(schedule, total):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)), np.float64)


def expected(total, **kw):
    return np.array([reference_lr(k, total=total, **kw) for k in range(total)])


def b2g4_optim(spe):
    """RepVGG-B2g4 strong recipe: lr 0.1, min 1e-7, 5 warmup epochs from 1e-6, per epoch."""
    o = base_config().optim
    o.lr, o.min_lr, o.warmup_epochs, o.warmup_lr, o.warmup_by_epoch = 0.1, 1e-7, 5, 1e-6, True
    return o


# The schedule runs in float32: near the end 1 + cos(x) loses ~1e-8 absolute at lr 0.1.
TOL = dict(rtol=2e-6, atol=1e-8)

CASES = {
    "per_step_warmup": dict(base=0.05, total=60, warmup=10, warmup_lr=0.0, min_lr=0.0,
                            step_size=1),
    "per_epoch_warmup": dict(base=0.1, total=84, warmup=35, warmup_lr=1e-6, min_lr=1e-7,
                             step_size=7),
    "no_warmup": dict(base=0.1, total=50, warmup=0, warmup_lr=0.0, min_lr=1e-6, step_size=1),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_equals_reference_formula(case):
    kw = dict(CASES[case])
    total = kw.pop("total")
    schedule = cosine_schedule(kw["base"], total, kw["warmup"], kw["min_lr"],
                               warmup_lr=kw["warmup_lr"], warmup_step_size=kw["step_size"])
    np.testing.assert_allclose(values(schedule, total), expected(total, **kw),
                               **TOL)


def test_b2g4_schedule_from_config():
    spe, epochs = 7, 12
    got = values(make_schedule(b2g4_optim(spe), spe, epochs), spe * epochs)
    want = expected(spe * epochs, base=0.1, warmup=5 * spe, warmup_lr=1e-6, min_lr=1e-7,
                    step_size=spe)
    np.testing.assert_allclose(got, want, **TOL)
    # What the recipe means, step by step: one lr per warmup epoch, rising by
    # (0.1 - 1e-6) / 5 an epoch from exactly 1e-6; then the peak, held for two steps.
    for epoch in range(5):
        np.testing.assert_allclose(got[epoch * spe:(epoch + 1) * spe],
                                   1e-6 + (0.1 - 1e-6) * epoch / 5, rtol=1e-6)
    np.testing.assert_allclose(got[5 * spe:5 * spe + 2], 0.1, rtol=1e-6)
    assert np.all(np.diff(got[5 * spe + 1:]) < 0) and got[-1] > 1e-7


def test_per_step_warmup_is_the_default_and_old_signature_still_works():
    o = base_config().optim
    o.warmup_epochs = 2
    spe, epochs = 5, 6
    got = values(make_schedule(o, spe, epochs), spe * epochs)
    old_call = values(cosine_schedule(o.lr, spe * epochs, 2 * spe, o.min_lr), spe * epochs)
    want = expected(spe * epochs, base=o.lr, warmup=2 * spe, warmup_lr=0.0, min_lr=o.min_lr,
                    step_size=1)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_array_equal(old_call, got)


def test_optimizer_step_k_uses_the_lr_of_step_k():
    """The first update uses schedule(0), as the reference's first optimizer step does."""
    spe, epochs = 3, 8
    tx = make_optimizer(name="sgd", schedule=make_schedule(b2g4_optim(spe), spe, epochs),
                        momentum=0.0, weight_decay=0.0)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for _ in range(spe * epochs):
        updates, state = update({"w": jnp.ones(1)}, state, params)
        lrs.append(-float(updates["w"][0]))
    want = expected(spe * epochs, base=0.1, warmup=5 * spe, warmup_lr=1e-6, min_lr=1e-7, step_size=spe)
    np.testing.assert_allclose(lrs, want, **TOL)


def test_warmup_longer_than_run_is_a_clear_error():
    with pytest.raises(ValueError, match="lower optim.warmup_epochs"):
        cosine_schedule(0.1, 10, 10)


class ConvBnDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), use_bias=True)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def params_and_grads():
    variables = ConvBnDense().init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))
    params = variables["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = len(leaves)
    keys = jax.random.split(jax.random.PRNGKey(1), 3 * n)

    def random_like(part):  # BN scale 1 and biases 0 would hide the decay: draw every leaf
        part_keys = keys[part * n:(part + 1) * n]
        return jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(k, p.shape) for k, p in zip(part_keys, leaves, strict=True)])

    params, grads = random_like(0), [random_like(1), random_like(2)]
    return params, grads


def named(tree):
    """{'Conv_0.kernel': array, ...} in float64, with the reference's dotted names."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(k.key for k in path): np.asarray(v, np.float64) for path, v in flat}


LR, MOMENTUM, WD = 0.5, 0.9, 0.1


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("decay_bn_and_bias", [False, True], ids=["kernels_only", "all"])
def test_sgd_steps_equal_hand_computation(decay_bn_and_bias, nesterov):
    params, grads = params_and_grads()
    tx = make_optimizer(name="sgd", schedule=lambda step: LR, momentum=MOMENTUM,
                        nesterov=nesterov, weight_decay=WD, decay_bn_and_bias=decay_bn_and_bias)
    state, ours = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = jax.tree_util.tree_map(lambda p, u: p + u, ours, updates)

    # torch.optim.SGD written out: d = g + wd * p (decayed leaves), buf = m * buf + d,
    # p -= lr * (d + m * buf if nesterov else buf).
    decayed = {"Conv_0.kernel", "Dense_0.kernel"}
    hand, bufs = named(params), {}
    for g in grads:
        for name, grad in named(g).items():
            p = hand[name]
            d = grad + WD * p if (decay_bn_and_bias or name in decayed) else grad
            bufs[name] = MOMENTUM * bufs[name] + d if name in bufs else d
            hand[name] = p - LR * (d + MOMENTUM * bufs[name] if nesterov else bufs[name])
    assert set(hand) == {"Conv_0.kernel", "Conv_0.bias", "BatchNorm_0.scale", "BatchNorm_0.bias",
                         "Dense_0.kernel", "Dense_0.bias"}
    got = named(ours)
    for name in hand:
        np.testing.assert_allclose(got[name], hand[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("decay_bn_and_bias", [False, True], ids=["kernels_only", "all"])
def test_sgd_steps_equal_torch_sgd(decay_bn_and_bias):
    """The reference's optimizer: torch SGD, nesterov, no decay for 1-D and bias params."""
    torch = pytest.importorskip("torch")
    params, grads = params_and_grads()
    tx = make_optimizer(name="sgd", schedule=lambda step: LR, momentum=MOMENTUM, nesterov=True,
                        weight_decay=WD, decay_bn_and_bias=decay_bn_and_bias)
    state, ours = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = jax.tree_util.tree_map(lambda p, u: p + u, ours, updates)

    tensors = {n: torch.tensor(v, requires_grad=True) for n, v in named(params).items()}
    skip = [t for n, t in tensors.items() if t.ndim == 1 or n.endswith(".bias")]
    keep = [t for n, t in tensors.items() if not (t.ndim == 1 or n.endswith(".bias"))]
    groups = ([{"params": list(tensors.values())}] if decay_bn_and_bias else
              [{"params": skip, "weight_decay": 0.0}, {"params": keep}])
    sgd = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    for g in grads:
        for name, grad in named(g).items():
            tensors[name].grad = torch.tensor(grad)
        sgd.step()
    got = named(ours)
    for name, t in tensors.items():
        np.testing.assert_allclose(got[name], t.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)

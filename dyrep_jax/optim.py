"""Optimizer, learning-rate schedule, and optimizer-state remap across structure changes.

The remap is generic over optax chains whose state mirrors the params (SGD
momentum traces, Adam moments, masks...): a state leaf survives when the same
key path with the same shape exists after the change; everything else starts
from the optimizer's own init. Scalar leaves such as step counts keep their
path, so the step count and schedule continue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 0.0, *, warmup_lr: float = 0.0, warmup_step_size: int = 1):
    """The reference's lr for optimizer step k (0-based): linear warmup, then per-step cosine.

    The reference wraps torch's CosineAnnealingLR (T_max = T - W) in a gradual-warmup
    scheduler. With W = warmup_steps, T = total_steps, s = warmup_step_size (steps per epoch
    steps the warmup once per epoch) and C(t) = min_lr + (base_lr - min_lr)(1 + cos(pi t)) / 2:
      W = 0:       C(max(k, 1) / T)   (its first step already uses step 1's lr)
      k <= W:      warmup_lr + (base_lr - warmup_lr) * floor(k / s) * s / W
      k >= W + 1:  C((k - W - 1) / (T - W))   (base_lr is held for steps W and W + 1)
    """
    total_steps, warmup_steps = max(int(total_steps), 1), int(warmup_steps)
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup of {warmup_steps} steps must be shorter than the run "
                         f"({total_steps} steps): lower optim.warmup_epochs")
    alpha = min_lr / base_lr if base_lr else 0.0
    if warmup_steps == 0:
        cosine = optax.cosine_decay_schedule(base_lr, total_steps, alpha=alpha)
        return lambda step: cosine(jnp.maximum(step, 1))
    step_size = max(int(warmup_step_size), 1)

    def warmup(step):  # written as warmup_lr + ..., so a tiny warmup_lr stays exact in float32
        done = jnp.floor_divide(step, step_size) * step_size / warmup_steps
        return warmup_lr + (base_lr - warmup_lr) * done

    cosine = optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps, alpha=alpha)
    return optax.join_schedules([warmup, cosine], [warmup_steps + 1])


def make_schedule(optim_config, steps_per_epoch: int, num_epochs: int):
    """The run's lr schedule from the `optim` config group (see config_base.py)."""
    o = optim_config
    spe = int(steps_per_epoch)
    return cosine_schedule(
        o.lr, spe * int(num_epochs), round(o.warmup_epochs * spe), o.min_lr,
        warmup_lr=o.get("warmup_lr", 0.0),
        warmup_step_size=spe if o.get("warmup_by_epoch", False) else 1)


def decay_mask(decay_bn_and_bias: bool):
    """Weight-decay mask: all leaves, or only conv/dense kernels (ndim > 1)."""
    if decay_bn_and_bias:
        return None

    def mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

    return mask


def make_optimizer(*, name: str = "sgd", schedule, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0,
                   decay_bn_and_bias: bool = True, grad_clip_norm: float = 0.0):
    """optax chain; `sgd` follows PyTorch's SGD (decay added to the gradient)."""
    parts = []
    if grad_clip_norm and grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    if name == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, decay_mask(decay_bn_and_bias)))
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=weight_decay,
                                 mask=decay_mask(decay_bn_and_bias)))
    else:
        raise ValueError(f"unknown optimizer '{name}' (valid: sgd, adamw)")
    return optax.chain(*parts)


def _keyed_leaves(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def remap_opt_state(tx, old_opt_state, new_params):
    """Optimizer state for `new_params`, carrying over every surviving leaf exactly.

    Returns (new_opt_state, report) with report = {'kept', 'fresh', 'dropped'} counts.
    """
    fresh = tx.init(new_params)
    old = _keyed_leaves(old_opt_state)
    new_leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    out, kept = [], 0
    for path, leaf in new_leaves:
        name = jax.tree_util.keystr(path)
        prev = old.get(name)
        if prev is not None and jnp.shape(prev) == jnp.shape(leaf):
            out.append(prev)
            kept += 1
        else:
            out.append(leaf)
    report = {"kept": kept, "fresh": len(out) - kept, "dropped": len(old) - kept}
    return jax.tree_util.tree_unflatten(treedef, out), report

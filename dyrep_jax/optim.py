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
                    min_lr: float = 0.0):
    """Per-step cosine from base_lr to min_lr after a linear warmup (from 0)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        decay_steps = max(total_steps - warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        if warmup_steps > 0:
            warm = base_lr * (step + 1) / warmup_steps
            return jnp.where(step < warmup_steps, warm, cosine)
        return cosine

    return schedule


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

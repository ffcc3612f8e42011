"""Random (non-trivial) BN parameters and statistics: fusion bugs hide behind 0/1.

With `tiny_var`, channel 0 of every BN is dead (running var exactly 0) and channel 1 has a
near-zero variance (1e-7): there BN's eps decides the scale, so dropping it shows.
"""

import jax
import jax.numpy as jnp


def _by_name(key, tree, make):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [make(k, path[-1].key, leaf) for k, (path, leaf) in zip(keys, leaves, strict=False)]
    return jax.tree_util.tree_unflatten(treedef, out)


TINY_VARS = (0.0, 1e-7)  # a dead channel, a near-zero-variance channel


def randomize_stats(key, stats, tiny_var: bool = False):
    def make(k, name, leaf):
        if name == "mean":
            return jax.random.normal(k, leaf.shape) * 0.5
        if name == "var":
            var = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
            if tiny_var:
                n = min(len(TINY_VARS), leaf.shape[0])
                var = var.at[:n].set(jnp.asarray(TINY_VARS[:n]))
            return var
        return leaf

    return _by_name(key, stats, make)


def randomize_bn_params(key, params):
    """Random BN gammas/betas and conv biases; kernels untouched."""

    def make(k, name, leaf):
        if name == "scale":
            return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
        if name == "bias":
            return jax.random.normal(k, leaf.shape) * 0.3
        return leaf

    return _by_name(key, params, make)


def max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))

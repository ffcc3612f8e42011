"""dyrep_jax: DyRep (dynamic re-parameterization, CVPR 2022) in JAX/Flax."""

__version__ = "0.1.0"

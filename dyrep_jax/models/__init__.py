"""Models in re-parameterizable form: every conv is a `RepConv` slot in a `ConvBN`.

Usage::

    import jax
    from dyrep_jax.models import (create_model, default_input_shape, init_variables,
                                  fuse_network, count_params, count_macs)

    model = create_model("resnet18_cifar", num_classes=10)
    shape = default_input_shape("resnet18_cifar")            # (32, 32, 3)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    logits = model.apply(variables, images, train=False)     # images: (N, 32, 32, 3)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

    deployed = create_model("resnet18_cifar", num_classes=10, deploy=True)
    fused = fuse_network(variables)                          # BN folded, blocks fused
    same_logits = deployed.apply(fused, images)

`init_variables(..., initial_branches=dbb_initial_branches)` builds the static
DBB baseline (with `create_model(..., with_bn_after_3x3=False)`).
"""

from dyrep_jax.models.dbb import DBB_BRANCHES, dbb_initial_branches
from dyrep_jax.models.deploy import fuse_network
from dyrep_jax.models.layers import ConvBN, round_channels
from dyrep_jax.models.macs import count_macs
from dyrep_jax.models.registry import (
    MODEL_NAMES,
    create_model,
    default_input_shape,
)
from dyrep_jax.models.variables import count_params, init_variables

__all__ = [
    "DBB_BRANCHES", "MODEL_NAMES", "ConvBN", "count_macs", "count_params", "create_model",
    "dbb_initial_branches", "default_input_shape", "fuse_network", "init_variables",
    "round_channels",
]

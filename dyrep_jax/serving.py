"""The fused deploy network as one self-contained `jax.export` artifact: DIR/fused/model.jaxexport.

The file holds the bytes of `Exported.serialize()` of `images -> logits` with
the fused parameters baked in as constants, so serving needs neither this
package nor a checkpoint. Input: float32 NHWC images of the training image
shape, normalized as in training ((pixels / 255 - mean) / std, with `mean` and
`std` from DIR/fused/arch.json). The batch dimension is symbolic: any batch
size >= 1 runs the same program. Output: float32 logits (batch, num_classes).
Lowered for cpu, cuda and tpu, so one file serves on any of them.

Load it from plain JAX (needs `jax` and `flatbuffers`, nothing else):

    from jax import export
    serving = export.deserialize(bytearray(open("DIR/fused/model.jaxexport", "rb").read()))
    logits = serving.call(images)  # float32 (N, H, W, C), normalized

`python -m dyrep_jax.tools.predict --exported DIR/fused/model.jaxexport ...`
does the same from the command line, with input checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import export

EXPORT_FILE = "model.jaxexport"
PLATFORMS = ("cpu", "cuda", "tpu")


def export_network(model, variables, image_shape, platforms=PLATFORMS) -> export.Exported:
    """`images (b, H, W, C) float32 -> float32 logits` with `variables` baked in, b symbolic."""
    variables = jax.tree_util.tree_map(np.asarray, variables)

    def logits(images):
        return model.apply(variables, images, train=False).astype(jnp.float32)

    (batch,) = export.symbolic_shape("batch", constraints=("batch >= 1",))
    spec = jax.ShapeDtypeStruct((batch, *tuple(image_shape)), jnp.float32)
    return export.export(jax.jit(logits), platforms=platforms)(spec)


def write_exported(fused_dir, model, variables, image_shape) -> str:
    """Write `fused_dir`/model.jaxexport for the deploy `model` and its fused `variables`.

    `fused_dir` may be any `etils.epath` path (local or cloud); returns the file's path.
    """
    path = epath.Path(fused_dir) / EXPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(export_network(model, variables, image_shape).serialize()))
    return str(path)


def load_exported(path) -> export.Exported:
    """The `Exported` in a model.jaxexport file; call it with `.call(images)`.

    `.in_avals[0].shape[1:]` is the image shape it expects, `.out_avals[0]` its logits.
    """
    data = epath.Path(path).read_bytes()
    return export.deserialize(bytearray(data))


def exported_image_shape(exported: export.Exported) -> tuple:
    """(H, W, C) an exported network takes (the batch dimension is symbolic)."""
    return tuple(int(d) for d in exported.in_avals[0].shape[1:])

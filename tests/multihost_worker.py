"""One process of a 2-process CPU 'pod' (run by test_multihost.py, not collected by pytest).

argv: port process_id workdir out.npz
Prints progress lines (log_every_steps=1) and at the end
`WORKER_DONE <process> <status> <latest checkpoint step> <test top1 or ->`;
when training finished, out.npz holds the final parameters.
"""

import logging
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

import numpy as np  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

from dyrep_jax import train  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
result = train.run(tiny_config(num_devices=0), workdir)
trainer = train.Trainer(tiny_config(num_devices=0), workdir)
step = trainer.manager.latest_step()
if result["status"] == "done":
    state, _ = trainer.restore()
    leaves = jax.tree_util.tree_flatten_with_path(train.to_host(state["params"]))[0]
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in leaves})
print("WORKER_DONE", pid, result["status"], step, result.get("test_top1", "-"), flush=True)

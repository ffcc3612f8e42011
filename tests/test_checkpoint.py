"""Checkpoint retention (latest N + best) and structure restored from the checkpoint itself."""

import numpy as np
import optax

from dyrep_jax import checkpoint as ckpt


def test_keeps_latest_n_and_the_best(tmp_path):
    mngr = ckpt.make_manager(str(tmp_path), keep=2, async_save=False)
    tx = optax.sgd(0.1, momentum=0.9)
    for step, acc in zip(range(1, 6), [0.1, 0.9, 0.3, 0.4, 0.5], strict=True):
        # the structure changes between saves: step 3 on has a grown slot
        params = {"conv": {"kernel": np.full((3, 3, 1, 2), step, np.float32)}}
        if step >= 3:
            params = {"conv": {"kxk": {"conv": params["conv"]},
                               "1x1": {"conv": {"kernel": np.ones((1, 1, 1, 2), np.float32)}}}}
        state = {"params": params, "step": np.asarray(step)}
        ckpt.save(mngr, step, state, tx.init(params), {"epoch": step}, acc)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 4, 5]
    step, state, opt, meta = ckpt.restore_latest(mngr, tx.init)
    assert step == 5 and meta["epoch"] == 5
    assert set(state["params"]["conv"]) == {"kxk", "1x1"}  # structure came back by itself
    np.testing.assert_array_equal(state["params"]["conv"]["kxk"]["conv"]["kernel"], 5.0)
    assert optax.tree_utils.tree_get(opt, "trace") is not None

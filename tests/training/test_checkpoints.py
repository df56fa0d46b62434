"""Checkpoint retention: the latest few and the best by validation error survive."""

import jax.numpy as jnp
import pytest

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import checkpoints


def test_latest_and_best_are_kept(tmp_path):
  mgr = checkpoints.manager(str(tmp_path), keep=1)
  state = {"w": jnp.zeros(3)}
  for step, err in ((1, 0.5), (2, 0.2), (3, 0.6), (4, None), (5, 0.7)):
    checkpoints.save(
      mgr,
      step,
      {"w": jnp.full(3, float(step))},
      metrics=None if err is None else {checkpoints.BEST_METRIC: err},
    )
  mgr.wait_until_finished()
  assert sorted(mgr.all_steps()) == [2, 5]  # the best (0.2) and the latest
  assert float(checkpoints.restore(mgr, state, step=2)["w"][0]) == 2.0
  assert float(checkpoints.restore(mgr, state)["w"][0]) == 5.0
  mgr.close()


def test_a_state_of_another_version_is_a_one_line_error(tmp_path):
  """A checkpoint whose fields differ from this version's state (one written before
  TrainState.log existed) names the way out: its parameters through init_from."""
  mgr = checkpoints.manager(str(tmp_path), keep=1)
  checkpoints.save(mgr, 1, {"step": jnp.int32(1), "params": {"w": jnp.ones(3)}})
  mgr.wait_until_finished()
  target = {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}, "log": {"n": jnp.int32(0)}}
  with pytest.raises(UserInputError, match=f"--config.init_from={tmp_path} to start from"):
    checkpoints.restore(mgr, target)
  mgr.close()

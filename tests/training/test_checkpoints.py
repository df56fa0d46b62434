"""Checkpoint retention: the latest few and the best by validation error survive."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.core import storage
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


# Damaged checkpoints: each array's checksum is saved with it and compared on every restore.


def _array_file(ckpt_dir: str, step: int) -> str:
  """The largest tensorstore data file of a step: where its array values are."""
  found = [
    os.path.join(folder, name)
    for folder, _, names in os.walk(os.path.join(ckpt_dir, str(step)))
    if os.path.basename(folder) == "d"
    for name in names
  ]
  return max(found, key=os.path.getsize)


def flip_bytes(ckpt_dir: str, step: int) -> None:
  """64 bytes of 0xFF written into the middle of the step's array data."""
  path = _array_file(ckpt_dir, step)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)


def cut_in_half(ckpt_dir: str, step: int) -> None:
  path = _array_file(ckpt_dir, step)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGES = {"flipped": flip_bytes, "cut": cut_in_half}


def _tree(step: int) -> dict:
  """A small state with incompressible values (random), so damage lands in array data."""
  rng = np.random.default_rng(step)
  return {
    "step": jnp.int32(step),
    "params": {"w": jnp.asarray(rng.standard_normal(4096), jnp.float32), "b": jnp.ones(3)},
  }


def _saved(workdir: str, steps=(1, 2)) -> None:
  mgr = checkpoints.manager(workdir, keep=3)
  for step in steps:
    checkpoints.save(mgr, step, _tree(step))
  mgr.wait_until_finished()
  mgr.close()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
  """The latest checkpoint damaged (bytes overwritten, a file cut): the earlier one is
  restored, a warning names both; the damaged values are never returned."""
  _saved(str(tmp_path))
  DAMAGES[damage](str(tmp_path / "checkpoints"), 2)
  mgr = checkpoints.manager(str(tmp_path), keep=3)
  restored = checkpoints.restore(mgr, _tree(0))
  mgr.close()
  assert int(restored["step"]) == 1
  np.testing.assert_array_equal(restored["params"]["w"], _tree(1)["params"]["w"])
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "checkpoints/2 is damaged" in warning and "using step 1" in warning


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_checkpoint_damaged_is_a_one_line_error(tmp_path, damage):
  _saved(str(tmp_path))
  for step in (1, 2):
    DAMAGES[damage](str(tmp_path / "checkpoints"), step)
  mgr = checkpoints.manager(str(tmp_path), keep=3)
  with pytest.raises(UserInputError, match="every checkpoint in .* is damaged") as e:
    checkpoints.restore(mgr, _tree(0))
  mgr.close()
  assert "\n" not in str(e.value) and "step 2: " in str(e.value) and "step 1: " in str(e.value)


def test_a_damaged_step_asked_for_is_an_error_not_another_step(tmp_path):
  _saved(str(tmp_path))
  flip_bytes(str(tmp_path / "checkpoints"), 1)
  mgr = checkpoints.manager(str(tmp_path), keep=3)
  with pytest.raises(UserInputError, match="checkpoints/1 is damaged .*arrays differ"):
    checkpoints.restore(mgr, _tree(0), step=1)
  mgr.close()


@pytest.mark.parametrize("damage", DAMAGES)
def test_read_params_skips_a_damaged_latest_checkpoint(tmp_path, caplog, damage):
  """The parameters alone (restore.py, extract, convert, init_from from a workdir) are
  verified too: the damaged step 2 is skipped, an asked-for damaged step refused."""
  _saved(str(tmp_path))
  DAMAGES[damage](str(tmp_path / "checkpoints"), 2)
  params, step, _ = checkpoints.read_params(str(tmp_path))
  assert step == 1
  np.testing.assert_array_equal(params["w"], _tree(1)["params"]["w"])
  assert any("checkpoints/2 is damaged" in r.getMessage() for r in caplog.records)
  with pytest.raises(UserInputError, match="checkpoints/2 is damaged"):
    checkpoints.read_params(str(tmp_path / "checkpoints" / "2"))


def test_set_aside_moves_the_damaged_steps_out_for_the_resumed_run(tmp_path):
  """A resumed run moves the damaged step out of checkpoints/ (kept to inspect), so that it
  saves that step afresh; the good one stays."""
  _saved(str(tmp_path))
  flip_bytes(str(tmp_path / "checkpoints"), 2)
  mgr = checkpoints.manager(str(tmp_path), keep=3)
  checkpoints.restore(mgr, _tree(0), set_aside=True)
  assert sorted(mgr.all_steps()) == [1]
  assert os.path.isdir(tmp_path / checkpoints.DAMAGED_DIR / "2")
  checkpoints.save(mgr, 2, _tree(2))
  mgr.wait_until_finished()
  assert int(checkpoints.restore(mgr, _tree(0))["step"]) == 2
  mgr.close()


def test_in_a_bucket_a_damaged_step_is_copied_aside_and_deleted(gcs):
  """A bucket cannot rename: the damaged step's objects are copied to damaged_checkpoints/
  and deleted from checkpoints/, so the resumed run saves that step afresh, and verifies it."""
  workdir = f"{gcs.bucket()}/run"
  _saved(workdir)
  fs, _ = storage.filesystem(workdir)
  before = gcs.files(f"{workdir}/checkpoints/2")
  step_2 = [f for f in before if "/d/" in f]
  data = max(step_2, key=fs.size)
  content = bytearray(fs.cat_file(data))
  content[len(content) // 2 : len(content) // 2 + 64] = b"\xff" * 64
  fs.pipe_file(data, bytes(content))
  mgr = checkpoints.manager(workdir, keep=3)
  assert int(checkpoints.restore(mgr, _tree(0), set_aside=True)["step"]) == 1
  assert sorted(mgr.all_steps()) == [1]
  assert gcs.files(f"{workdir}/checkpoints/2") == []
  moved = gcs.files(f"{workdir}/{checkpoints.DAMAGED_DIR}/2")
  aside = f"{workdir}/{checkpoints.DAMAGED_DIR}/2"
  assert moved == sorted(f.replace(f"{workdir}/checkpoints/2", aside) for f in before)
  checkpoints.save(mgr, 2, _tree(2))
  mgr.wait_until_finished()
  restored = checkpoints.restore(mgr, _tree(0))
  mgr.close()
  assert int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], _tree(2)["params"]["w"])

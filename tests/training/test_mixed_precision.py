"""bfloat16 compute: the convolutions and products run in bfloat16, parameters and optimizer
state stay float32, and training follows the float32 run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import backend
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.studies import benchmark
from alexnet_jax.training import metrics, optim, steps, train
from configs import quickstart


@pytest.mark.slow
def test_bfloat16_step_computes_low_and_keeps_float32_state():
  tx = optim.paper_sgd(1.0)  # large steps, so that float32 resolves their differences
  params = random_params(AlexNet(num_classes=10), 67)
  state = steps.new_state(params, tx.init(params))
  batch = benchmark.synthetic_batch(8, 67, train=True)
  mean = jnp.full((67, 67, 3), 120.0)
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    step = jax.jit(steps.make_train_step(AlexNet(num_classes=10, dtype=dtype), tx, seed=0))
    hlo = step.lower(state, batch, mean).as_text()
    convs = re.findall(r"stablehlo.convolution.*", hlo)
    assert convs and all(("bf16" in c) == (dtype == jnp.bfloat16) for c in convs)
    out[dtype] = step(state, batch, mean)
  new, m = out[jnp.bfloat16]
  dtypes = lambda tree: jax.tree.leaves(jax.tree.map(lambda a: jnp.dtype(a.dtype).name, tree))
  assert dtypes(new) == dtypes(state) and set(dtypes(new.params)) == {"float32"}  # momentum too
  new32, m32 = out[jnp.float32]
  np.testing.assert_allclose(m["train/loss"], m32["train/loss"], rtol=2e-2)
  # The whole update agrees to a few percent (single layers' to 2-25% at initialisation, where
  # bfloat16's 8 bits meet small, cancelling gradients).
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  update16, update32 = flat(new.params) - flat(params), flat(new32.params) - flat(params)
  assert np.linalg.norm(update16 - update32) < 0.1 * np.linalg.norm(update32)


def test_bfloat16_where_the_backend_cannot_stops_before_any_work(tmp_path, monkeypatch):
  def cannot(dtype):
    raise ValueError(f"{dtype} is not supported on this device; use float32")

  monkeypatch.setattr(backend, "check_dtype", cannot)
  config = quickstart.get_config()
  config.update(data_dir=str(tmp_path / "data"), dtype="bfloat16")
  with pytest.raises(
    UserInputError, match="--config.dtype=bfloat16: bfloat16 is not supported on this device"
  ):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists()


@pytest.mark.long
def test_bfloat16_training_follows_float32(tmp_path):
  """200 steps of the quickstart net on the embedded data (learning rate 0.05 so that the loss
  falls within them): every logged training loss (a mean over 10 steps) of the bfloat16 run is
  within 0.15 of the float32 run's, and so is the final validation loss. (Measured on the
  development CPU: at most 0.08 apart, while the loss falls from 2.47 to 1.70.)"""
  curves, finals = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = quickstart.get_config()
    config.update(
      data_dir=str(tmp_path / "data"),
      dtype=dtype,
      synthetic_train_per_class=40,
      synthetic_val_per_class=10,
      num_train_steps=200,
      learning_rate=0.05,
      num_devices=1,
      log_every_steps=10,
      eval_every_steps=200,
      checkpoint_every_steps=200,
    )
    finals[dtype] = train.train_and_evaluate(config, str(tmp_path / dtype))["val/loss"]
    curves[dtype] = np.array(
      [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / dtype)) if "train/loss" in r]
    )
  assert len(curves["float32"]) == 20 and curves["float32"][-1] < curves["float32"][0] - 0.5
  # Each logged loss is a mean over 10 steps of single 32-image batches, whose bfloat16 and
  # float32 trajectories drift apart step by step: compared over windows of 4 logged points
  # (40 steps), not point by point, where one noisy window was seen 0.158 apart.
  window = lambda c: c.reshape(-1, 4).mean(1)
  np.testing.assert_allclose(window(curves["bfloat16"]), window(curves["float32"]), atol=0.15)
  assert abs(finals["bfloat16"] - finals["float32"]) < 0.15

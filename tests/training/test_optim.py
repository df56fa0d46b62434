"""The paper's update rule, its weight-decay mask and the schedules."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax.training import optim


def test_update_rule_matches_the_paper_across_a_rate_drop():
  lr = optax.piecewise_constant_schedule(0.01, {3: 0.1})
  tx = optim.paper_sgd(lr, momentum=0.9, weight_decay=5e-4)
  rng = np.random.default_rng(0)
  params = {
    "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones(4)}
  }
  state = tx.init(params)
  w, b = np.asarray(params["conv1"]["kernel"], np.float64), np.ones(4)
  vw, vb = np.zeros_like(w), np.zeros_like(b)
  for step in range(6):
    gw, gb = rng.normal(size=w.shape), rng.normal(size=b.shape)
    eps = 0.01 if step < 3 else 0.001
    vw = 0.9 * vw - 5e-4 * eps * w - eps * gw  # the paper's v <- 0.9 v - 0.0005 eps w - eps g
    w = w + vw
    vb = 0.9 * vb - eps * gb  # biases are not decayed
    b = b + vb
    grads = {
      "conv1": {"kernel": jnp.asarray(gw, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}
    }
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(eps)
  np.testing.assert_allclose(params["conv1"]["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["conv1"]["bias"], b, rtol=1e-5, atol=1e-6)


def test_rate_inside_momentum_differs_from_optax_sgd():
  """After a drop, optax.sgd keeps moving with the old rate's momentum; the paper's rule does
  not."""
  lr = optax.piecewise_constant_schedule(1.0, {1: 0.0})
  params = {"w": jnp.zeros(())}
  grads = {"w": jnp.ones(())}
  ours, theirs = optim.paper_sgd(lr, weight_decay=0.0), optax.sgd(lr, momentum=0.9)
  so, st = ours.init(params), theirs.init(params)
  for _ in range(2):
    uo, so = ours.update(grads, so, params)
    ut, st = theirs.update(grads, st, params)
  # Step 2 has rate 0: the paper's update is 0.9 * previous velocity; optax.sgd's is 0.
  assert float(uo["w"]) == pytest.approx(-0.9) and float(ut["w"]) == 0.0


def test_biases_decayed_on_request():
  tx = optim.paper_sgd(0.1, momentum=0.0, weight_decay=0.5, decay_biases=True)
  params = {"fc8": {"bias": jnp.ones(2)}}
  updates, _ = tx.update({"fc8": {"bias": jnp.zeros(2)}}, tx.init(params), params)
  np.testing.assert_allclose(updates["fc8"]["bias"], -0.05)


def test_schedules():
  piecewise = optim.make_schedule(
    "piecewise", 0.01, steps_per_epoch=10, total_steps=900, boundaries_epochs=(30, 60, 80)
  )
  assert [float(piecewise(s)) for s in (0, 299, 300, 600, 800)] == pytest.approx(
    [0.01, 0.01, 1e-3, 1e-4, 1e-5]
  )
  cosine = optim.make_schedule("cosine", 0.01, 10, 100)
  assert float(cosine(0)) == pytest.approx(0.01) and float(cosine(100)) == pytest.approx(
    0.0, abs=1e-9
  )
  assert optim.make_schedule("plateau", 0.01, 10, 100) == 0.01
  with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
    optim.make_schedule("step", 0.01, 10, 100)


def test_plateau_divides_by_ten_when_error_stops_improving_at_most_max_drops():
  state = {"best": float("inf"), "bad_evals": 0, "drops": 0}
  factors = []
  for err in (0.5, 0.4, 0.41, 0.42, 0.45, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36):
    state, f = optim.plateau_update(state, err, patience=2, max_drops=2)
    factors.append(f)
  assert factors == [1, 1, 1, 0.1, 1, 1, 1, 0.1, 1, 1, 1, 1]
  assert state["drops"] == 2 and state["best"] == 0.3


def test_warmup_rises_linearly_from_the_start_factor_and_leaves_the_drops_in_place():
  """Goyal et al.'s gradual warmup: 0.32 / 32 at step 0, + 0.31 / 50 a step, 0.32 from 5 epochs
  (50 steps) on; the schedule's drops stay at epochs 30, 60, 80 instead of moving by 5."""
  piecewise = optim.make_schedule(
    "piecewise", 0.32, 10, 900, (30, 60, 80), warmup_epochs=5, warmup_start_factor=1 / 32
  )
  steps = (0, 1, 25, 49, 50, 299, 300, 600, 800)
  assert [float(piecewise(s)) for s in steps] == pytest.approx(
    [0.01, 0.01 + 0.31 / 50, 0.165, 0.01 + 0.31 * 49 / 50, 0.32, 0.32, 0.032, 3.2e-3, 3.2e-4],
    rel=1e-5,  # float32 rates
  )


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_warmup_replaces_the_first_steps_of_any_schedule(name):
  plain = optim.make_schedule(name, 0.1, 10, 100)
  warm = optim.make_schedule(name, 0.1, 10, 100, warmup_epochs=2, warmup_start_factor=0.0)
  assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.05)
  after = jnp.arange(20, 101)
  np.testing.assert_array_equal(warm(after), plain(after) if callable(plain) else np.float32(plain))


def test_warmup_with_the_plateau_rule_is_refused_and_no_warmup_changes_nothing():
  with pytest.raises(ValueError, match="warmup does not work with lr_schedule 'plateau'"):
    optim.make_schedule("plateau", 0.01, 10, 100, warmup_epochs=1)
  assert optim.make_schedule("constant", 0.01, 10, 100, warmup_epochs=0.0) == 0.01

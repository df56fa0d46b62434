"""The paper's SGD (§5) and its learning-rate schedules, as optax transformations.

    v <- momentum * v - wd * lr * w - lr * dL/dw ;  w <- w + v

The learning rate sits inside the momentum (optax.sgd puts it outside), so a rate drop
takes effect at once instead of being smeared over the momentum's memory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax

from alexnet_jax.model.alexnet import LAYERS

SCHEDULES = ("piecewise", "plateau", "cosine", "constant")


def paper_sgd(
  learning_rate: float | optax.Schedule,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  decay_biases: bool = False,
  frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
  """The update rule; the current rate is readable (and, for plateau, settable) in
  `opt_state.hyperparams['learning_rate']`. Weight decay skips biases unless `decay_biases`
  (cuda-convnet decayed only weights).

  The top-level entries (layers) named in `frozen` get no update, weight decay included, and
  gather no momentum: their gradient is zeroed before the momentum as well as after it, so a
  layer unfrozen later (a resume with another `freeze_all_but_last`) starts from rest instead
  of receiving at once the momentum of every step it sat out.
  """

  def rule(learning_rate):
    mask = (
      None
      if decay_biases
      else (
        lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: getattr(path[-1], "key", None) != "bias", params
        )
      )
    )
    # Always in the chain, even with nothing frozen, so the optimizer state has one structure
    # and a checkpoint restores whatever is frozen.
    freeze = optax.masked(
      optax.set_to_zero(),
      lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) in frozen, params
      ),
    )
    return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),  # g + wd * w
      optax.scale_by_learning_rate(learning_rate, flip_sign=True),  # -lr * (g + wd * w)
      freeze,  # no momentum gathers in a frozen layer
      optax.trace(decay=momentum),  # v <- momentum * v - lr * (g + wd * w)
      freeze,  # nor does momentum from an unfrozen past move it
    )

  return optax.inject_hyperparams(rule)(learning_rate=learning_rate)


def frozen_layers(train_last: int) -> tuple[str, ...]:
  """The layers that fine-tuning keeps fixed when only the last `train_last` of the eight
  train (0: none frozen; 1: only fc8 trains)."""
  return LAYERS[: len(LAYERS) - train_last] if train_last > 0 else ()


def make_schedule(
  name: str,
  base_lr: float,
  steps_per_epoch: int,
  total_steps: int,
  boundaries_epochs: tuple = (),
  factor: float = 0.1,
  warmup_epochs: float = 0.0,
  warmup_start_factor: float = 1.0,
) -> float | Callable[[Any], Any]:
  """A step -> rate schedule; 'plateau' gives a constant rate that the train loop lowers.

  `warmup_epochs` > 0 is Goyal et al. 2017's gradual warmup: the rate rises linearly, step by
  step, from `warmup_start_factor * base_lr` (their 1/k for a k-fold batch) to `base_lr`, then
  the schedule goes on as without it: its drops stay where they were (the warmup replaces the
  schedule's first steps instead of delaying it). Plateau is refused: its rate lives in the
  optimizer state, where the loop lowers it, and a schedule would overwrite it every step.
  """
  schedule = _schedule(name, base_lr, steps_per_epoch, total_steps, boundaries_epochs, factor)
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  if warmup_steps <= 0:
    return schedule
  if name == "plateau":
    raise ValueError("a warmup does not work with lr_schedule 'plateau'")
  after = schedule if callable(schedule) else optax.constant_schedule(schedule)
  return optax.join_schedules(
    [
      optax.linear_schedule(warmup_start_factor * base_lr, base_lr, warmup_steps),
      lambda step: after(step + warmup_steps),  # join_schedules counts from the boundary
    ],
    [warmup_steps],
  )


def _schedule(
  name: str,
  base_lr: float,
  steps_per_epoch: int,
  total_steps: int,
  boundaries_epochs: tuple,
  factor: float,
) -> float | Callable[[Any], Any]:
  if name == "piecewise":
    return optax.piecewise_constant_schedule(
      base_lr, {int(e * steps_per_epoch): factor for e in boundaries_epochs}
    )
  if name == "cosine":
    return optax.cosine_decay_schedule(base_lr, max(total_steps, 1))
  if name in ("plateau", "constant"):
    return base_lr
  raise ValueError(f"unknown lr_schedule {name!r}; choose one of {SCHEDULES}")


def plateau_update(
  state: dict, val_error: float, patience: int, max_drops: int, factor: float = 0.1
) -> tuple[dict, float]:
  """The paper's literal rule: divide the rate by 10 when validation error stops improving.

  state = {'best', 'bad_evals', 'drops'} (plain floats/ints, saved with the checkpoint);
  returns the new state and the factor to multiply the rate by (1.0 or `factor`).
  """
  state = dict(state)
  if val_error < state["best"]:
    state.update(best=val_error, bad_evals=0)
    return state, 1.0
  state["bad_evals"] += 1
  if state["bad_evals"] >= patience and state["drops"] < max_drops:
    state.update(bad_evals=0, drops=state["drops"] + 1)
    return state, factor
  return state, 1.0

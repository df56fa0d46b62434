"""The jitted steps' bodies: one SGD step and one evaluation step of a model on a batch.

Free of the input pipeline (TensorFlow) and the config, so that `alexnet_jax.bench` times
exactly the step that training runs, on machines without either.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from alexnet_jax.data import augment
from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import AlexNet


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  plateau: dict  # the plateau schedule's memory: best val error, evaluations since, drops
  # The log's memory, saved with the checkpoint so that a resumed run logs what an
  # uninterrupted one would, whatever the log and checkpoint intervals: sums of the metrics
  # of the finite steps since the last log line, and the run's counters (see `new_state`).
  log: dict


LOGGED = ("train/loss", "train/top1_error", "learning_rate")  # averaged over each log interval


def _sum_key(name: str) -> str:
  return "sum_" + name.split("/")[-1]  # no '/': orbax would take it for a folder


INTERVAL_KEYS = tuple(_sum_key(k) for k in LOGGED) + ("finite_steps",)  # reset at each log line
COUNTERS = ("skipped_steps", "skipped_images", "first_nonfinite", "eval_pending")


def new_log() -> dict:
  """The log's memory at step 0.

  sum_*: the sums of LOGGED over the finite steps since the last log line, `finite_steps`
  of them. skipped_steps: non-finite steps skipped (whole run). skipped_images: unreadable
  training images (whole run, set by the train loop). first_nonfinite: the first step whose
  loss, gradients or parameters were NaN/Inf (0: none). eval_pending: 1 when the
  checkpoint's step is an evaluation step whose evaluation has not run yet (a preempted run
  evaluates it on resume).
  """
  sums = {k: jnp.float32(0) for k in INTERVAL_KEYS[:-1]}
  return sums | {k: jnp.int32(0) for k in INTERVAL_KEYS[-1:] + COUNTERS}


def new_state(params: Any, opt_state: Any) -> TrainState:
  """Step 0 of training: no plateau seen yet (best error +inf), an empty log."""
  plateau = {"best": jnp.float32(jnp.inf), "bad_evals": jnp.int32(0), "drops": jnp.int32(0)}
  return TrainState(jnp.int32(0), params, opt_state, plateau, new_log())


def log_means(log: dict) -> dict:
  """The LOGGED metrics averaged over the finite steps of the interval (NaN if none was)."""
  n = int(log["finite_steps"])
  return {k: float(log[_sum_key(k)]) / n if n else float("nan") for k in LOGGED}


def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def make_train_step(
  model: AlexNet, tx: optax.GradientTransformation, seed: int, skip_nonfinite: bool = False
):
  """One SGD step; dropout's randomness is a function of (seed, step) only.

  'finite' in the metrics says whether the loss, every gradient and every updated parameter
  were finite (a finite gradient can still overflow a parameter); with `skip_nonfinite` such
  a step leaves the parameters and optimizer state as they were. Finite steps add their
  metrics to `state.log`'s sums; the first non-finite one is noted there.
  """

  def train_step(state: TrainState, batch: dict, mean_image: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    images = augment.normalize(batch, mean_image)

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
      return jnp.mean(cross_entropy(logits, batch["label"])), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
    if skip_nonfinite:
      keep = lambda new_leaf, old_leaf: jnp.where(finite, new_leaf, old_leaf)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = {
      "train/loss": loss,
      "train/top1_error": jnp.mean(jnp.argmax(logits, -1) != batch["label"]),
      "learning_rate": opt_state.hyperparams["learning_rate"],
    }
    step = state.step + 1
    log = dict(state.log)
    for k in LOGGED:
      log[_sum_key(k)] += jnp.where(finite, metrics[k], 0).astype(jnp.float32)
    log["finite_steps"] += finite.astype(jnp.int32)
    log["skipped_steps"] += (~finite & skip_nonfinite).astype(jnp.int32)
    if not skip_nonfinite:  # (skipped steps are counted instead)
      noted = log["first_nonfinite"] > 0
      log["first_nonfinite"] = jnp.where(finite | noted, log["first_nonfinite"], step)
    new = state.replace(step=step, params=params, opt_state=opt_state, log=log)
    return new, metrics | {"finite": finite}

  return train_step


def make_eval_step(model: AlexNet):
  """Sums over a padded batch: loss, top-1 and top-5 mistakes and the count of real images.

  Images of shape (batch, crops, H, W, 3) are the paper's ten patches: their softmax
  outputs are averaged (log of the mean, computed stably).
  """

  def eval_step(params: Any, batch: dict, mean_image: jax.Array) -> dict:
    images = augment.normalize(batch, mean_image)
    crops = images.shape[1] if images.ndim == 5 else 1
    logits = model.apply({"params": params}, images.reshape((-1,) + images.shape[-3:]))
    log_probs = jax.nn.log_softmax(logits).reshape(images.shape[0], crops, -1)
    log_probs = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(crops)
    mask, labels = batch["mask"], batch["label"]
    top5 = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))[1]
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    return {
      "loss": jnp.sum(cross_entropy(log_probs, labels) * mask),
      "top1_wrong": jnp.sum((jnp.argmax(log_probs, -1) != labels) * mask),
      "top5_wrong": jnp.sum((~in_top5) * mask),
      "count": jnp.sum(mask),
    }

  return eval_step


class JittedSteps(NamedTuple):
  """The two steps a run compiles: `train(state, batch, mean_image) -> (state, metrics)` and
  `evaluate(params, batch, mean_image) -> metrics`."""

  train: Callable
  evaluate: Callable


def jit_steps(
  model: AlexNet,
  tx: optax.GradientTransformation,
  state_shardings: Any,
  mesh: Mesh | None,
  *,
  seed: int,
  skip_nonfinite: bool = False,
  compiler_options: dict | None = None,
) -> JittedSteps:
  """The train and eval steps, jitted as training runs them: the state donated, batches split
  over `data`, metrics and the mean image replicated. `mesh=None`: one device, no shardings.
  The benchmark times these very functions."""
  train_step = make_train_step(model, tx, seed, skip_nonfinite)
  eval_step = make_eval_step(model)
  options = dict(compiler_options=compiler_options)
  if mesh is None:
    return JittedSteps(
      jax.jit(train_step, donate_argnums=0, **options), jax.jit(eval_step, **options)
    )
  batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return JittedSteps(
    jax.jit(
      train_step,
      donate_argnums=0,
      in_shardings=(state_shardings, batch, rep),
      out_shardings=(state_shardings, rep),
      **options,
    ),
    jax.jit(
      eval_step, in_shardings=(state_shardings.params, batch, rep), out_shardings=rep, **options
    ),
  )

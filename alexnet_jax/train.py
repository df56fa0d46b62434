"""Training and evaluation: jitted steps on the ('data', 'model') mesh, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import (
  backend,
  checkpoints,
  input_pipeline,
  metrics,
  optim,
  preemption,
  pretrained,
  sharding,
  synthetic,
)
from alexnet_jax.config_check import check_config
from alexnet_jax.errors import UserInputError
from alexnet_jax.models import AlexNet
from alexnet_jax.steps import TrainState, make_eval_step, make_train_step


def create_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> AlexNet:
  m = config.model
  return AlexNet(
    num_classes=config.num_classes,
    variant=m.variant,
    mesh=mesh,
    towers=m.towers if m.variant == "paper" else None,
    activation=m.activation,
    lrn=m.lrn,
    overlapping_pool=m.overlapping_pool,
    dropout_rate=m.dropout_rate,
    init_std=m.init_std,
    bias_one=m.bias_one,
    lrn_scope=m.lrn_scope,
    lrn_k=m.lrn_k,
    lrn_n=m.lrn_n,
    lrn_alpha=m.lrn_alpha,
    lrn_beta=m.lrn_beta,
    dtype=jnp.dtype(config.dtype),
    ops_impl=config.get("ops_impl", "fast"),
  )  # workdirs from before ops_impl


def load_splits(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[Any, Any, input_pipeline.Stats]:
  """The train and val splits the config names, and the statistics training subtracts and jitters with.

  "imagenet2012" reads shards written by `alexnet_jax.prepare` (from the ImageNet archives
  or any image-folder tree); the synthetic set is generated on first use.
  """
  data_dir = config.data_dir
  if config.dataset == "synthetic":
    data_dir = data_dir or os.path.join(workdir, "data")
    sizes = dict(
      train_per_class=config.synthetic_train_per_class,
      val_per_class=config.synthetic_val_per_class,
      seed=config.seed,
    )
    if jax.process_index() == 0:
      synthetic.generate(data_dir, **sizes)
    _sync("synthetic data")
    synthetic.generate(data_dir, **sizes)  # a no-op where the first process already wrote it
  if config.dataset == "imagenet2012":
    train, val = input_pipeline.read_prepared(data_dir)
    if train.side != config.resize_size:
      raise UserInputError(
        f"{data_dir} was prepared at {train.side}x{train.side} but resize_size={config.resize_size}; "
        f"set --config.resize_size={train.side}"
      )
  else:
    train, val = input_pipeline.read_image_folder(data_dir)
  if len(train.classes) != config.num_classes:
    raise UserInputError(
      f"num_classes={config.num_classes} but {data_dir} has {len(train.classes)} classes; "
      f"set --config.num_classes={len(train.classes)}"
    )
  stats = input_pipeline.load_stats(
    data_dir if config.dataset == "imagenet2012" else "",
    config.resize_size,
    config.channel_mean,
    per_pixel=config.mean_subtraction == "image",
  )
  return train, val, stats


def create_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
  schedule = optim.make_schedule(
    config.lr_schedule,
    config.learning_rate,
    steps_per_epoch,
    total_steps,
    tuple(config.lr_boundaries_epochs),
    config.lr_decay_factor,
  )
  return optim.paper_sgd(
    schedule,
    config.momentum,
    config.weight_decay,
    config.weight_decay_on_biases,
    frozen=optim.frozen_layers(config.freeze_all_but_last),
  )


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_global(batch: dict, batch_sharding: NamedSharding) -> dict:
  """This process's numpy batch as a slice of the global, data-sharded jax batch."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def prefetch_to_device(
  batches: Iterator[dict], batch_sharding: NamedSharding, size: int = 2
) -> Iterator[dict]:
  """Keeps `size` batches already transferred to the devices while the current step runs."""
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global(batch, batch_sharding))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate(
  eval_step,
  params: Any,
  batches: Iterator[dict],
  batch_sharding: NamedSharding,
  mean_image: jax.Array,
) -> dict:
  """Loss and top-1/top-5 error over the whole split; one host sync, at the end."""
  totals = None
  for batch in prefetch_to_device(batches, batch_sharding):
    out = eval_step(params, batch, mean_image)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return {
    "val/loss": totals["loss"] / n,
    "val/top1_error": totals["top1_wrong"] / n,
    "val/top5_error": totals["top5_wrong"] / n,
  }


def _initial_state(
  model: AlexNet, tx: optax.GradientTransformation, image_size: int, seed: int, mesh: Mesh
) -> tuple[TrainState, Any]:
  """Parameters created directly in their shards (never whole on one device)."""
  unsharded = model.clone(mesh=None)

  def init():
    params = unsharded.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))[
      "params"
    ]
    plateau = {"best": jnp.float32(np.inf), "bad_evals": jnp.int32(0), "drops": jnp.int32(0)}
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), plateau=plateau)

  shardings = sharding.tree_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings


def _apply_plateau(
  state: TrainState, val_error: float, config: ml_collections.ConfigDict
) -> TrainState:
  plateau = {k: v.item() for k, v in jax.device_get(state.plateau).items()}
  plateau, factor = optim.plateau_update(
    plateau, val_error, config.plateau_patience, config.plateau_max_drops, config.lr_decay_factor
  )
  hyper = dict(state.opt_state.hyperparams)
  if factor != 1.0:
    hyper["learning_rate"] = hyper["learning_rate"] * factor
    logging.info(
      "validation error stopped improving: learning rate now %.2e", float(hyper["learning_rate"])
    )
  return state.replace(
    opt_state=state.opt_state._replace(hyperparams=hyper),
    plateau={
      "best": jnp.float32(plateau["best"]),
      "bad_evals": jnp.int32(plateau["bad_evals"]),
      "drops": jnp.int32(plateau["drops"]),
    },
  )


@dataclasses.dataclass
class _Job:
  """Everything a run or an evaluation of `config` in `workdir` needs, built before any compilation."""

  config: ml_collections.ConfigDict
  workdir: str
  train_split: Any
  val_split: Any
  stats: input_pipeline.Stats
  mesh: Mesh
  model: AlexNet
  tx: optax.GradientTransformation
  state: TrainState
  state_shardings: Any
  mgr: Any
  steps_per_epoch: int
  total_steps: int

  @property
  def data_args(self) -> dict:
    return dict(
      image_size=self.config.image_size,
      resize_size=self.config.resize_size,
      batch_size=self.config.batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_parallel_calls=self.config.num_parallel_calls,
    )

  @functools.cached_property
  def mean_image(self) -> jax.Array:
    return jax.device_put(self.stats.mean_image, self.replicated)

  @functools.cached_property
  def eval_step(self):
    return jax.jit(
      make_eval_step(self.model),
      out_shardings=self.replicated,
      in_shardings=(self.state_shardings.params, self.batch_sharding, self.replicated),
      compiler_options=backend.compiler_options(),
    )

  def evaluate(self, params: Any) -> dict:
    """Loss, top-1 and top-5 error over the whole validation split (config.eval_crops patches)."""
    batches = input_pipeline.eval_batches(
      self.val_split, crops=self.config.eval_crops, **self.data_args
    )
    return evaluate(self.eval_step, params, batches, self.batch_sharding, self.mean_image)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Job:
  check_config(config)
  try:
    backend.check_dtype(config.dtype)
  except ValueError as e:
    raise UserInputError(f"--config.dtype={config.dtype}: {e}") from e
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    checkpoints.check_resumable(workdir, config)
  train_split, val_split, stats = load_splits(config, workdir)
  mesh = sharding.make_mesh(config.model_parallelism, jax.devices()[: config.num_devices] or None)
  model = create_model(config, mesh)
  steps_per_epoch = len(train_split) // config.batch_size
  total_steps = (
    config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  )
  tx = create_optimizer(config, steps_per_epoch, total_steps)
  state, state_shardings = _initial_state(model, tx, config.image_size, config.seed, mesh)
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  return _Job(
    config,
    workdir,
    train_split,
    val_split,
    stats,
    mesh,
    model,
    tx,
    state,
    state_shardings,
    mgr,
    steps_per_epoch,
    total_steps,
  )


def _log_eval(step: int, result: dict) -> None:
  if jax.process_index() == 0:
    logging.info(
      "step %d: val loss %.4f, top-1 error %.2f%%, top-5 error %.2f%%",
      step,
      result["val/loss"],
      100 * result["val/top1_error"],
      100 * result["val/top5_error"],
    )


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict:
  """Evaluates the latest (or the named) checkpoint of workdir on the whole validation split."""
  job = _setup(config, workdir)
  steps = job.mgr.all_steps()
  if not steps or (step is not None and step not in steps):
    job.mgr.close()
    raise UserInputError(
      f"no checkpoint {'' if step is None else step} in {job.mgr.directory}"
      f"{f' (there are {sorted(steps)})' if steps else ''}: train first, or pass a saved --step"
    )
  state = checkpoints.restore(job.mgr, job.state, step)
  job.mgr.close()
  result = job.evaluate(state.params)
  _log_eval(int(state.step), result)
  writer = metrics.MetricWriter(job.workdir, enabled=jax.process_index() == 0)
  writer.write(int(state.step), result | {"val/eval_crops": config.eval_crops})
  writer.close()
  return result


class NonFiniteLoss(UserInputError):
  """The loss or a gradient became NaN or Inf: the run stops before saving the broken state."""


def _first_nonfinite(records: list[dict], first_step: int) -> int | None:
  for i, record in enumerate(records):
    if not record["finite"]:
      return first_step + i
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir if any) and evaluates.

  Returns the last evaluation's metrics. SIGTERM or SIGINT saves a checkpoint at the
  current step and returns; rerunning the same command continues bit-identically.
  """
  job = _setup(config, workdir)
  lead = jax.process_index() == 0
  state, mgr, total_steps = job.state, job.mgr, job.total_steps
  if mgr.latest_step() is not None:
    state = checkpoints.restore(mgr, state)
    logging.info("resumed from %s at step %d", mgr.directory, int(state.step))
  elif config.init_from:
    state = state.replace(params=pretrained.init_params(config, state.params))
  start = int(state.step)
  if lead:
    checkpoints.save_config(job.workdir, config)
    input_pipeline.save_stats(job.workdir, job.stats)
    metrics.truncate_after(job.workdir, start)  # lines a killed run wrote past its last checkpoint

  train_step = jax.jit(
    make_train_step(job.model, job.tx, config.seed, config.skip_nonfinite_steps),
    donate_argnums=0,
    in_shardings=(job.state_shardings, job.batch_sharding, job.replicated),
    out_shardings=(job.state_shardings, job.replicated),
    compiler_options=backend.compiler_options(),
  )
  writer = metrics.MetricWriter(job.workdir, enabled=lead)
  progress = metrics.Progress(total_steps, start, enabled=lead)
  stream = input_pipeline.train_batches(
    job.train_split,
    stats=job.stats,
    seed=config.seed,
    pca_std=config.pca_noise_std,
    start_step=start,
    **job.data_args,
  )
  batches = prefetch_to_device(stream, job.batch_sharding)
  logging.info(
    "training %s for %d steps (%d per epoch) on a %s mesh, from step %d",
    config.model.variant,
    total_steps,
    job.steps_per_epoch,
    dict(job.mesh.shape),
    start,
  )
  pending, last_eval, skipped_steps = [], {}, 0

  def check(records: list[dict], first_step: int) -> int:
    """Raises on a non-finite step (unless skipping them); returns how many were skipped."""
    bad = _first_nonfinite(records, first_step)
    if bad is not None and not config.skip_nonfinite_steps:
      raise NonFiniteLoss(
        f"the loss or a gradient became NaN/Inf at step {bad}; no checkpoint of that state was "
        f"written (the last good one is in {mgr.directory}): lower --config.learning_rate, or "
        "set --config.skip_nonfinite_steps=True to skip such steps"
      )
    return sum(not r["finite"] for r in records)

  with preemption.Watcher() as watcher:
    try:
      for step in range(start + 1, total_steps + 1):
        state, step_metrics = train_step(state, next(batches), job.mean_image)
        pending.append(step_metrics)
        log_now = step % config.log_every_steps == 0 or step == total_steps
        stop = watcher.requested(step, config.log_every_steps)
        save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or stop
        if log_now or save_now:
          records = jax.device_get(pending)
          skipped_steps += check(records, step - len(records) + 1)
        if log_now:
          summary = {
            k: float(np.mean([r[k] for r in records])) for k in records[0] if k != "finite"
          }
          summary["images_per_sec"] = progress.images_per_sec(step, config.batch_size)
          summary["train/skipped_images"] = stream.skipped
          if config.skip_nonfinite_steps:
            summary["train/skipped_steps"] = skipped_steps
          writer.write(step, summary)
          progress.log(step, summary)
        if log_now or save_now:
          pending = []
        evaluated = (step % config.eval_every_steps == 0 or step == total_steps) and not stop
        if evaluated:
          last_eval = job.evaluate(state.params)
          writer.write(step, last_eval)
          _log_eval(step, last_eval)
          if config.lr_schedule == "plateau":
            state = _apply_plateau(state, last_eval["val/top1_error"], config)
        if save_now:
          checkpoints.save(
            mgr,
            step,
            state,
            metrics={checkpoints.BEST_METRIC: last_eval["val/top1_error"]} if evaluated else None,
          )
        if stop:
          logging.warning(
            "%s received: saved a checkpoint at step %d; rerun the same command to continue",
            watcher.signal_name,
            step,
          )
          break
      if start >= total_steps:  # already trained: report the checkpoint's quality
        last_eval = job.evaluate(state.params)
    finally:
      mgr.wait_until_finished()
      mgr.close()
      writer.close()
  return last_eval

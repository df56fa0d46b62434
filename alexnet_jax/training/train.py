"""Training and evaluation: jitted steps on the ('data', 'model') mesh, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import datasets
from alexnet_jax.data.batches import eval_batches, train_batches
from alexnet_jax.data.stats import Stats, write_stats
from alexnet_jax.model import backend, sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import (
  agreement,
  builders,
  checkpoints,
  class_names,
  guards,
  metrics,
  optim,
  preemption,
  pretrained,
  resume_rules,
  steps,
)
from alexnet_jax.training.config_check import check_config
from alexnet_jax.training.steps import TrainState


def to_global(batch: dict, batch_sharding: NamedSharding) -> dict:
  """This process's numpy batch as a slice of the global, data-sharded jax batch."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def prefetch(items: Iterator, size: int = 2) -> Iterator:
  """Keeps `size` items made ahead (batches already on their way to the devices) while the
  current step runs."""
  queue = collections.deque()
  for item in items:
    queue.append(item)
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
  stop: Callable[[int], bool] | None = None,
) -> dict:
  """Loss and top-1/top-5 error over the whole split; one host sync, at the end. `stop(k)`,
  asked before each batch k, can cut it short (raising preemption.Stopped)."""
  totals = None
  for k, batch in enumerate(prefetch(to_global(b, batch_sharding) for b in batches)):
    if stop is not None and stop(k):
      raise preemption.Stopped(f"evaluation stopped before its batch {k}")
    out = eval_step(params, batch, mean_image)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  if not n:
    raise UserInputError(
      f"none of the {batches.skipped} validation images could be read: fix or replace them"
    )
  return {
    "val/loss": totals["loss"] / n,
    "val/top1_error": totals["top1_wrong"] / n,
    "val/top5_error": totals["top5_wrong"] / n,
    "val/skipped_images": batches.skipped,  # unreadable, left out of the figures above
  }


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
    opt_state=state.opt_state._replace(hyperparams=hyper), plateau=_placed(plateau, state.plateau)
  )


def _placed(values: dict, like: dict) -> dict:
  """Host values as state leaves: each with the dtype and sharding of the leaf it replaces
  (replicated scalars), so the jitted step takes them as they are, on any number of hosts."""
  return {k: jnp.full((), v, like[k].dtype, device=like[k].sharding) for k, v in values.items()}


def _with_log(state: TrainState, **values) -> TrainState:
  return state.replace(log=state.log | _placed(values, state.log))


def _is_eval(record: dict) -> bool:
  return any(k.startswith("val/") for k in record)


@dataclasses.dataclass
class _Job:
  """Everything a run or an evaluation of `config` in `workdir` needs, built before compiling."""

  config: ml_collections.ConfigDict
  workdir: str
  train_split: Any
  val_split: Any
  stats: Stats
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
  def steps(self) -> steps.JittedSteps:
    """The train and eval steps, jitted with their shardings; compiled on first call."""
    return steps.jit_steps(
      self.model,
      self.tx,
      self.state_shardings,
      self.mesh,
      seed=self.config.seed,
      skip_nonfinite=self.config.skip_nonfinite_steps,
      compiler_options=backend.compiler_options(
        cpu_set=self.config.get("cpu_compiler_options", "auto")  # older workdirs have none
      ),
    )

  def evaluate(self, params: Any, stop: Callable[[int], bool] | None = None) -> dict:
    """Loss, top-1 and top-5 error over the whole validation split (config.eval_crops patches);
    unreadable images are left out and counted. `stop`: see `evaluate`."""
    batches = eval_batches(self.val_split, crops=self.config.eval_crops, **self.data_args)
    return evaluate(
      self.steps.evaluate, params, batches, self.batch_sharding, self.mean_image, stop
    )

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Job:
  check_config(config)
  try:
    backend.check_dtype(config.dtype)
  except ValueError as e:
    raise UserInputError(f"--config.dtype={config.dtype}: {e}") from e
  workdir = storage.absolute(workdir)
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  resuming = storage.path(workdir).joinpath("checkpoints").is_dir()
  if resuming:
    checkpoints.check_resumable(workdir, config)
  train_split, val_split, stats = datasets.load_splits(config, workdir)
  if resuming:  # data_dir may have changed: the data must not
    data = resume_rules.DataShape.of(train_split, val_split)
    resume_rules.check_same_data(workdir, config.data_dir, data)
  agreement.check(config, datasets.Data(train_split, val_split, stats))  # every process alike
  first = config.get("first_device", 0)
  devices = jax.devices()[first : first + config.num_devices] if config.num_devices else None
  mesh = sharding.make_mesh(config.model_parallelism, devices)
  model = builders.create_model(config, mesh)
  steps_per_epoch = len(train_split) // config.batch_size
  total_steps = (
    config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  )
  tx = builders.create_optimizer(config, steps_per_epoch, total_steps)
  state, state_shardings = builders.initial_state(model, tx, config.image_size, config.seed, mesh)
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


@guards.owning_workdir
def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict:
  """Evaluates the latest (or the named) checkpoint of workdir on the whole validation split."""
  job = _setup(config, workdir)
  try:
    state = checkpoints.restore(job.mgr, job.state, step)
  finally:
    job.mgr.close()
  result = job.evaluate(state.params)
  _log_eval(int(state.step), result)
  writer = metrics.MetricWriter(job.workdir, job.steps_per_epoch, jax.process_index() == 0)
  writer.write(int(state.step), result | {"val/eval_crops": config.eval_crops})
  writer.close()
  return result


class NonFiniteLoss(UserInputError):
  """The loss, a gradient or a parameter became NaN or Inf: the run stops before saving it."""


@guards.owning_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir if any) and evaluates.

  SIGTERM or SIGINT saves a checkpoint at the current step and returns; rerunning the same
  command continues bit-identically.

  Args:
    config: the run's settings (configs/*.py's get_config(), overrides applied); checked
      before any data is read or anything compiled.
    workdir: where checkpoints/, metrics.jsonl, config.json, stats.npz, classes.json and
      tensorboard/ go; a workdir with checkpoints is resumed.

  Returns:
    The last evaluation's metrics ({"val/loss", "val/top1_error", "val/top5_error", ...});
    empty if the run stopped before its first evaluation.
  """
  job = _setup(config, workdir)
  lead = jax.process_index() == 0
  state, mgr, total_steps = job.state, job.mgr, job.total_steps
  if mgr.latest_step() is not None:
    state = checkpoints.restore(mgr, state, set_aside=True)
    logging.info("resumed from %s at step %d", mgr.directory, int(state.step))
  elif config.init_from:
    state = state.replace(params=pretrained.init_params(config, state.params))
  start = int(state.step)
  eval_pending = bool(state.log["eval_pending"])  # stopped before this step's evaluation
  if lead:
    checkpoints.save_config(job.workdir, config, start)
    write_stats(job.workdir, job.stats)
    class_names.write(job.workdir, job.train_split.classes)
    resume_rules.record_data(job.workdir, resume_rules.DataShape.of(job.train_split, job.val_split))
    # Lines a killed run wrote past its last checkpoint, and an evaluation that will be redone.
    metrics.keep_records(
      job.workdir,
      lambda r: r["step"] < start or (r["step"] == start and not (eval_pending and _is_eval(r))),
    )

  train_step = job.steps.train
  writer = metrics.MetricWriter(job.workdir, job.steps_per_epoch, enabled=lead)
  progress = metrics.Progress(total_steps, start, enabled=lead)
  stream = train_batches(
    job.train_split,
    stats=job.stats,
    seed=config.seed,
    pca_std=config.pca_noise_std,
    start_step=start,
    **job.data_args,
  )
  skipped_before = int(state.log["skipped_images"])  # by the runs this one resumes
  # Each batch on its way to the devices, with the unreadable images skipped up to it.
  batches = prefetch(
    (to_global(b, job.batch_sharding), skipped_before + stream.skipped) for b in stream
  )
  logging.info(
    "training %s for %d steps (%d per epoch) on a %s mesh, from step %d",
    config.model.variant,
    total_steps,
    job.steps_per_epoch,
    dict(job.mesh.shape),
    start,
  )
  last_eval = {}

  def check(log: dict) -> None:
    """Stops at a non-finite step (unless skipping them) before anything of it is saved."""
    bad = int(log["first_nonfinite"])
    if bad:
      raise NonFiniteLoss(
        f"the loss, a gradient or a parameter became NaN/Inf at step {bad}; no checkpoint of "
        f"that state was written (the last good one is in {mgr.directory}): lower "
        "--config.learning_rate, or set --config.skip_nonfinite_steps=True to skip such steps"
      )

  def save(step: int, state: TrainState, skipped: int, result: dict | None = None) -> None:
    best = {checkpoints.BEST_METRIC: result["val/top1_error"]} if result else None
    checkpoints.save(mgr, step, _with_log(state, skipped_images=skipped), metrics=best)

  def evaluate_at(step: int, state: TrainState, skipped: int | None) -> tuple[TrainState, dict]:
    """The step's evaluation, then the plateau rule. An evaluation that fails first saves
    the step (`skipped` given: no checkpoint of it yet), its evaluation pending."""
    try:
      result = job.evaluate(state.params, stop=watcher.stops_evaluation)
    except BaseException:  # a stop request (preemption.Stopped) too
      if skipped is not None:
        save(step, _with_log(state, eval_pending=1), skipped)
      raise
    writer.write(step, result)
    _log_eval(step, result)
    if config.lr_schedule == "plateau":
      state = _apply_plateau(state, result["val/top1_error"], config)
    return _with_log(state, eval_pending=0), result

  with guards.full_disk_is_an_error(job.workdir), preemption.Watcher() as watcher:
    try:
      if eval_pending:
        state, last_eval = evaluate_at(start, state, None)
      for step in range(start + 1, total_steps + 1):
        batch, skipped = next(batches)
        state, _ = train_step(state, batch, job.mean_image)
        log_now = step % config.log_every_steps == 0 or step == total_steps
        stop = watcher.requested(step, config.log_every_steps)
        save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or stop
        eval_now = step % config.eval_every_steps == 0 or step == total_steps
        if log_now or save_now:
          log = jax.device_get(state.log)
          check(log)
        if log_now:
          summary = steps.log_means(log)
          summary["images_per_sec"] = progress.images_per_sec(step, config.batch_size)
          summary["train/skipped_images"] = skipped
          if config.skip_nonfinite_steps:
            summary["train/skipped_steps"] = int(log["skipped_steps"])
          writer.write(step, summary)
          progress.log(step, summary)
          state = _with_log(state, **dict.fromkeys(steps.INTERVAL_KEYS, 0))
        result = None
        if eval_now and stop:  # leave promptly: the resumed run evaluates this step first
          state = _with_log(state, eval_pending=1)
        elif eval_now:
          state, result = evaluate_at(step, state, skipped)
          last_eval = result
        if save_now:
          save(step, state, skipped, result)
        if stop:
          logging.warning(
            "%s received: saved a checkpoint at step %d; rerun the same command to continue",
            watcher.signal_name,
            step,
          )
          break
      if start >= total_steps and not last_eval:  # already trained: the checkpoint's quality
        last_eval = job.evaluate(state.params, stop=watcher.stops_evaluation)
    except preemption.Stopped:
      logging.warning(
        "%s received during the evaluation of step %d: its checkpoint is saved; rerun the same "
        "command to evaluate it and continue",
        watcher.signal_name,
        int(state.step),
      )
    finally:
      try:
        mgr.wait_until_finished()  # a save still being written (it may fail: a full disk)
      finally:
        mgr.close()
        writer.close()
  return last_eval

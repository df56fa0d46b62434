"""Suites of training runs, the work of `python -m alexnet_jax.experiments`.

A suite maps variants to config overrides. `plan` gives every (variant, seed) its own normal
workdir, DIR/VARIANT/seedN; `execute` trains them one by one or side by side on disjoint
device groups, skipping finished runs (a DONE file), marking diverged ones (a DIVERGED file)
and stopping the suite on SIGTERM once the running ones saved; `report`, `curves` and
`figure1` read only the runs' files (metrics.jsonl lines carry step and epoch), so a report
needs neither the dataset nor TensorFlow. experiment.json pins a suite's settings: another
config for an existing DIR is refused, more seeds are added. DIR may be a bucket (gs://):
every file here is written whole (`files.atomic_path`), none appended or renamed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import runpy
import statistics
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import builders, metrics, preemption
from alexnet_jax.training.config_check import check_config

# variant: (config overrides, the paper's claim for it).
ABLATIONS = {
  "baseline": (
    {},
    "the paper's net: two towers, ReLU, LRN, overlapping pooling, PCA noise, dropout",
  ),
  "tanh": ({"model.activation": "tanh"}, "§3.1: ReLU trains several times faster (Figure 1: 6x)"),
  "one_tower": ({"model.towers": 1}, "§3.2: two towers: -1.7% top-1, -1.2% top-5 error"),
  "no_lrn": ({"model.lrn": False}, "§3.3: LRN: -1.4% top-1, -1.2% top-5 error"),
  "no_overlap": ({"model.overlapping_pool": False}, "§3.4: overlapping: -0.4% top-1, -0.3% top-5"),
  "no_pca": ({"pca_noise_std": 0.0}, "§4.1: PCA colour noise: over 1% lower top-1 error"),
  "no_dropout": ({"model.dropout_rate": 0.0}, "§4.2: without dropout, substantial overfitting"),
}
FIGURE1 = {
  "relu": ({}, "§3.1, Figure 1: reaches 25% training error 6x sooner than tanh"),
  "tanh": ({"model.activation": "tanh"}, "§3.1, Figure 1: the saturating baseline"),
}
SUITES = {"ablations": ABLATIONS, "figure1": FIGURE1}
SETTINGS = "experiment.json"


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: str


def load_suite(suite: str) -> dict[str, tuple[dict, str]]:
  """{variant: (overrides, claim)} of a built-in suite or of FILE.py's get_suite()."""
  if suite in SUITES:
    return SUITES[suite]
  if not suite.endswith(".py") or not os.path.exists(suite):
    raise UserInputError(
      f"--suite={suite}: use {', '.join(SUITES)} or FILE.py with get_suite() (no such file)"
    )
  get_suite = runpy.run_path(suite).get("get_suite")
  if get_suite is None:
    raise UserInputError(f"--suite={suite} defines no get_suite()")
  variants = get_suite()
  if not isinstance(variants, dict) or not variants:
    raise UserInputError(f"{suite}: get_suite() must return {{variant: {{key: value}}}}")
  return {name: (dict(overrides), "") for name, overrides in variants.items()}


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of config with dotted keys set, type-checked as --config.KEY=VALUE is."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise UserInputError(f"unknown config key {key!r} in the suite")
    try:
      node[leaf] = value
    except TypeError as e:
      raise UserInputError(f"{key}={value!r}: {e}") from None
  return config


def plan(config: ml_collections.ConfigDict, suite: dict, seeds: int, workdir: str) -> list[Run]:
  """Every run of the suite, each config checked: all mistakes found before the first run."""
  runs = []
  for variant, (overrides, _) in suite.items():
    for seed in range(seeds):
      run_config = with_overrides(config, overrides | {"seed": config.seed + seed})
      try:
        check_config(run_config)
        builders.create_model(run_config)
      except (UserInputError, ValueError) as e:
        raise UserInputError(f"variant {variant}: {e}") from None
      runs.append(Run(variant, seed, run_config, storage.join(workdir, variant, f"seed{seed}")))
  return runs


def check_settings(workdir: str, settings: dict) -> None:
  """The first call records the suite's settings; a later one must match them, but for the
  number of seeds: more adds runs beside the finished ones, fewer reports only those."""
  path = storage.path(workdir) / SETTINGS
  if path.exists():
    old = json.loads(path.read_text())
    changed = sorted(
      k for k in old.keys() | settings.keys() if k != "seeds" and old.get(k) != settings.get(k)
    )
    if changed:
      raise UserInputError(
        f"{workdir} holds a suite run with other settings ({', '.join(changed)} differ): "
        "use another --workdir, or the same settings to resume it (--seeds may change)"
      )
    if old == settings:
      return
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  files.write_text(str(path), json.dumps(settings, indent=1, sort_keys=True))


def device_groups(devices: Sequence[Any], runs_at_once: int) -> list[list[Any]]:
  """Disjoint, equal groups of the devices, one per run going at the same time."""
  if runs_at_once < 1 or len(devices) < runs_at_once:
    raise UserInputError(
      f"--runs_at_once={runs_at_once}: use 1..{len(devices)} (one device or more per run)"
    )
  size = len(devices) // runs_at_once
  return [list(devices[i * size : (i + 1) * size]) for i in range(runs_at_once)]


def _done_path(run: Run) -> str:
  return storage.join(run.workdir, "DONE")


def _diverged_path(run: Run) -> str:
  return storage.join(run.workdir, "DIVERGED")


def _exists(path: str) -> bool:
  return storage.path(path).exists()


def _finished(run: Run) -> bool:
  """Trained to the end, or stopped for good by a NaN/Inf (a sweep's too-high rate)."""
  return _exists(_done_path(run)) or _exists(_diverged_path(run))


def execute(runs: list[Run], runs_at_once: int = 1) -> None:
  """Trains every unfinished run; with runs_at_once > 1 in threads, each on its own devices.
  A preemption signal stops the suite after the runs save; a run whose loss becomes NaN/Inf
  is marked DIVERGED (with the error) and the suite goes on."""
  from alexnet_jax.training import train  # TensorFlow and the train loop: not for --report_only

  todo = [r for r in runs if not _finished(r)]
  groups = device_groups(jax.devices(), runs_at_once)

  def one(run: Run, group: int) -> None:
    config = ml_collections.ConfigDict(run.config.to_dict())
    if runs_at_once > 1:
      config.first_device, config.num_devices = group * len(groups[0]), len(groups[0])
    logging.info("run %s seed %d in %s", run.variant, run.seed, run.workdir)
    try:
      train.train_and_evaluate(config, run.workdir)
    except train.NonFiniteLoss as e:
      logging.warning("run %s seed %d diverged: %s", run.variant, run.seed, e)
      storage.path(run.workdir).mkdir(parents=True, exist_ok=True)
      files.write_text(_diverged_path(run), f"{e}\n")
      return
    if preemption.signals_received() == before:
      files.write_text(_done_path(run), "finished\n")

  before = preemption.signals_received()
  # One at a time in this (the main) thread, where the runs catch SIGTERM; side by side in
  # threads (a signal then stops the suite when the process ends).
  pool = concurrent.futures.ThreadPoolExecutor(runs_at_once) if runs_at_once > 1 else None
  for start in range(0, len(todo), runs_at_once):
    batch = todo[start : start + runs_at_once]
    if pool is None:
      one(batch[0], 0)
    else:
      list(pool.map(one, batch, range(len(batch))))
    if preemption.signals_received() > before:
      logging.warning("stopped by a preemption signal: rerun the same command to continue")
      break
  if pool is not None:
    pool.shutdown()


def _mean_std(values: list[float]) -> str:
  if len(values) < 2:  # no spread to show from one seed
    return f"{100 * values[0]:.1f}" if values else "-"
  return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summarize(run: Run) -> dict:
  """A finished run's numbers, from its metrics.jsonl."""
  records = metrics.read_metrics(run.workdir)
  val = [r for r in records if "val/top1_error" in r and "val/eval_crops" not in r]
  trained = [r for r in records if "train/top1_error" in r]
  speed = [r["images_per_sec"] for r in trained[1:] if r.get("images_per_sec")]
  return {
    "val_top1": val[-1]["val/top1_error"] if val else None,
    "val_top5": val[-1]["val/top5_error"] if val else None,
    "train_top1": trained[-1]["train/top1_error"] if trained else None,
    "steps": trained[-1]["step"] if trained else 0,
    "images_per_sec": statistics.mean(speed) if speed else None,
  }


def parameter_count(config: ml_collections.ConfigDict) -> int:
  model = builders.create_model(config)
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def report(suite: dict, runs: list[Run]) -> str:
  """results.md's table: one row per variant, from its finished runs' metrics."""
  rows = [
    "| variant | the paper's claim | val top-1 error % | val top-5 error % | final train "
    "error % | parameters | images/s | steps | seeds |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for variant, (_, claim) in suite.items():
    mine = [r for r in runs if r.variant == variant]
    done = [summarize(r) for r in mine if _exists(_done_path(r))]
    diverged = [r for r in mine if _exists(_diverged_path(r))]

    def found(key: str) -> list[float]:
      return [d[key] for d in done if d[key] is not None]

    speed = f"{statistics.mean(found('images_per_sec')):.0f}" if found("images_per_sec") else "-"
    cells = [
      variant,
      claim,
      _mean_std(found("val_top1")),
      _mean_std(found("val_top5")),
      _mean_std(found("train_top1")),
      f"{parameter_count(mine[0].config):,}",
      speed,
      str(max(found("steps"), default=0)),
      f"{len(done)}/{len(mine)}" + (f", {len(diverged)} diverged" if diverged else ""),
    ]
    rows.append("| " + " | ".join(cells) + " |")
    notes += [f"- {r.variant} seed {r.seed} diverged: {_first_line(r)}" for r in diverged]
  return "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _first_line(run: Run) -> str:
  return storage.path(_diverged_path(run)).read_text().split("\n", 1)[0].strip()


def _aligned(runs: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
  """(steps every seed logged, (seeds, steps) values at them)."""
  if not runs or not all(runs):
    return np.zeros(0), np.zeros((0, 0))
  common = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
  values = np.asarray([[dict(run)[s] for s in common] for run in runs], np.float64)
  return np.asarray(common), values


def curves(runs: list[Run]) -> dict:
  """{variant: {"train": (steps, errors), "val": (steps, errors)}} of the finished runs."""
  out = {}
  for variant in dict.fromkeys(r.variant for r in runs):
    parts = {"train": [], "val": []}
    for run in runs:
      if run.variant != variant or not _exists(_done_path(run)):
        continue
      records = metrics.read_metrics(run.workdir)
      for part, key in (("train", "train/top1_error"), ("val", "val/top1_error")):
        parts[part].append([(r["step"], r[key]) for r in records if key in r])
    out[variant] = {part: _aligned(found) for part, found in parts.items()}
  return out


def epochs_of(run: Run) -> dict[int, float]:
  """{step: epoch} from the run's metrics lines, which carry both: no dataset is opened."""
  records = metrics.read_metrics(run.workdir)
  if any("epoch" not in r for r in records):
    raise UserInputError(
      f"{run.workdir}/metrics.jsonl has lines without an epoch (written by an older "
      "alexnet_jax); train that run again to draw Figure 1"
    )
  return {r["step"]: r["epoch"] for r in records}


def first_reach(epochs: np.ndarray, errors: np.ndarray, target: float) -> float | None:
  """The first epoch at which the seeds' mean training error is at or below target."""
  below = np.nonzero(errors.mean(0) <= target)[0] if errors.size else []
  return float(epochs[below[0]]) if len(below) else None


def figure1(workdir: str, runs: list[Run], target: float) -> str | None:
  """DIR/figure1.png for a suite with ReLU (relu or baseline) and tanh variants; returns the
  line for results.md: the epochs each takes to reach `target` and their ratio."""
  from alexnet_jax.analysis import figures

  relu = "relu" if any(r.variant == "relu" for r in runs) else "baseline"
  chosen = [r for r in runs if r.variant in (relu, "tanh")]
  if {r.variant for r in chosen} != {relu, "tanh"}:
    return None
  epoch = {}
  for run in chosen:
    epoch |= epochs_of(run)
  found = {v: c["train"] for v, c in curves(chosen).items()}
  by_epoch = {v: (np.asarray([epoch[s] for s in steps]), e) for v, (steps, e) in found.items()}
  reached = {v: first_reach(e, errors, target) for v, (e, errors) in by_epoch.items()}
  figures.figure1(by_epoch, target, reached, storage.join(workdir, "figure1.png"))
  fast, slow = reached.get(relu), reached.get("tanh")
  ratio = f"{slow / fast:.1f}x" if fast and slow else "not measurable (a variant never got there)"
  line = (
    f"Figure 1: {target:.0%} training error reached at epoch "
    f"{'%.2f' % fast if fast else 'never'} with ReLU ({relu}) and "
    f"{'%.2f' % slow if slow else 'never'} with tanh: tanh takes {ratio} as long (paper: 6x)."
  )
  lowest = {v: errors.mean(0).min() for v, (_, errors) in by_epoch.items() if errors.size}
  if not (fast and slow) and len(lowest) == 2:  # say which target this suite can measure
    worst = max(lowest.values())
    line += (
      f" Lowest mean training error: ReLU {lowest[relu]:.1%}, tanh {lowest['tanh']:.1%}; "
      f"--target_error={np.ceil(100 * worst) / 100:.2f} --report_only measures a ratio."
    )
  return line + "\n"


def run_suite(
  config: ml_collections.ConfigDict,
  suite_name: str,
  workdir: str,
  seeds: int = 1,
  runs_at_once: int = 1,
  target_error: float = 0.25,
  report_only: bool = False,
) -> str:
  """Runs (or, with report_only, only reports) a suite; returns the text of results.md."""
  if seeds < 1:
    raise UserInputError(f"--seeds={seeds}: run each variant at least once")
  suite = load_suite(suite_name)
  workdir = storage.absolute(workdir)
  if config.dataset == "synthetic" and not config.data_dir:
    config = with_overrides(config, {"data_dir": storage.join(workdir, "data")})  # generated once
  runs = plan(config, suite, seeds, workdir)
  if not report_only:
    device_groups(jax.devices(), runs_at_once)
    settings = {
      "config": config.to_dict(),
      "suite": {v: o for v, (o, _) in suite.items()},
      "seeds": seeds,
    }
    check_settings(workdir, json.loads(json.dumps(settings, default=str)))
    execute(runs, runs_at_once)
  table = report(suite, runs)
  from alexnet_jax.analysis import figures

  figures.suite_curves(curves(runs), storage.join(workdir, "curves.png"))
  line = figure1(workdir, runs, target_error)
  text = table + ("\n" + line if line else "")
  files.write_text(storage.join(workdir, "results.md"), text)
  return text

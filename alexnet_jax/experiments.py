"""The paper's experiments in one command: the ablations of §3-4, Figure 1, or any sweep,
each variant for every seed in its own workdir, then a table and plots of their results.

  python -m alexnet_jax.experiments --config=configs/ablations.py --suite=ablations \
      --workdir=DIR [--seeds=3] [--runs_at_once=N] [--report_only] [--config.KEY=VALUE ...]

--suite: `ablations` (baseline, tanh, one tower, no LRN, non-overlapping pooling, no PCA
colour noise, no dropout), `figure1` (ReLU against tanh: training error against epochs, the
epochs each takes to reach --target_error and their ratio), or FILE.py whose get_suite()
returns {variant: {config key: value}}. Every run is DIR/VARIANT/seedN, a normal workdir.
The suite resumes: finished runs are skipped, a stopped one continues from its checkpoint
(SIGTERM stops the whole suite after saving), a run whose loss turns NaN is marked diverged
and the suite goes on; other settings for an existing DIR are refused, but for --seeds (a
larger number adds runs). Every number in DIR/results.md, DIR/curves.png and
DIR/figure1.png comes from the runs' own metrics.jsonl (--report_only redraws them).
"""

from __future__ import annotations

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.studies import suites


def define_flags() -> None:
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", "configs/ablations.py", "Config file (get_config()).", lock_config=True
  )
  flags.DEFINE_string("suite", "ablations", "ablations, figure1, or FILE.py with get_suite().")
  flags.DEFINE_string("workdir", None, "The suite's folder: one workdir per run.", required=True)
  flags.DEFINE_integer("seeds", 1, "Runs per variant (seeds config.seed, +1, ...).")
  flags.DEFINE_integer(
    "runs_at_once", 1, "Runs side by side, each on its own 1/N of the devices (1: one by one)."
  )
  flags.DEFINE_float("target_error", 0.25, "Figure 1's training error target (the paper: 25%).")
  flags.DEFINE_bool("report_only", False, "Redraw results.md and the plots from what is on disk.")


def main() -> None:
  f = flags.FLAGS
  cli.use_compilation_cache()
  print(
    suites.run_suite(
      f.config, f.suite, f.workdir, f.seeds, f.runs_at_once, f.target_error, f.report_only
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)

"""The paper's figures for a trained run, with one command:

  python -m alexnet_jax.paper_figures --workdir=DIR --output_dir=OUT [--step=N] [--queries=8]
    [--k=6]

Restores the checkpoint, extracts fc7 of the run's val and train splits (OUT/val.npz,
OUT/train.npz), finds each query's nearest training images, and writes
OUT/figure3_kernels.png, OUT/figure4_predictions.png, OUT/figure4_neighbours.png and
OUT/training_curves.png. Queries are val images spread evenly over the split. Figure 4
shows image files, so the run's data must be image files (synthetic or image_folder).
"""

from __future__ import annotations

from absl import flags

from alexnet_jax.analysis import paper_figures
from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The training run's workdir (checkpoints/ and config.json).")
  flags.DEFINE_string("output_dir", None, "Where the figures and features files go.")
  flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest).")
  flags.DEFINE_integer("queries", 8, "Val images shown in Figure 4.")
  flags.DEFINE_integer("k", 6, "Nearest training images per query (the paper shows 6).")
  flags.DEFINE_integer("batch_size", 128, "Images per extraction batch, over all devices.")


def main() -> None:
  f = flags.FLAGS
  if not f.workdir or not f.output_dir:
    raise UserInputError("pass --workdir=DIR and --output_dir=OUT")
  out = paper_figures.run(f.workdir, f.output_dir, f.step, f.queries, f.k, f.batch_size)
  print("\n".join(f"{name}: {path}" for name, path in out.items()))


if __name__ == "__main__":
  cli.run(main, define_flags)

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

import os

import jax
import numpy as np
from absl import flags

from alexnet_jax.analysis import featurefile, features, figures, retrieval
from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import metrics
from alexnet_jax.training.restore import restore

FILES = {
  "kernels": "figure3_kernels.png",
  "predictions": "figure4_predictions.png",
  "neighbours": "figure4_neighbours.png",
  "curves": "training_curves.png",
  "val": "val.npz",
  "train": "train.npz",
}


def run(
  workdir: str,
  output_dir: str,
  step: int | None = None,
  num_queries: int = 8,
  k: int = 6,
  batch_size: int = 128,
) -> dict[str, str]:
  """Writes every file of FILES into output_dir; returns their paths by name."""
  restored = restore(workdir, step)
  if restored.config.dataset == "prepared":
    raise UserInputError(
      "Figure 4 shows image files, and prepared shards have none: extract an image folder with "
      "python -m alexnet_jax.extract --images=... and draw it with alexnet_jax.figures"
    )
  os.makedirs(output_dir, exist_ok=True)
  out = {name: os.path.join(output_dir, f) for name, f in FILES.items()}
  figures.save_kernels(
    np.asarray(jax.device_get(restored.params["conv1"]["kernel"])), out["kernels"]
  )
  figures.training_curves(metrics.read_metrics(workdir), out["curves"])
  for split in ("val", "train"):
    features.extract_split(restored, workdir, split, out[split], batch_size)
  queries, database = featurefile.read(out["val"]), featurefile.read(out["train"])
  rows = np.linspace(0, len(queries["path"]) - 1, min(num_queries, len(queries["path"]))).astype(
    int
  )
  index, _ = retrieval.nearest(queries["fc7"][rows], database["fc7"], k)
  figures.predictions_of(queries, rows, out["predictions"])
  figures.neighbours_of(queries, database, rows, index, out["neighbours"])
  return out


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
  out = run(f.workdir, f.output_dir, f.step, f.queries, f.k, f.batch_size)
  print("\n".join(f"{name}: {path}" for name, path in out.items()))


if __name__ == "__main__":
  cli.run(main, define_flags)

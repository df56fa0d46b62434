"""The paper's figures for a trained run (`python -m alexnet_jax.paper_figures`): conv1's kernels
(Figure 3), predictions and nearest training images of val queries (Figure 4), the training
curves, and the fc7 features files they come from; into a local folder or a bucket (gs://)."""

from __future__ import annotations

import jax
import numpy as np

from alexnet_jax.analysis import featurefile, features, figures, retrieval
from alexnet_jax.core import storage
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
      "python -m alexnet_jax.extract --images=... and draw it with alexnet_jax.analysis.figures"
    )
  storage.path(output_dir).mkdir(parents=True, exist_ok=True)
  out = {name: storage.join(output_dir, f) for name, f in FILES.items()}
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

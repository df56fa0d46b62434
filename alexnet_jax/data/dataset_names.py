"""The names `config.dataset` takes: facts about names only, so that checking a config reads
them without TensorFlow and the data part never imports training."""

from __future__ import annotations

DATASETS = ("synthetic", "image_folder", "prepared")
TFDS_PREFIX = "tfds:"


def tfds_name(dataset: str) -> str | None:
  """The TFDS name (NAME[/CONFIG][:VERSION]) a `dataset` setting names, or None. The bare
  imagenet2012 is TFDS's too: the name a flax user types (flax's examples/imagenet reads it)."""
  if dataset.startswith(TFDS_PREFIX):
    return dataset[len(TFDS_PREFIX) :]
  return "imagenet2012" if dataset == "imagenet2012" else None

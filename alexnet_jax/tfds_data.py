"""TFDS datasets by name (`--config.dataset=tfds:NAME`): any prepared image-classification
dataset of tensorflow-datasets, read by index from its ArrayRecord files, so that step s's
batch stays a pure function of (seed, s) and each process reads its own rows.

Training downloads and builds nothing: a dataset that is not prepared is a one-line error
that says how to build it, with this module's command (TFDS's builder, as `tfds build` runs
it, without the `tfds` command's apache-beam import):

  python -m alexnet_jax.tfds_data --dataset=imagenet2012 --manual_dir=ARCHIVES [--data_dir=DIR]

TFDS stores originals: the input pipeline rescales them on the fly, and the statistics (mean
image, colour PCA) are sampled from the training split once and cached. Imports TensorFlow:
the model path never imports this module.
"""

from __future__ import annotations

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.data import tfds_source


def define_flags() -> None:
  flags.DEFINE_string("dataset", None, "TFDS name: NAME[/CONFIG][:VERSION].", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")
  flags.DEFINE_string("manual_dir", None, "The files TFDS reads but cannot download.")


def main() -> None:
  f = flags.FLAGS
  print(
    f"built {f.dataset} as ArrayRecord in {tfds_source.build(f.dataset, f.data_dir, f.manual_dir)}"
  )


if __name__ == "__main__":
  cli.run(main, define_flags)

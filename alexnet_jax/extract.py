"""fc7 features and top-5 predictions of a trained net, for a folder of images or a split of
its data.

  python -m alexnet_jax.extract --workdir=DIR --images=FOLDER --output=FILE.npz
  python -m alexnet_jax.extract --workdir=DIR --split=train --output=FILE.npz
    [--step=N] [--batch_size=128] [--dtype=bfloat16]

Images are preprocessed as for evaluation (shorter side to resize_size, central square,
centre crop of image_size, mean subtracted) and run through the restored net in batches
on every device present. Each batch's rows go straight to the features file
(`featurefile.Writer`), so memory does not grow with the number of images. Unreadable
images are reported and skipped; the rest are extracted. One process only.

The free space the file needs is checked before any image is read. A stopped extraction
(SIGTERM or SIGINT between batches, a crash, a kill) keeps its rows in OUTPUT.partial/, and
the same command again goes on from them; a partial of another net or other images is
replaced, never used. --workdir and --output may be in a bucket (gs://...): the rows are then
kept in a local folder under TMPDIR (a rerun on the same host resumes from it) and the file
is uploaded whole when it is complete; --images must be a local folder.
"""

from __future__ import annotations

from absl import flags, logging

from alexnet_jax.analysis import features
from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import image_files
from alexnet_jax.model.alexnet import VARIANTS
from alexnet_jax.training.config_check import DTYPES
from alexnet_jax.training.restore import restore


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The training run's workdir (checkpoints/ and config.json).")
  flags.DEFINE_string(
    "images", None, f"A folder of {image_files.NAMED} images, nested folders included."
  )
  flags.DEFINE_enum(
    "split", None, ["train", "val"], "A split of the run's own dataset, instead of --images."
  )
  flags.DEFINE_string("output", None, "The features file to write (.npz).")
  flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest).")
  flags.DEFINE_integer("batch_size", 128, "Images per batch, over all devices.")
  flags.DEFINE_enum("variant", None, VARIANTS, "If given, the run must have trained this variant.")
  flags.DEFINE_enum(
    "dtype",
    None,
    list(DTYPES),
    "The dtype the net computes in (default: the run's). bfloat16 is faster only where the "
    "chip computes it natively (docs/features.md has the measured difference to float32).",
  )


def main() -> None:
  f = flags.FLAGS
  if not f.workdir or not f.output or (f.images is None) == (f.split is None):
    raise UserInputError("pass --workdir, --output and one of --images=FOLDER or --split=train|val")
  restored = restore(f.workdir, f.step, variant=f.variant, dtype=f.dtype)
  logging.info(
    "extracting with the checkpoint at step %d on a %s mesh in %s",
    restored.step,
    dict(restored.mesh.shape),
    restored.config.dtype,
  )
  if f.images is not None:
    report = features.extract_folder(restored, f.workdir, f.images, f.output, f.batch_size)
  else:
    report = features.extract_split(restored, f.workdir, f.split, f.output, f.batch_size)
  skipped = (
    f"; skipped {len(report.skipped)} unreadable: {', '.join(report.skipped)}"
    if report.skipped
    else ""
  )
  print(f"wrote {report.count} images to {f.output}{skipped}")


if __name__ == "__main__":
  cli.run(main, define_flags)

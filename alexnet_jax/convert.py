"""Published AlexNet weights into a workdir of ours, and ours out as a PyTorch state dict.

    python -m alexnet_jax.convert --input=alexnet-owt-7be5be79.pth --output=DIR
    python -m alexnet_jax.convert --input=bvlc_alexnet.npy --output=DIR
    python -m alexnet_jax.convert --input=WORKDIR --output=alexnet.pth  # and back

Either side may be in a bucket (gs://...): a weights file there is downloaded to a local
temporary file to be checked and read, and a state dict written there is uploaded whole.
The layouts themselves are in `layouts.py`.
"""

from __future__ import annotations

from absl import flags

from alexnet_jax.core import cli, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import published
from alexnet_jax.weights.layouts import (
  FORMATS,
)


def define_flags() -> None:
  flags.DEFINE_string(
    "input",
    None,
    "A weights file to import (.pth, .pt, .safetensors, .npz, Caffe's .npy), "
    "or a workdir (checkpoint folder) of ours to export.",
    required=True,
  )
  flags.DEFINE_string(
    "output",
    None,
    "Import: the workdir to write. Export: the state dict file to write "
    "(.pth, .pt, .safetensors, .npz).",
    required=True,
  )
  flags.DEFINE_enum(
    "format",
    None,
    list(FORMATS),
    "Import: the format the file must hold (default: found from "
    "the file). Export: torchvision or torch_grouped (default: from the checkpoint's variant).",
  )
  flags.DEFINE_integer("step", None, "Export: the checkpoint step (default: the latest).")


def main() -> None:
  f = flags.FLAGS
  source = storage.path(f.input)
  if source.is_dir():
    print(
      f"wrote {published.export_weights(f.input, f.output, f.format, f.step)} weights to {f.output}"
    )
  elif source.exists():
    published.import_weights(f.input, f.output, f.format)
    print(f"wrote a step-0 checkpoint of {f.input} to {f.output}")
  else:
    raise UserInputError(f"--input={f.input} does not exist")


if __name__ == "__main__":
  cli.run(main, define_flags)

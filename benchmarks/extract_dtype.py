"""What extracting in bfloat16 changes against float32, on a trained run's own images.

  python benchmarks/extract_dtype.py --workdir=DIR [--split=val] [--k=10] [--batch_size=128]

Extracts the split twice with `python -m alexnet_jax.extract`'s own code, `--dtype=float32`
and `--dtype=bfloat16`, and compares the files (`analysis.dtype_agreement`): top-1 and top-5
agreement, fc7 cosine similarity, the k nearest other images. Also each file's top-1 accuracy
against the labels, and each extraction's seconds (one run each, compilation and input
pipeline included: the net's own speed is `benchmarks/cpu_vs_torch.py`'s evaluation). The
last line is JSON.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import flags

from alexnet_jax.analysis import dtype_agreement, featurefile, features
from alexnet_jax.core import cli
from alexnet_jax.training.restore import restore

DTYPES = ("float32", "bfloat16")


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
  flags.DEFINE_enum("split", "val", ["train", "val"], "Which of the run's splits to extract.")
  flags.DEFINE_integer("k", 10, "Retrieval neighbours compared per image.")
  flags.DEFINE_integer("batch_size", 128, "Images per batch.")


def main() -> None:
  args = flags.FLAGS
  files, seconds = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in DTYPES:
      restored = restore(args.workdir, dtype=dtype)
      path = os.path.join(tmp, f"{dtype}.npz")
      t0 = time.perf_counter()
      features.extract_split(restored, args.workdir, args.split, path, args.batch_size)
      seconds[dtype] = round(time.perf_counter() - t0, 2)
      files[dtype] = featurefile.read(path)
  agreement = dtype_agreement.compare(files["float32"], files["bfloat16"], args.k)
  accuracy = {
    d: round(float(np.mean(f["top5_index"][:, 0] == f["label"])), 4) for d, f in files.items()
  }
  report = {
    "workdir": args.workdir,
    "split": args.split,
    "step": int(files["float32"]["step"]),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "agreement": dataclasses.asdict(agreement),
    "top1_accuracy": accuracy,
    "extract_seconds": seconds,
  }
  a = agreement
  print(
    f"{a.images} images of {args.split}, step {report['step']}, jax {jax.__version__}: bfloat16 "
    f"against float32: same top-1 {a.top1:.2%}, top-5 overlap {a.top5:.2%}, fc7 cosine mean "
    f"{a.cosine_mean:.5f} (min {a.cosine_min:.5f}), same {a.k} nearest images {a.neighbours:.2%}; "
    f"top-1 accuracy {accuracy['float32']:.2%} (float32) and {accuracy['bfloat16']:.2%} "
    f"(bfloat16); extraction {seconds['float32']} s and {seconds['bfloat16']} s"
  )
  print(json.dumps(report))


if __name__ == "__main__":
  cli.run(main, define_flags)

"""What the analysis commands write into a bucket (a real GCS server on 127.0.0.1), as separate
processes: extract's features file equals a local extraction's, from a local run or a run in
the bucket; a killed extraction into the bucket resumes; weights converted to a bucket and
back are the same weights."""

import os
import re
import signal
import sys
import time

import numpy as np
import pytest
from conftest import assert_trees_equal, params_of, start

from alexnet_jax.analysis import featurefile
from alexnet_jax.core import files
from alexnet_jax.weights import readers

pytestmark = pytest.mark.slow

EXTRACT = (sys.executable, "-m", "alexnet_jax.extract")
CONVERT = (sys.executable, "-m", "alexnet_jax.convert")
# extract, each batch's rows written 2 s late: a run that is still going when it records its
# first rows (every 10 s), to be killed there.
SLOW_EXTRACT = (
  sys.executable,
  "-c",
  "import runpy, sys, time\n"
  "from alexnet_jax.analysis import featurefile\n"
  "append = featurefile.Writer.append\n"
  "featurefile.Writer.append = lambda *a: (time.sleep(2), append(*a))\n"
  "sys.argv[0] = 'extract'\n"
  "runpy.run_module('alexnet_jax.extract', run_name='__main__', alter_sys=True)\n",
)
KEYS = ("fc7", "top5_index", "top5_prob", "path", "label", "classes", "step")


def finish(proc, timeout: int = 300) -> str:
  """The process's stdout once it exits 0."""
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def assert_same_features(a: str, b: str) -> None:
  fa, fb = featurefile.read(a), featurefile.read(b)
  for key in KEYS:
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def upload_tree(local: str, remote: str) -> None:
  for root, _, names in os.walk(local):
    for name in names:
      path = os.path.join(root, name)
      files.upload(path, f"{remote}/{os.path.relpath(path, local)}")


def test_extract_into_a_bucket_equals_a_local_extraction(gcs, trained_run, tmp_path):
  """The same command, OUTPUT local and in the bucket, and with the run itself in the bucket
  (restored from there): the same rows, bit for bit."""
  bucket = gcs.bucket()
  upload_tree(trained_run, f"{bucket}/run")
  outputs = {
    "local": (trained_run, str(tmp_path / "val.npz")),
    "bucket": (trained_run, f"{bucket}/out/val.npz"),
    "run in the bucket": (f"{bucket}/run", f"{bucket}/out/from_bucket.npz"),
  }
  procs = {
    name: start([f"--workdir={run}", "--split=val", f"--output={out}"], launcher=EXTRACT)
    for name, (run, out) in outputs.items()
  }
  for name, proc in procs.items():
    assert f"wrote 20 images to {outputs[name][1]}" in finish(proc), name
  assert gcs.files(f"{bucket}/out") == [f"{bucket}/out/from_bucket.npz", f"{bucket}/out/val.npz"]
  assert_same_features(f"{bucket}/out/val.npz", str(tmp_path / "val.npz"))
  assert_same_features(f"{bucket}/out/from_bucket.npz", str(tmp_path / "val.npz"))


def test_a_killed_extraction_into_a_bucket_resumes_from_its_local_rows(gcs, trained_run, tmp_path):
  """SIGKILL once the first rows are recorded (in the staging folder under TMPDIR), the same
  command again: it goes on from them, and the file equals an uninterrupted extraction's."""
  output = f"{gcs.bucket()}/val.npz"
  staging = tmp_path / "tmp"
  staging.mkdir()
  env = {"TMPDIR": str(staging)}
  args = [f"--workdir={trained_run}", "--split=val", f"--output={output}", "--batch_size=2"]
  reference = start([*args[:2], f"--output={tmp_path / 'val.npz'}", args[3]], launcher=EXTRACT)
  proc = start(args, launcher=SLOW_EXTRACT, env=env)
  progress = staging / "alexnet_jax_features"
  deadline = time.monotonic() + 240
  while not list(progress.glob("*.partial/progress.json")) and proc.poll() is None:
    assert time.monotonic() < deadline, "no progress recorded"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not gcs.files(output)  # nothing in the bucket until the file is whole
  rerun = start(args, launcher=EXTRACT, env=env)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-3000:]
  assert re.search(rf"resuming the extraction into {output} at image [1-9]\d* of 20", err), err
  finish(reference)
  assert_same_features(output, str(tmp_path / "val.npz"))
  assert list(progress.iterdir()) == []  # the staged rows are removed


def test_weights_converted_into_a_bucket_and_back_are_the_same(gcs, trained_run):
  """Export the run to a state dict in the bucket, import that file into a workdir in the
  bucket, export that again: the same tensors, and the same parameters as the run's."""
  bucket = gcs.bucket()
  steps = [
    (trained_run, f"{bucket}/alexnet.safetensors", "wrote torch_grouped weights"),
    (f"{bucket}/alexnet.safetensors", f"{bucket}/imported", "wrote a step-0 checkpoint"),
    (f"{bucket}/imported", f"{bucket}/back.npz", "wrote torch_grouped weights"),
  ]
  for source, output, said in steps:
    out = finish(start([f"--input={source}", f"--output={output}"], launcher=CONVERT))
    assert said in out, out
  exported = readers.read_state_dict(f"{bucket}/alexnet.safetensors")
  assert_trees_equal(readers.read_state_dict(f"{bucket}/back.npz"), exported)
  assert_trees_equal(params_of(f"{bucket}/imported"), params_of(trained_run))

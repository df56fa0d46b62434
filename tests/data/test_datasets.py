"""The data a config names, wherever it is: a bucket's is read from a local copy."""

import os

from conftest import small_config

from alexnet_jax.data import datasets, staging


def test_the_synthetic_set_of_a_bucket_is_generated_on_the_local_disk(gcs, tmp_path):
  """Deterministic and quick to make: each host generates it where a staged copy would be,
  and the bucket is never written."""
  bucket = gcs.bucket()
  config = small_config(f"{bucket}/synth", dataset="synthetic", stage_dir=str(tmp_path))
  data = datasets.load_splits(config, str(tmp_path / "run"))
  local = staging.local_dir(f"{bucket}/synth", str(tmp_path))
  assert len(data.train) == 80 and all(p.startswith(local) for p in data.train.paths)
  assert os.path.exists(os.path.join(local, ".complete")) and gcs.files(bucket) == []
  config.data_dir = ""  # the default place, workdir/data, in a bucket workdir
  data = datasets.load_splits(config, f"{bucket}/run")
  assert data.train.paths[0].startswith(staging.local_dir(f"{bucket}/run/data", str(tmp_path)))
  assert gcs.files(bucket) == []

"""A Cloud TPU v5e pod slice, v5e-32 unless told (32 chips, one JAX device each, on 8 hosts of 4):
128 images per chip, so the global batch grows with the slice: 128 x chips, 4096 on a
v5e-32 (k = 32 times the paper's 128). `--config=configs/tpu_pod.py:64` is a v5e-64's.

- Learning rate 0.01 x k (0.32 on a v5e-32), the linear rule, with Goyal et al. 2017's
  gradual warmup ("Accurate, Large Minibatch SGD", arXiv:1706.02677): the rate rises step by
  step over the first 5 epochs from the paper's 0.01 (their rate/k), then drops /10 at epochs
  30, 60 and 80 like the paper's. Why: k = 32 is beyond the 8 GPUs (batch 1024) at which
  Krizhevsky 2014 measured the linear rule on AlexNet-like nets (configs/gpu8.py); Goyal et
  al. kept ResNet-50's accuracy up to batch 8192 with this rule only with the warmup. They
  measured a net with batch normalization, this one has none: watch the first epochs' loss.
- dtype bfloat16: the TPU's matrix units compute in bfloat16 (a v5e chip's 197 TFLOP/s peak
  is bfloat16's); parameters, gradients and momentum stay float32.
- Data: `dataset="prepared"` as JPEG shards (about 30 GB) in a gs:// bucket every host reads:
  raw shards (about 252 GB) would not fit a TPU VM's 100 GB disk; JPEG shards need about 17
  input cores per chip at the assumed rate (docs/hardware.md computes it).

On every host of the slice (docs/hardware.md):

  python -m alexnet_jax.main --config=configs/tpu_pod.py --workdir=gs://BUCKET/run
    --config.data_dir=gs://BUCKET/imagenet
"""

import ml_collections

from alexnet_jax.training import recipes

WARMUP_EPOCHS = 5  # Goyal et al.'s


def get_config(chips: str = "32") -> ml_collections.ConfigDict:
  """`chips`: the slice's chip count, from `--config=configs/tpu_pod.py:CHIPS`."""
  devices = recipes.device_count(chips, "configs/tpu_pod.py")
  config = recipes.scaled(devices, per_device_batch=128, warmup_epochs=WARMUP_EPOCHS)
  config.dtype = "bfloat16"
  return config

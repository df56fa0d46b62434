"""One node of 8 GPUs (an 8x H100 server, say): the paper's recipe data-parallel, 128 images
per GPU, global batch 1024 (k = 8 times the paper's 128); `recipes.scaled` holds the rule.
`--config=configs/gpu8.py:4` is the same recipe on 4 GPUs (batch 512, rate 0.04).

- Learning rate 0.08, 8x the paper's 0.01 (the linear rule), dropped /10 at epochs 30, 60 and
  80 like the paper's, no warmup. Why: Krizhevsky 2014 ("One weird trick", arXiv:1404.5997)
  trained AlexNet-like nets at exactly this scale, 128 images per GPU on up to 8 GPUs, and
  found that multiplying the rate by k worked best for his batch sizes, though theory
  suggests sqrt(k); his note names no warmup. Goyal et al.'s warmup is in configs/tpu_pod.py.
- dtype bfloat16: an H100's dense bfloat16 peak is twice its TF32 one (989 against 495
  TFLOP/s); parameters, gradients and momentum stay float32, and over 200 steps the losses
  kept within 0.076 of float32's (docs/speed.md). `--config.dtype=float32` is the paper's
  arithmetic at half the peak.
- Data: `dataset="prepared"` as raw shards (`python -m alexnet_jax.prepare --format=raw`,
  about 252 GB) on the node's local NVMe: raw shards need about 8 input cores per GPU, JPEG
  shards about 87 (docs/hardware.md computes both).

  python -m alexnet_jax.main --config=configs/gpu8.py --config.data_dir=/nvme/imagenet --workdir=DIR
"""

import ml_collections

from alexnet_jax.training import recipes


def get_config(gpus: str = "8") -> ml_collections.ConfigDict:
  """`gpus`: the node's GPU count, from `--config=configs/gpu8.py:GPUS`."""
  config = recipes.scaled(recipes.device_count(gpus, "configs/gpu8.py"), per_device_batch=128)
  config.dtype = "bfloat16"
  return config

"""Caffe's bvlc_alexnet: the net its converted weights run in, and its recipe for fine-tuning.

`python -m alexnet_jax.convert --input=bvlc_alexnet.npy --output=DIR` writes DIR with this
config; evaluate with `--config=configs/caffe_alexnet.py --workdir=DIR --mode=eval`, or
fine-tune with `--config.init_from=bvlc_alexnet.npy`. The paper's two towers (Caffe's
groups), with Caffe's LRN; the converted conv1 takes RGB like our pipeline.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.lrn_scope = "all"  # Caffe normalises across all 96 (256) maps, not per tower
  config.model.lrn_k = 1.0
  config.model.lrn_alpha = 1e-4 / 5  # Caffe's alpha=1e-4 is divided by n=5
  config.model.bias_one = 0.1  # Caffe's biases (1 "gave flat loss"), for layers trained afresh
  config.mean_subtraction = "channel"
  config.channel_mean = (
    122.67891434,
    116.66876762,
    104.00698793,
  )  # Caffe's mean image per channel, RGB
  config.pca_noise_std = 0.0  # Caffe trained with crops and mirrors only
  config.eval_crops = 1  # Caffe's published 57.1% top-1 is the centre crop's
  return config

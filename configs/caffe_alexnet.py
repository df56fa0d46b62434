"""Caffe's bvlc_alexnet: the net its converted weights run in, and its recipe for fine-tuning.

`python -m alexnet_jax.convert --input=bvlc_alexnet.npy --output=DIR` writes DIR with this
config; evaluate with `--config=configs/caffe_alexnet.py --workdir=DIR --mode=eval`, or
fine-tune with `--config.init_from=bvlc_alexnet.npy`. The paper's two towers (Caffe's
groups), with Caffe's LRN, biases and mean; the converted conv1 takes RGB like our pipeline.
The settings are alexnet_jax/training/recipes.py's PUBLISHED["caffe"], over the paper's.
"""

import ml_collections

from alexnet_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.published("caffe")

"""torchvision's AlexNet: the net its converted weights run in, and its recipe for fine-tuning.

`python -m alexnet_jax.convert --input=alexnet-owt-7be5be79.pth --output=DIR` writes DIR
with this config; evaluate with `--config=configs/torchvision_alexnet.py --workdir=DIR
--mode=eval`, or fine-tune with `--config.init_from=FILE.pth`. One tower of 64-192-384-256-256
maps, no LRN, 224 crops, torchvision's batch 256 and weight decay; the converted conv1 absorbs
torchvision's input std, so the net takes 0-255 pixels minus the mean like our pipeline's.
The settings are alexnet_jax/training/recipes.py's PUBLISHED["torchvision"], over the paper's.
"""

import ml_collections

from alexnet_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.published("torchvision")

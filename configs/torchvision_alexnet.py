"""torchvision's AlexNet: the net its converted weights run in, and its recipe for fine-tuning.

`python -m alexnet_jax.convert --input=alexnet-owt-7be5be79.pth --output=DIR` writes DIR
with this config; evaluate with `--config=configs/torchvision_alexnet.py --workdir=DIR
--mode=eval`, or fine-tune with `--config.init_from=FILE.pth`. One tower of 64-192-384-256-256
maps, no LRN, 224 crops; the converted conv1 absorbs torchvision's input std, so the net
takes 0-255 pixels minus the mean like our pipeline's.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.variant = "torchvision"
  config.model.lrn = False
  config.image_size = 224
  config.mean_subtraction = "channel"
  config.channel_mean = (123.675, 116.28, 103.53)  # torchvision's (0.485, 0.456, 0.406) in 0-255
  config.pca_noise_std = 0.0  # torchvision trained without the paper's colour noise
  config.eval_crops = 1  # torchvision's published 56.5% top-1 is the centre crop's
  # torchvision's reference recipe: batch 256, weight decay 1e-4 on every parameter, /10 every 30
  # epochs.
  config.batch_size = 256
  config.weight_decay = 1e-4
  config.weight_decay_on_biases = True
  config.lr_boundaries_epochs = (30, 60)
  return config

"""The embedded default: the paper's two-tower net on generated textures, minutes on a laptop CPU.

Same model code as the paper (two towers, LRN, overlapping pooling, dropout); smaller
images and a shorter schedule so that a 2-core CPU reaches >= 90% top-1 in minutes.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "synthetic"
  config.num_classes = 10
  config.resize_size = 76
  config.image_size = 67  # the smallest input AlexNet's conv stack takes
  config.batch_size = 32  # more, smaller steps: 64 learns far slower per second here
  config.num_epochs = 12
  config.learning_rate = 0.01
  config.lr_schedule = "cosine"
  config.model.bias_one = 0.1  # Caffe's choice; 1.0 leaves the loss flat for longer
  config.eval_crops = 1  # the centre crop: ten patches would make each evaluation 10x slower
  config.log_every_steps = 31
  config.eval_every_steps = 186  # every two epochs
  config.checkpoint_every_steps = 186
  return config

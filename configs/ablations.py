"""The embedded data at the scale of a 2-core CPU for the experiments runner: the quickstart's
net (two towers, LRN, overlapping pooling, dropout, the paper's initialisation) on a third of
its images for 10 epochs, so that `--suite=ablations` (7 runs) finishes in about 15 minutes.

At this scale the net is still learning when it stops (the paper's 0.01 initialisation keeps
the loss flat for its first hundred steps): the table compares how fast the variants learn,
not where they converge. docs/experiments.md: the table measured with it.
"""

import ml_collections

from configs import quickstart


def get_config() -> ml_collections.ConfigDict:
  config = quickstart.get_config()
  config.synthetic_train_per_class = 100  # 1,000 images: 31 steps of 32 per epoch
  config.synthetic_val_per_class = 50  # 500: a validation error's sampling std is about 2%
  config.num_epochs = 10
  config.learning_rate = 0.04  # val error at 200 steps: 0.02 76%, 0.04 73%, 0.08 80%, 0.16 90%
  config.log_every_steps = 31
  config.eval_every_steps = 62
  config.checkpoint_every_steps = 310
  return config

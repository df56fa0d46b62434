"""The paper's ImageNet recipe (§5): batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 / 10 three
times, the two-tower net with LRN, overlapping pooling and dropout.

Every setting, with what it means, is in alexnet_jax/training/recipes.py (`paper()`): the
package holds the recipe so that its commands find it wherever they run. A config of your own
starts from this one (`config = default.get_config()`) and changes what it needs.
"""

import ml_collections

from alexnet_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.paper()

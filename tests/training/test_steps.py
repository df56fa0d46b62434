"""The evaluation step's ten patches: their softmax outputs are averaged (the paper, §4.1),
not their logits, which would let one confident patch outvote the other nine."""

import flax.linen as nn
import jax
import numpy as np

from alexnet_jax.training import steps


class PixelLogits(nn.Module):
  """A net whose logits are its input's pixels: a 1x1 crop's 3 channels give 3 classes."""

  @nn.compact
  def __call__(self, images):
    return images.reshape(len(images), -1)


def test_ten_patches_average_probabilities_not_logits():
  # Image 0 (label 1): one patch sure of class 0, nine mildly for class 1. Its mean logits
  # favour class 0, its mean probabilities class 1. Image 1 (label 2): ten equal patches.
  patches = np.zeros((2, 10, 3), np.float32)
  patches[0, 0, 0], patches[0, 1:, 1], patches[1, :, 2] = 25, 2, 3
  labels = np.array([1, 2])
  assert (patches.mean(1).argmax(-1) != labels).any()  # averaged logits would err here
  exp = np.exp(patches.astype(np.float64))
  mean_probs = (exp / exp.sum(-1, keepdims=True)).mean(1)
  batch = {
    "image": patches.astype(np.uint8).reshape(2, 10, 1, 1, 3),
    "offset": np.zeros((2, 10, 2), np.int32),
    "flip": np.zeros((2, 10), bool),
    "label": labels,
    "mask": np.ones(2, np.float32),
  }
  out = jax.jit(steps.make_eval_step(PixelLogits()))({}, batch, np.zeros((1, 1, 3), np.float32))
  assert int(out["top1_wrong"]) == 0 and int(out["count"]) == 2
  expected = -np.log(mean_probs[[0, 1], labels]).sum()
  np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)  # float32 softmax and log

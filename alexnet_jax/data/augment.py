"""The pixel arithmetic of the paper's augmentation, on the device, fused into the jitted steps.

The input pipeline draws every random choice (crop offset, flip, colour alphas) and ships
uint8 crops; here they become the network's input: the mean image subtracted at the
crop's own position (the paper's per-pixel mean), the PCA colour noise added, and the
crop reflected, in one elementwise pass.
"""

import jax
import jax.numpy as jnp


def normalize(batch: dict, mean_image: jax.Array) -> jax.Array:
  """float32 network input from a batch of uint8 crops (..., H, W, 3) and their 'offset' (..., 2),
  'flip' (...) and optional 'colour' (..., 3); mean_image is (side, side, 3)."""
  images = batch["image"]
  size = images.shape[-3]
  lead = images.shape[:-3]
  colour = batch.get("colour")
  colour = jnp.zeros(lead + (3,), jnp.float32) if colour is None else colour

  def one(image, offset, flip, col):
    mean = jax.lax.dynamic_slice(mean_image, (offset[0], offset[1], 0), (size, size, 3))
    x = image.astype(jnp.float32) - mean + col
    return jnp.where(flip, x[:, ::-1], x)

  flat = lambda a, tail: a.reshape((-1,) + tail)
  out = jax.vmap(one)(
    flat(images, images.shape[-3:]),
    flat(batch["offset"], (2,)),
    flat(batch["flip"], ()),
    flat(colour, (3,)),
  )
  return out.reshape(images.shape)

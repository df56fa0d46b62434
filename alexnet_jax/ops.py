"""Stateless array ops of the paper's layers, shared by the model and its tests."""

import jax
import jax.numpy as jnp
import numpy as np

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int, padding: int) -> jax.Array:
  """One tower's convolution: a plain (ungrouped) conv, the fast path on every backend."""
  y = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DIMS)
  return y + bias


def lrn(x: jax.Array, k: float = 2.0, n: int = 5, alpha: float = 1e-4, beta: float = 0.75) -> jax.Array:
  """Local response normalisation over the last (channel) axis, the paper's formula (§3.3).

  b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, alpha NOT
  divided by n; the window is clipped at the ends of the channels it is given, so calling
  it on one tower's maps normalises within that tower, as the paper's GPUs did.
  """
  sq = jnp.square(x.astype(jnp.float32))
  half = n // 2
  window = (1,) * (x.ndim - 1) + (n,)
  pad = [(0, 0)] * (x.ndim - 1) + [(half, n - 1 - half)]
  s = jax.lax.reduce_window(sq, 0.0, jax.lax.add, window, (1,) * x.ndim, pad)
  return (x.astype(jnp.float32) * (k + alpha * s) ** -beta).astype(x.dtype)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's adaptive average pooling bins as an (n_in, n_out) averaging matrix."""
  m = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[start:end, i] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torchvision's AdaptiveAvgPool2d((size, size)) on NHWC maps; identity when already size x size."""
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  mh = jnp.asarray(_adaptive_matrix(h, size), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(w, size), x.dtype)
  return jnp.einsum("bhwc,hi,wj->bijc", x, mh, mw)

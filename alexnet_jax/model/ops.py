"""Stateless array ops of the paper's layers, shared by the model and its tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv2d(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int, padding: int
) -> jax.Array:
  """One tower's convolution: a plain (ungrouped) conv, the fast path on every backend."""
  y = jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DIMS
  )
  return y + bias


def _channel_window_sum(a: jax.Array, before: int, after: int) -> jax.Array:
  """sum_{j=i-before}^{i+after} a_j over the last axis, clipped at its ends."""
  window = (1,) * (a.ndim - 1) + (before + after + 1,)
  pad = [(0, 0)] * (a.ndim - 1) + [(before, after)]
  return jax.lax.reduce_window(a, 0.0, jax.lax.add, window, (1,) * a.ndim, pad)


def _lrn_scale(
  x: jax.Array, k: float, n: int, alpha: float, beta: float
) -> tuple[jax.Array, jax.Array]:
  """(k + alpha * window sum of x^2) and its power -beta, in float32."""
  scale = k + alpha * _channel_window_sum(jnp.square(x), n // 2, n - 1 - n // 2)
  if (
    beta == 0.75
  ):  # the paper's beta: two square roots cost a third of pow's exp and log on the CPU
    inv = jax.lax.rsqrt(scale)
    return scale, inv * jnp.sqrt(inv)
  return scale, scale**-beta


def lrn_autodiff(
  x: jax.Array, k: float = 2.0, n: int = 5, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
  """`lrn` with JAX's own gradient: the reference its hand-written gradient is tested against
  (`AlexNet(ops_impl="plain")`)."""
  xf = x.astype(jnp.float32)
  return (xf * _lrn_scale(xf, k, n, alpha, beta)[1]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def lrn(
  x: jax.Array, k: float = 2.0, n: int = 5, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
  """Local response normalisation over the last (channel) axis, the paper's formula (§3.3).

  b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, alpha NOT
  divided by n; the window is clipped at the ends of the channels it is given, so calling
  it on one tower's maps normalises within that tower, as the paper's GPUs did. Its
  gradient is written out (one window sum and one elementwise pass), leaner on the CPU than
  the chain of passes autodiff makes of the forward formula.
  """
  return lrn_autodiff(x, k, n, alpha, beta)


def _lrn_fwd(x, k, n, alpha, beta):
  xf = x.astype(jnp.float32)
  scale, inv = _lrn_scale(xf, k, n, alpha, beta)
  return (xf * inv).astype(x.dtype), (x, scale, inv)


def _lrn_bwd(k, n, alpha, beta, res, g):
  # db_j/da_i = [i == j] inv_j - 2 alpha beta a_i a_j inv_j / scale_j for every j whose window
  # holds i; those j form i's window mirrored, so the sum over them is again a window sum.
  del k
  x, scale, inv = res
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  spread = _channel_window_sum(gf * xf * inv / scale, n - 1 - n // 2, n // 2)
  return ((gf * inv - 2 * alpha * beta * xf * spread).astype(x.dtype),)


lrn.defvjp(_lrn_fwd, _lrn_bwd)


def max_pool_reduce_window(x: jax.Array, window: int, stride: int) -> jax.Array:
  """XLA's own max pooling, the reference `max_pool` is tested against
  (`AlexNet(ops_impl="plain")`)."""
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
  )


def _pool_views(x: jax.Array, window: int, stride: int) -> list[tuple[tuple[int, int], jax.Array]]:
  """Each window position's strided view of x (VALID pooling), in reduce_window's row-major
  order."""
  n, h, w, c = x.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  return [
    (
      (i, j),
      jax.lax.slice(
        x,
        (0, i, j, 0),
        (n, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c),
        (1, stride, stride, 1),
      ),
    )
    for i in range(window)
    for j in range(window)
  ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max pooling as the maximum of window*window strided views, with reduce_window's gradient
  (all of it to the first maximum of each window, row-major). XLA:CPU computes
  reduce_window's gradient through an index search several times slower than the
  whole pooling written as elementwise maxima, selects and pads."""
  return functools.reduce(jnp.maximum, [v for _, v in _pool_views(x, window, stride)])


def _max_pool_fwd(x, window, stride):
  y = max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, res, g):
  # Each window position (i, j) = stride * (qi, qj) + (ri, rj) hands its gradient to phase
  # (ri, rj) of x (the rows and columns = ri, rj mod stride), shifted by (qi, qj) on that
  # phase's grid: plain pads and adds, and one interleave of the phases at the end, where
  # scattering each position back to x directly costs a pass over x per position.
  x, y = res
  n, h, w, c = x.shape
  hc, wc = -(-h // stride), -(-w // stride)  # the phase grid
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), g.dtype)
  phases = {}
  for (i, j), view in _pool_views(x, window, stride):
    first = (view == y) & ~taken
    taken = taken | first
    (qi, ri), (qj, rj) = divmod(i, stride), divmod(j, stride)
    part = jax.lax.pad(
      jnp.where(first, g, zero),
      zero,
      [(0, 0, 0), (qi, hc - y.shape[1] - qi, 0), (qj, wc - y.shape[2] - qj, 0), (0, 0, 0)],
    )
    phases[ri, rj] = phases[ri, rj] + part if (ri, rj) in phases else part
  empty = jnp.zeros((n, hc, wc, c), g.dtype)
  # (n, hc, stride, wc, stride, c)
  grid = jnp.stack(
    [
      jnp.stack([phases.get((ri, rj), empty) for rj in range(stride)], axis=3)
      for ri in range(stride)
    ],
    axis=2,
  )
  return (grid.reshape(n, hc * stride, wc * stride, c)[:, :h, :w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's adaptive average pooling bins as an (n_in, n_out) averaging matrix."""
  m = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[start:end, i] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torchvision's AdaptiveAvgPool2d((size, size)) on NHWC maps; identity when already size x
  size."""
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  mh = jnp.asarray(_adaptive_matrix(h, size), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(w, size), x.dtype)
  return jnp.einsum("bhwc,hi,wj->bijc", x, mh, mw)

"""The numerical kernels of the blocks: fast versions beside their plain-JAX reference.

Every model has a field `ops`: 'fast' (the default) or 'reference'. Both compute the same
functions and create the same parameters, so one override
(`--config.model.ops=reference`, `get_model(..., ops='reference')`) checks a result or a
speed claim against plain JAX:

  op          'fast'                                     'reference'
  attention   `softmax_attention` (backward written out,  jax.nn.dot_product_attention
              heads next to the batch), cuDNN on GPUs
  GELU        `gelu` (exact, erf, backward written out)  jax.nn.gelu(approximate=False)
  LayerNorm   `layer_norm` (backward written out)        flax.linen.LayerNorm

tests/test_ops.py compares the two paths op by op and on whole models (logits and
gradients); docs/benchmarks.md has the speed and memory each fast op buys.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OPS = ('fast', 'reference')

# ------------------------------------------------------------------------------- GELU

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


def _normal_cdf(x):
  return 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))


@jax.custom_vjp
def gelu(x):
  """Exact GELU, x * Phi(x) with Phi the standard normal CDF through erf.

  The same function as jax.nn.gelu(approximate=False), which goes through erfc, a costlier
  lowering; they differ only by float rounding, most (relatively) for x < -3, where the
  value is below 5e-3 in magnitude and 0.5 + 0.5 erf loses its last digits. The backward
  pass recomputes Phi from x, so that the block keeps one activation for it instead of
  three: 0.22 GiB less temporary memory for the ViT-B/16 step at batch 8.
  """
  return x * _normal_cdf(x)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, grad):
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (grad * (_normal_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def activation(x, ops: str):
  """Exact GELU by the implementation `ops` names."""
  return gelu(x) if ops == 'fast' else jax.nn.gelu(x, approximate=False)


# -------------------------------------------------------------------------- LayerNorm


def _layer_norm_forward(x, scale, bias, epsilon):
  # flax's nn.LayerNorm, operation for operation: float32 statistics, the variance as
  # E[x^2] - E[x]^2 clipped at 0, y = (x - mean) * (rsqrt(var + eps) * scale) + bias.
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, axis=-1, keepdims=True) - mean * mean)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (x32 - mean) * (inv_std * scale) + bias, (mean, inv_std)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon):
  """LayerNorm over the last axis in float32; the backward pass is written out.

  Autodiff of the forward keeps and re-reads several (tokens, width) intermediates; the
  closed form needs x and two numbers per token. Measured against flax's nn.LayerNorm in
  the same ViT-B/16 gradient step at batch 8 (2026-11-30, CPU, interleaved A/B in one
  process on a busy machine): 1.33 GiB of temporary memory instead of 1.44 (8% less),
  bitwise the same gradients, and a best step time 1.1% shorter (44.9 s against 45.3 s
  under that load; within noise). It is kept for the memory.
  """
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  y, (mean, inv_std) = _layer_norm_forward(x, scale, bias, epsilon)
  return y, (x, scale, mean, inv_std)


def _layer_norm_bwd(epsilon, residuals, grad_y):
  del epsilon
  x, scale, mean, inv_std = residuals
  normed = (x.astype(jnp.float32) - mean) * inv_std
  grad_y = grad_y.astype(jnp.float32)
  batch_axes = tuple(range(grad_y.ndim - 1))
  grad_scale = jnp.sum(grad_y * normed, axis=batch_axes)
  grad_bias = jnp.sum(grad_y, axis=batch_axes)
  grad_normed = grad_y * scale
  grad_x = inv_std * (grad_normed - jnp.mean(grad_normed, axis=-1, keepdims=True)
                      - normed * jnp.mean(grad_normed * normed, axis=-1, keepdims=True))
  return grad_x.astype(x.dtype), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class FastLayerNorm(nn.Module):
  """nn.LayerNorm's parameters (`scale` ones, `bias` zeros) and forward; `layer_norm`."""
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype or x.dtype)


def norm(ops: str, *, epsilon: float, dtype, name: str) -> nn.Module:
  """A LayerNorm submodule called `name`, with the parameters of nn.LayerNorm either way."""
  if ops == 'fast':
    return FastLayerNorm(epsilon=epsilon, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


# -------------------------------------------------------------------------- attention


def _softmax_attention_forward(query, key, value):
  """-> output in the compute dtype, (probabilities, output in float32) for the backward."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', query, key, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs, value, preferred_element_type=jnp.float32)
  return out.astype(value.dtype), (probs, out)


@jax.custom_vjp
def softmax_attention(query, key, value):
  """softmax(query key^T) value for (batch, heads, tokens, head_dim) arrays, already scaled.

  Logits and softmax are float32 whatever the compute dtype. The backward pass is written
  out with FlashAttention's identity rowsum(dP * P) = rowsum(dO * O), which replaces a
  reduction over (tokens, tokens) by one over (tokens, head_dim). On CPU, against
  autodiff of the same forward: ViT-B/16 trains about 5% faster and its step needs
  0.28 GiB (14%) less temporary memory at batch 8.
  """
  return _softmax_attention_forward(query, key, value)[0]


def _softmax_attention_fwd(query, key, value):
  # The float32 output keeps rowsum(dO * O) accurate in bfloat16: from the rounded
  # output, the query and key gradients were twice as far from float32's as autodiff's.
  out, (probs, out32) = _softmax_attention_forward(query, key, value)
  return out, (query, key, value, probs, out32)


def _softmax_attention_bwd(residuals, grad_out):
  query, key, value, probs, out = residuals
  grad_value = jnp.einsum('bhqk,bhqd->bhkd', probs, grad_out)
  grad_probs = jnp.einsum('bhqd,bhkd->bhqk', grad_out, value, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(grad_out.astype(jnp.float32) * out, axis=-1, keepdims=True)
  grad_logits = (probs.astype(jnp.float32) * (grad_probs - row_dot)).astype(query.dtype)
  grad_query = jnp.einsum('bhqk,bhkd->bhqd', grad_logits, key)
  grad_key = jnp.einsum('bhqk,bhqd->bhkd', grad_logits, query)
  return grad_query, grad_key, grad_value


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def use_cudnn_attention(dtype, head_dim: int | None = None, ops: str = 'fast') -> bool:
  """Whether `dot_product_attention` asks for cuDNN's fused kernel.

  Decided up front, when the model is traced, because cuDNN's refusals come when XLA
  compiles, too late to fall back: the fast ops, an NVIDIA GPU of compute capability 8.0
  or more (Ampere, Hopper, Blackwell), a 16-bit dtype, and a head dimension that is a
  multiple of 8 and at most 128.
  """
  if ops != 'fast' or jax.default_backend() != 'gpu':
    return False
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if head_dim is not None and (head_dim % 8 or head_dim > 128):
    return False
  capability = getattr(jax.devices()[0], 'compute_capability', None)  # None on ROCm
  try:
    return capability is not None and float(capability) >= 8.0
  except ValueError:
    return False


def dot_product_attention(query, key, value, ops: str = 'fast'):
  """Attention of (batch, tokens, heads, head_dim) arrays, queries already scaled.

  'reference': jax.nn.dot_product_attention as it chooses by itself (XLA). 'fast':
  cuDNN's fused kernel where `use_cudnn_attention` says so (jax.nn.dot_product_attention
  does not pick it by itself); elsewhere `softmax_attention` with the heads moved next to
  the batch: XLA's CPU matmuls want (batch, heads, tokens, head_dim), and the transposes
  cost less than batched matmuls over strided heads.
  """
  if ops == 'reference':
    return jax.nn.dot_product_attention(query, key, value, scale=1.0)
  if use_cudnn_attention(query.dtype, query.shape[-1]):
    return jax.nn.dot_product_attention(query, key, value, scale=1.0, implementation='cudnn')
  return softmax_attention(*(x.swapaxes(1, 2) for x in (query, key, value))).swapaxes(1, 2)

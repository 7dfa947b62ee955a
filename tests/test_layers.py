"""The hand-written backward passes of layers.py equal autodiff of the plain functions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers


def _value_and_grads(fn, args, cotangent_seed=0):
  """fn(*args) and the gradients of <fn(*args), random cotangent> for every argument."""
  out = fn(*args)
  cotangent = jax.random.normal(jax.random.key(cotangent_seed), out.shape, out.dtype)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=tuple(range(len(args))))(
      *args)
  return out, grads


def _assert_same(ours, reference, atol):
  (out, grads), (ref_out, ref_grads) = ours, reference
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=atol, rtol=atol)


def test_gelu_is_exact_gelu_with_its_gradient():
  x = jnp.linspace(-6.0, 6.0, 1001)
  _assert_same(_value_and_grads(layers.gelu, (x,)),
               _value_and_grads(lambda v: jax.nn.gelu(v, approximate=False), (x,)), 1e-6)
  # And it is not the tanh approximation, which differs by up to 5e-4 here.
  assert float(jnp.max(jnp.abs(layers.gelu(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_layer_norm_equals_flax_layer_norm_with_gradients():
  keys = jax.random.split(jax.random.key(0), 3)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], (2, 5, 48))
  scale = 1.0 + 0.1 * jax.random.normal(keys[1], (48,))
  bias = 0.1 * jax.random.normal(keys[2], (48,))
  flax_norm = nn.LayerNorm(epsilon=1e-6)

  def reference(x, scale, bias):
    return flax_norm.apply({'params': {'scale': scale, 'bias': bias}}, x)

  _assert_same(_value_and_grads(lambda x, s, b: layers.layer_norm(x, s, b, 1e-6),
                                (x, scale, bias)),
               _value_and_grads(reference, (x, scale, bias)), 2e-5)
  # The module creates the parameters flax's does.
  variables = layers.LayerNorm().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'scale': (48,), 'bias': (48,)}}


def test_softmax_attention_equals_autodiff_of_the_formula():
  keys = jax.random.split(jax.random.key(1), 3)
  query, key, value = (jax.random.normal(k, (2, 3, 7, 8)) for k in keys)

  def reference(q, k, v):
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1)
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v)

  _assert_same(_value_and_grads(layers.softmax_attention, (query, key, value)),
               _value_and_grads(reference, (query, key, value)), 1e-5)


def test_dot_product_attention_equals_jax_nn():
  """(batch, tokens, heads, head_dim) in and out, queries pre-scaled, as jax.nn's with scale 1."""
  keys = jax.random.split(jax.random.key(2), 3)
  query, key, value = (jax.random.normal(k, (2, 9, 4, 16)) for k in keys)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0)  # noqa: E731
  _assert_same(_value_and_grads(layers.dot_product_attention, (query, key, value)),
               _value_and_grads(reference, (query, key, value)), 1e-5)


def test_attention_in_bfloat16_is_about_as_accurate_as_autodiff():
  """Errors against float32 of the same bfloat16 inputs: within 1.5x those of jax.nn's."""
  keys = jax.random.split(jax.random.key(2), 3)
  inputs = [jax.random.normal(k, (2, 9, 4, 16)).astype(jnp.bfloat16) for k in keys]
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0)  # noqa: E731
  as_f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
  exact = as_f32(_value_and_grads(reference, as_f32(inputs)))

  def errors(fn):
    out, grads = as_f32(_value_and_grads(fn, inputs))
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads),
                                                            (exact[0], *exact[1]))]

  ours, theirs = errors(layers.dot_product_attention), errors(reference)
  assert all(o <= 1.5 * t + 1e-3 for o, t in zip(ours, theirs)), (ours, theirs)

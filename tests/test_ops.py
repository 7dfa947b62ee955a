"""The fast ops equal their plain-JAX reference: op by op, and on whole models."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import ops


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
  _assert_same(_value_and_grads(ops.gelu, (x,)),
               _value_and_grads(lambda v: jax.nn.gelu(v, approximate=False), (x,)), 1e-6)
  # And it is not the tanh approximation, which differs by up to 5e-4 here.
  assert float(jnp.max(jnp.abs(ops.gelu(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_layer_norm_equals_flax_layer_norm_with_gradients():
  keys = jax.random.split(jax.random.key(0), 3)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], (2, 5, 48))
  scale = 1.0 + 0.1 * jax.random.normal(keys[1], (48,))
  bias = 0.1 * jax.random.normal(keys[2], (48,))
  flax_norm = nn.LayerNorm(epsilon=1e-6)

  def reference(x, scale, bias):
    return flax_norm.apply({'params': {'scale': scale, 'bias': bias}}, x)

  _assert_same(_value_and_grads(lambda x, s, b: ops.layer_norm(x, s, b, 1e-6),
                                (x, scale, bias)),
               _value_and_grads(reference, (x, scale, bias)), 2e-5)
  # The module creates the parameters flax's does.
  variables = ops.FastLayerNorm().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'scale': (48,), 'bias': (48,)}}


def test_softmax_attention_equals_autodiff_of_the_formula():
  keys = jax.random.split(jax.random.key(1), 3)
  query, key, value = (jax.random.normal(k, (2, 3, 7, 8)) for k in keys)

  def reference(q, k, v):
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1)
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v)

  _assert_same(_value_and_grads(ops.softmax_attention, (query, key, value)),
               _value_and_grads(reference, (query, key, value)), 1e-5)


def test_dot_product_attention_equals_jax_nn():
  """(batch, tokens, heads, head_dim) in and out, queries pre-scaled, as jax.nn's with scale 1."""
  keys = jax.random.split(jax.random.key(2), 3)
  query, key, value = (jax.random.normal(k, (2, 9, 4, 16)) for k in keys)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0)  # noqa: E731
  _assert_same(_value_and_grads(ops.dot_product_attention, (query, key, value)),
               _value_and_grads(reference, (query, key, value)), 1e-5)


def test_attention_in_bfloat16_is_about_as_accurate_as_autodiff():
  """Errors against float32 of the same bfloat16 inputs: on average within 1.5x those of
  jax.nn's; at worst within 2x plus one bfloat16 step at 1-2 (one element rounded the
  other way moves a maximum by a whole step, on some processors' bfloat16 kernels)."""
  keys = jax.random.split(jax.random.key(2), 3)
  inputs = [jax.random.normal(k, (2, 9, 4, 16)).astype(jnp.bfloat16) for k in keys]
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0)  # noqa: E731
  as_f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
  exact = as_f32(_value_and_grads(reference, as_f32(inputs)))

  def errors(fn, reduce):
    out, grads = as_f32(_value_and_grads(fn, inputs))
    return [float(reduce(jnp.abs(a - b))) for a, b in zip((out, *grads),
                                                          (exact[0], *exact[1]))]

  ours, theirs = errors(ops.dot_product_attention, jnp.mean), errors(reference, jnp.mean)
  assert all(o <= 1.5 * t + 1e-4 for o, t in zip(ours, theirs)), (ours, theirs)
  ours, theirs = errors(ops.dot_product_attention, jnp.max), errors(reference, jnp.max)
  assert all(o <= 2 * t + 2**-7 for o, t in zip(ours, theirs)), (ours, theirs)


TINY = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
TINY_DECODER = dict(decoder_width=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32)
CASES = {
    'ViT tok': ('ViT-mu/4', dict(num_classes=10)),
    'ViT gap map': ('ViT-mu/4', dict(num_classes=10, pool='map', class_token=False)),
    'ViT gap scan': ('ViT-mu/4', dict(num_classes=10, pool='gap', scan=True)),
    'MAE': ('MAE-mu/4', dict(TINY_DECODER, norm_pix_loss=True)),
}


def _model_loss_and_grads(name, overrides, ops_name):
  model = models.get_model(name, **TINY, **overrides, ops=ops_name)
  variables = models.init_variables(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  noise = jax.random.uniform(jax.random.key(2), (3, 16))

  def loss(params):
    if name.startswith('MAE'):
      loss, pred, _ = model.apply({'params': params}, images, noise=noise)
      return loss, pred
    logits = model.apply({'params': params}, images)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]), logits

  return jax.value_and_grad(loss, has_aux=True)(variables['params'])


@pytest.mark.parametrize('case', CASES)
def test_fast_and_reference_models_give_the_same_outputs_and_gradients(case):
  name, overrides = CASES[case]
  (fast_loss, fast_out), fast_grads = _model_loss_and_grads(name, overrides, 'fast')
  (ref_loss, ref_out), ref_grads = _model_loss_and_grads(name, overrides, 'reference')
  # Same parameters from the same key: the two paths build the same tree.
  chex.assert_trees_all_equal_structs(fast_grads, ref_grads)
  chex.assert_trees_all_close(fast_out, ref_out, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(fast_loss, ref_loss, atol=2e-6, rtol=2e-6)
  chex.assert_trees_all_close(fast_grads, ref_grads, atol=2e-5, rtol=2e-4)
  # And the gradients are not all zero (a test of nothing).
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(fast_grads)) > 1e-3


def test_reference_ops_are_the_plain_jax_functions():
  """With ops='reference' no custom VJP is traced; with 'fast' all three are."""
  def custom_calls(ops_name):
    model = models.get_model('ViT-mu/4', **TINY, num_classes=10, ops=ops_name)
    variables = models.init_variables(model, jax.random.key(0))
    loss = lambda p: jnp.sum(model.apply({'params': p}, jnp.ones((1, 16, 16, 3))))  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(variables['params'])).count('custom_vjp_call')

  assert custom_calls('reference') == 0
  # (The printer shows a repeated sub-jaxpr once, so the count is not one per call.)
  assert custom_calls('fast') > 0


def test_unknown_ops_is_refused():
  with pytest.raises(ValueError, match=r"ops 'cudnn' is not one of \('fast', 'reference'\)"):
    models.get_model('ViT-mu/4', **TINY, ops='cudnn')


class GeluVariantsTest(chex.TestCase):
  """The fast GELU is the same function with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_gelu(self):
    x = jnp.linspace(-4.0, 4.0, 65)
    chex.assert_trees_all_close(self.variant(ops.gelu)(x), jax.nn.gelu(x, approximate=False),
                                atol=1e-6)

"""MAE: sizes, the official algorithm checked number by number, masking under sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import mae_reference
from vit_jax import models
from vit_jax.models import get_model, layers, mae

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8,
            decoder_width=24, decoder_depth=2, decoder_num_heads=3, decoder_mlp_dim=48)


def flat_shapes(tree):
  return {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def abstract_params(model):
  return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))['params']


def count(shapes, prefix=None):
  return sum(int(np.prod(s)) for k, s in shapes.items() if prefix is None or prefix(k))


def is_decoder(key):
  return key.split('/')[0] in ('decoder_embed', 'mask_token', 'Decoder', 'decoder_pred')


def test_mae_parameter_counts():
  shapes = flat_shapes(abstract_params(get_model('MAE-B/16')))
  assert count(shapes) == 111_655_680
  assert count(shapes, lambda k: not is_decoder(k)) == 85_647_360
  assert count(shapes, is_decoder) == 26_008_320
  assert not any('pos' in k for k in shapes)  # fixed tables are not parameters
  assert count(flat_shapes(abstract_params(get_model('MAE-L/16')))) == 329_239_296


def test_encoder_tree_is_a_vit_tree_minus_head():
  mae_shapes = flat_shapes(abstract_params(get_model('MAE-B/16')))
  encoder = {k: v for k, v in mae_shapes.items() if not is_decoder(k)}
  vit = flat_shapes(abstract_params(get_model('ViT-B/16', posemb='sincos2d')))
  assert encoder == {k: v for k, v in vit.items() if not k.startswith('head/')}


def make_model_and_inputs(norm_pix_loss, batch=3, seed=0):
  model = get_model('MAE-mu/8', **TINY, norm_pix_loss=norm_pix_loss)
  images = jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3))
  params = model.init({'params': jax.random.key(seed + 1), 'masking': jax.random.key(2)},
                      images)['params']
  # Random biases and norms, so that the comparison exercises every parameter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 3), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  params = jax.tree.unflatten(treedef, leaves)
  noise = jax.random.uniform(jax.random.key(seed + 4), (batch, 16))
  return model, params, images, noise


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_matches_independent_numpy_reference(norm_pix_loss):
  model, params, images, noise = make_model_and_inputs(norm_pix_loss)
  loss, pred, mask = jax.jit(lambda p, x, n: model.apply({'params': p}, x, noise=n))(
      params, images, noise)
  ref_loss, ref_pred, ref_mask = mae_reference.mae_forward(
      jax.device_get(params), np.asarray(images), np.asarray(noise), patch_size=8,
      num_heads=4, decoder_num_heads=3, mask_ratio=0.75, norm_pix_loss=norm_pix_loss)
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(pred, ref_pred, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_masking_keeps_exactly_the_visible_count():
  noise = jax.random.uniform(jax.random.key(0), (5, 196))
  ids_keep, ids_restore, mask = mae.random_masking(noise, 0.75)
  assert ids_keep.shape == (5, 49)
  np.testing.assert_array_equal(mask.sum(1), 196 - 49)
  # The kept patches are those with the smallest noise, and mask marks the others.
  for row in range(5):
    kept = set(np.argsort(np.asarray(noise[row]))[:49])
    assert set(np.asarray(ids_keep[row])) == kept
    assert set(np.flatnonzero(np.asarray(mask[row]) == 0)) == kept
  np.testing.assert_array_equal(jnp.take_along_axis(jnp.argsort(noise, 1), ids_restore, 1),
                                jnp.broadcast_to(jnp.arange(196), (5, 196)))
  _, _, mask = mae.random_masking(noise[:, :10], 0.75)  # int(10 * 0.25) = 2 visible
  np.testing.assert_array_equal(mask.sum(1), 8)


def test_loss_ignores_predictions_of_visible_patches():
  model, params, images, noise = make_model_and_inputs(norm_pix_loss=True)
  loss, pred, mask = model.apply({'params': params}, images, noise=noise)
  target = layers.patchify(images, 8)
  changed = jnp.where(mask[..., None] == 0, pred + 100.0, pred)
  assert float(mae.masked_patch_loss(changed, target, mask, True)) == pytest.approx(
      float(loss), rel=1e-6)
  moved = jnp.where(mask[..., None] == 1, pred + 1.0, pred)
  assert float(mae.masked_patch_loss(moved, target, mask, True)) > float(loss) + 0.5


def test_patchify_unpatchify_roundtrip():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  patches = layers.patchify(images, 8)
  assert patches.shape == (2, 16, 192)
  np.testing.assert_array_equal(layers.unpatchify(patches, 8, (4, 4), 3), images)
  np.testing.assert_array_equal(
      patches, mae_reference.patchify_nchw(np.transpose(np.asarray(images), (0, 3, 1, 2)), 8))


def test_initialisation_follows_the_official_code():
  model = get_model('MAE-B/16')
  params = model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)},
                      jnp.zeros((1, 224, 224, 3)))['params']

  def check_uniform(x, fan_in, fan_out):
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.98 * bound

  check_uniform(params['embedding']['kernel'], 16 * 16 * 3, 768)
  block = params['Transformer']['encoderblock_0']
  attn = block['MultiHeadDotProductAttention_1']
  for name in ('query', 'key', 'value'):
    check_uniform(attn[name]['kernel'], 768, 3 * 768)  # fused qkv bound
    assert not np.any(attn[name]['bias'])
  check_uniform(attn['out']['kernel'], 768, 768)
  check_uniform(block['MlpBlock_3']['Dense_0']['kernel'], 768, 3072)
  check_uniform(params['decoder_pred']['kernel'], 512, 768)
  assert not np.any(block['MlpBlock_3']['Dense_0']['bias'])
  np.testing.assert_array_equal(block['LayerNorm_0']['scale'], 1.0)
  for token in (params['cls'], params['mask_token']):
    assert 0.015 < float(np.std(token)) < 0.025


def test_masks_differ_for_every_example_under_sharding():
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh = Mesh(devices, ('data',))
  model = get_model('MAE-mu/8', **TINY)
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  params = model.init({'params': jax.random.key(1), 'masking': jax.random.key(2)},
                      images[:1])['params']
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))

  @jax.jit
  def masks(params, images, key):
    _, pred, mask = model.apply({'params': params}, images, rngs={'masking': key})
    return pred, mask

  pred, got = masks(params, sharded_images, jax.random.key(3))
  assert pred.sharding.spec == P('data')  # the batch stayed split over the 8 devices
  rows = {tuple(np.asarray(r)) for r in got}
  assert len(rows) == 16  # no two examples, on any device, share a mask
  # The masks do not depend on how the batch is split over devices.
  np.testing.assert_array_equal(got, masks(params, images, jax.random.key(3))[1])


def test_bad_mae_fields():
  with pytest.raises(ValueError, match='decoder_width 30 is not divisible by decoder_num_heads 4'):
    get_model('MAE-mu/8', **{**TINY, 'decoder_width': 30, 'decoder_num_heads': 4})
  with pytest.raises(ValueError, match='mask_ratio 1.0 must leave at least one'):
    get_model('MAE-mu/8', **TINY, mask_ratio=1.0)
  model = get_model('MAE-mu/8', **TINY)
  with pytest.raises(ValueError, match=r'noise must have shape \(2, 16\)'):
    model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), noise=jnp.zeros((2, 15)))

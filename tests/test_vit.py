"""The ViT family: exact sizes, parameter names, options, layouts and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vit_jax import models, param_tree
from vit_jax.models import get_model, layers

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8,
            num_classes=10)


def param_shapes(model):
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  return {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(variables['params']).items()}


def init(model, images, seed=0):
  return model.init(jax.random.key(seed), images)


@pytest.mark.parametrize('name, expected', [
    ('ViT-Ti/16', 5_717_416),
    ('ViT-S/16', 22_050_664),
    ('ViT-B/16', 86_567_656),
    ('ViT-B/32', 88_224_232),
    ('ViT-B/8', 86_576_872),
    ('ViT-L/16', 304_326_632),
    ('ViT-H/14', 632_045_800),
])
def test_parameter_counts(name, expected):
  shapes = param_shapes(get_model(name, num_classes=1000, pool='tok'))
  assert sum(int(np.prod(s)) for s in shapes.values()) == expected


def test_parameter_names_are_those_of_vision_transformer():
  shapes = param_shapes(get_model('ViT-B/16', representation_size=768))
  assert shapes['embedding/kernel'] == (16, 16, 3, 768)
  assert shapes['cls'] == (1, 1, 768)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 197, 768)
  block = 'Transformer/encoderblock_11/'
  assert shapes[block + 'MultiHeadDotProductAttention_1/query/kernel'] == (768, 12, 64)
  assert shapes[block + 'MultiHeadDotProductAttention_1/query/bias'] == (12, 64)
  assert shapes[block + 'MultiHeadDotProductAttention_1/out/kernel'] == (12, 64, 768)
  assert shapes[block + 'MlpBlock_3/Dense_0/kernel'] == (768, 3072)
  assert shapes[block + 'MlpBlock_3/Dense_1/kernel'] == (3072, 768)
  assert shapes[block + 'LayerNorm_0/scale'] == (768,)
  assert shapes[block + 'LayerNorm_2/bias'] == (768,)
  assert shapes['Transformer/encoder_norm/scale'] == (768,)
  assert shapes['pre_logits/kernel'] == (768, 768)
  assert shapes['head/kernel'] == (768, 1000)
  assert 'Transformer/encoderblock_12/LayerNorm_0/scale' not in shapes


def test_pool_options_change_the_tree_and_output():
  images = jnp.ones((2, 32, 32, 3))
  gap = get_model('ViT-mu/8', **{**TINY, 'pool': 'gap'})
  gap_shapes = param_shapes(gap)
  assert 'fc_norm/scale' in gap_shapes and 'Transformer/encoder_norm/scale' not in gap_shapes
  mapped = get_model('ViT-mu/8', **{**TINY, 'pool': 'map', 'class_token': False})
  map_shapes = param_shapes(mapped)
  assert map_shapes['MAPHead_0/probe'] == (1, 1, 32) and 'cls' not in map_shapes
  assert map_shapes['Transformer/posembed_input/pos_embedding'] == (1, 16, 32)
  for model in (gap, mapped):
    logits = model.apply(init(model, images), images)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  features = get_model('ViT-mu/8', **{**TINY, 'num_classes': 0})
  assert features.apply(init(features, images), images).shape == (2, 32)


def test_sincos2d_posemb_is_fixed_and_equals_the_mae_formula():
  model = get_model('ViT-mu/8', **TINY, posemb='sincos2d')
  assert not any('posembed' in k for k in param_shapes(model))

  # Independent computation, written from the MAE paper's code description.
  def reference(width, rows, cols):
    out = np.zeros((rows * cols, width))
    quarter = width // 4
    for r in range(rows):
      for c in range(cols):
        for i in range(quarter):
          omega = 1.0 / 10000**(i / quarter)
          out[r * cols + c, i] = np.sin(c * omega)
          out[r * cols + c, quarter + i] = np.cos(c * omega)
          out[r * cols + c, 2 * quarter + i] = np.sin(r * omega)
          out[r * cols + c, 3 * quarter + i] = np.cos(r * omega)
    return out

  np.testing.assert_allclose(layers.sincos2d_table((4, 4), 32), reference(32, 4, 4), atol=1e-6)
  np.testing.assert_allclose(layers.sincos2d_table((3, 5), 16), reference(16, 3, 5), atol=1e-6)


def test_sincos2d_model_adds_the_table_after_the_class_token():
  """Zero weights everywhere but the embedding bias: features = bias + table, cls = 0."""
  model = get_model('ViT-mu/8', **{**TINY, 'depth': 0, 'num_classes': 0, 'pool': 'gap',
                                   'posemb': 'sincos2d'})
  images = jnp.zeros((1, 32, 32, 3))
  params = jax.tree.map(jnp.zeros_like, init(model, images)['params'])
  params['fc_norm']['scale'] = jnp.ones(32)
  # With zero patches every token equals its position embedding: the gap mean is the
  # mean of the table, and fc_norm normalises it.
  got = model.apply({'params': params}, images)
  mean = layers.sincos2d_table((4, 4), 32).mean(0)
  expected = (mean - mean.mean()) / np.sqrt(mean.var() + 1e-6)
  np.testing.assert_allclose(got[0], expected, atol=1e-4)


def test_scanned_and_unscanned_give_the_same_logits():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  plain = get_model('ViT-mu/8', **TINY)
  scanned = get_model('ViT-mu/8', **TINY, scan=True)
  params = init(plain, images)['params']
  scanned_params = param_tree.scan_params(params)
  expected_shapes = param_shapes(scanned)
  got_shapes = {'/'.join(k): v.shape
                for k, v in traverse_util.flatten_dict(scanned_params).items()}
  assert got_shapes == expected_shapes
  assert got_shapes['Transformer/encoderblock/MlpBlock_3/Dense_0/kernel'] == (2, 32, 64)
  np.testing.assert_allclose(plain.apply({'params': params}, images),
                             scanned.apply({'params': scanned_params}, images), atol=1e-5)
  roundtrip = param_tree.unscan_params(scanned_params)
  jax.tree.map(np.testing.assert_array_equal, roundtrip, params)


def test_remat_gives_the_same_gradients():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  grads = []
  for policy in ('none', 'full', 'dots_saveable'):
    model = get_model('ViT-mu/8', **TINY, remat_policy=policy, head_init_std=0.02)
    params = init(model, images)['params']
    grads.append(jax.grad(lambda p: model.apply({'params': p}, images).sum())(params))
  for other in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads[0], other)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  f32 = get_model('ViT-mu/8', **TINY, head_init_std=0.02)
  bf16 = get_model('ViT-mu/8', **TINY, head_init_std=0.02, dtype='bfloat16')
  variables = init(bf16, images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  want = f32.apply(variables, images)
  got = bf16.apply(variables, images)
  assert got.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want))) + 1e-3
  assert float(jnp.max(jnp.abs(got - want))) > 0  # it did compute in bfloat16


def test_dropout_and_drop_path_act_only_in_training():
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  for options in (dict(dropout=0.5), dict(attention_dropout=0.5), dict(drop_path=0.5)):
    model = get_model('ViT-mu/8', **TINY, **options, head_init_std=0.02)
    variables = init(model, images)
    eval_a = model.apply(variables, images)
    eval_b = model.apply(variables, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
    train_b = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(3)})
    assert not np.allclose(train_a, eval_a), options
    assert not np.allclose(train_a, train_b), options


def test_drop_path_drops_whole_examples():
  x = jnp.ones((4000, 3, 5))
  out = np.asarray(layers.drop_path(x, 0.3, rng=jax.random.key(0)))
  per_example = out.reshape(4000, -1)
  kept = per_example[:, 0] > 0
  np.testing.assert_allclose(per_example[kept], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(per_example[~kept], 0.0)
  assert abs(kept.mean() - 0.7) < 0.03
  # The first block's rate is 0, so with depth 1 drop path changes nothing; the scanned
  # model (rates traced) drops in training only.
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  shallow = get_model('ViT-mu/8', **{**TINY, 'depth': 1, 'num_classes': 0}, drop_path=0.9)
  variables = init(shallow, images)
  np.testing.assert_allclose(
      shallow.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)}),
      shallow.apply(variables, images), atol=1e-6)
  scanned = get_model('ViT-mu/8', **{**TINY, 'num_classes': 0}, drop_path=0.9, scan=True)
  variables = init(scanned, images)
  train = scanned.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(train, scanned.apply(variables, images))


def test_zero_head_by_default_and_truncated_normal_on_request():
  images = jnp.ones((1, 32, 32, 3))
  params = init(get_model('ViT-mu/8', **TINY), images)['params']
  assert not np.any(params['head']['kernel'])
  params = init(get_model('ViT-mu/8', **TINY, head_init_std=0.01), images)['params']
  std = float(np.std(params['head']['kernel']))
  assert 0.005 < std < 0.015


def test_resample_posemb_identity_and_larger_grid():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1, 1 + 4 * 4, 8)).astype(np.float32)
  np.testing.assert_array_equal(layers.resample_posemb(posemb, (4, 4), num_prefix_tokens=1),
                                posemb)
  # A smooth (linear) field stays linear after bilinear upsampling, away from borders.
  rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing='ij')
  smooth = np.stack([rows, cols], -1).reshape(1, 16, 2).astype(np.float32)
  smooth = np.concatenate([np.full((1, 1, 2), 7.0, np.float32), smooth], axis=1)
  out = layers.resample_posemb(smooth, (8, 8), num_prefix_tokens=1)
  assert out.shape == (1, 65, 2)
  np.testing.assert_array_equal(out[0, 0], [7.0, 7.0])  # class token kept
  grid = out[0, 1:].reshape(8, 8, 2)
  steps = np.diff(grid[2:6, :, 0], axis=0)
  np.testing.assert_allclose(steps, 0.5, atol=1e-5)  # row coordinate rises evenly
  # Non-square, no class token.
  out = layers.resample_posemb(posemb[0, 1:], (2, 6), old_grid=(4, 4))
  assert out.shape == (12, 8)
  with pytest.raises(ValueError, match='not a square'):
    layers.resample_posemb(posemb[:, :15], (4, 4))


def test_patchify_unpatchify_roundtrip_and_matches_conv():
  images = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
  patches = layers.patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  np.testing.assert_array_equal(layers.unpatchify(patches, 4, (3, 2), 3), images)
  # Patch 1 of image 0 is rows 0-3, cols 4-7, in (row, col, channel) order.
  np.testing.assert_array_equal(patches[0, 1], images[0, 0:4, 4:8].reshape(-1))
  # The patchify-matmul embedding is a stride-p VALID convolution with the same kernel.
  kernel = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(patches @ kernel.reshape(48, 5), conv.reshape(2, 6, 5), atol=1e-5)


def test_bad_input_raises_before_compiling():
  with pytest.raises(ValueError, match=r'image size 30x30 is not divisible by the patch size 8'):
    get_model('ViT-mu/8', **{**TINY, 'image_size': 30})
  with pytest.raises(ValueError, match='width 30 is not divisible by num_heads 4'):
    get_model('ViT-mu/8', **{**TINY, 'width': 30})
  with pytest.raises(ValueError, match=r'Known names: .*ViT-B/16'):
    get_model('ViT-X/16')
  with pytest.raises(ValueError, match=r"unknown model field\(s\) \['hidden'\]"):
    get_model('ViT-B/16', hidden=3)
  with pytest.raises(ValueError, match="pool 'cls' is not one of"):
    get_model('ViT-B/16', pool='cls')
  model = get_model('ViT-mu/8', **TINY)
  with pytest.raises(ValueError, match=r'expects images of shape \(batch, 32, 32, 3\), got '
                     r'\(1, 32, 32, 1\)'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))


def test_non_square_images_and_other_patch_sizes():
  model = get_model('ViT-mu/4', **{**TINY, 'patch_size': 4, 'image_size': (16, 32)})
  shapes = param_shapes(model)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 1 + 4 * 8, 32)
  assert get_model('ViT-B/32').patch_size == 32 and get_model('ViT-S/14').width == 384

"""Optimizer chain from the config, and the mesh and partition rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import optim, param_tree, sharding
from vit_jax.models import get_model

TINY = dict(width=32, depth=3, num_heads=4, mlp_dim=64, image_size=16, patch_size=8,
            num_classes=5)


def tiny_params(**overrides):
  model = get_model('ViT-mu/8', **TINY, **overrides)
  return model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']


def config(**overrides):
  cfg = optim.default_optim_config()
  cfg.update(overrides)
  return cfg


def test_learning_rate_follows_the_mae_rule_warmup_and_cosine():
  cfg = config(base_lr=1.5e-4, lr_batch_base=256, warmup_epochs=2, schedule='cosine', min_lr=0.0)
  schedule = optim.learning_rate(cfg, global_batch_size=4096, total_steps=100, steps_per_epoch=10)
  peak = 1.5e-4 * 4096 / 256
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(peak / 2)
  assert float(schedule(20)) == pytest.approx(peak)
  assert float(schedule(60)) == pytest.approx(peak / 2, rel=1e-5)  # half-way down the cosine
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
  linear = optim.learning_rate(config(base_lr=1.0, lr_batch_base=0, schedule='linear'),
                               global_batch_size=8, total_steps=10, steps_per_epoch=1)
  assert float(linear(5)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match='warmup'):
    optim.learning_rate(config(warmup_epochs=20), 256, total_steps=10, steps_per_epoch=1)


def test_weight_decay_skips_biases_norms_posemb_and_tokens():
  params = tiny_params()
  no_decay = optim.regex_mask(params, optim.DEFAULT_NO_DECAY)
  names = param_tree.path_names(params)
  decayed = {n for n, skip in zip(jax.tree.leaves(names), jax.tree.leaves(no_decay)) if not skip}
  assert all(n.endswith('/kernel') for n in decayed)
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in decayed
  assert 'embedding/kernel' in decayed and 'head/kernel' in decayed
  # AdamW with zero gradients: only decayed parameters move, by lr * wd * value.
  tx = optim.make_optimizer(config(base_lr=0.1, lr_batch_base=0, schedule='constant',
                                   weight_decay=0.5), params, optax.constant_schedule(0.1))
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(ones), ones)
  for name, update in zip(jax.tree.leaves(names), jax.tree.leaves(updates)):
    expected = -0.05 if name in decayed else 0.0
    np.testing.assert_allclose(update, expected, atol=1e-7, err_msg=name)


@pytest.mark.parametrize('scan', [False, True])
def test_layer_decay_scales_updates_by_depth(scan):
  params = tiny_params(scan=scan)
  scales = optim.layer_decay_scales(params, 0.5)
  depth = 3
  assert scales['embedding']['kernel'] == 0.5**(depth + 1)
  assert scales['cls'] == 0.5**(depth + 1)
  assert scales['Transformer']['posembed_input']['pos_embedding'] == 0.5**(depth + 1)
  assert scales['head']['kernel'] == 1.0
  assert scales['Transformer']['encoder_norm']['scale'] == 1.0
  if scan:
    block_scale = scales['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel']
    np.testing.assert_allclose(np.ravel(block_scale), [0.125, 0.25, 0.5])
  else:
    for i, expected in enumerate([0.125, 0.25, 0.5]):
      assert scales['Transformer'][f'encoderblock_{i}']['LayerNorm_0']['scale'] == expected
  # SGD without momentum: update = -lr * grad * scale.
  tx = optim.make_optimizer(config(name='sgd', momentum=0.0, weight_decay=0.0, layer_decay=0.5),
                            params, optax.constant_schedule(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  got = updates['Transformer']['encoderblock' if scan else 'encoderblock_0']['MlpBlock_3'][
      'Dense_1']['bias']
  np.testing.assert_allclose(np.asarray(got).reshape(-1, 32)[0], -0.125)
  np.testing.assert_allclose(updates['head']['bias'], -1.0)


def test_frozen_parameters_do_not_move_and_lars_runs_on_the_head():
  params = tiny_params()
  tx = optim.make_optimizer(config(name='lars', weight_decay=0.0), params,
                            optax.constant_schedule(0.1), trainable='head/.*')
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  names = jax.tree.leaves(param_tree.path_names(params))
  for name, update in zip(names, jax.tree.leaves(updates)):
    if name.startswith('head/'):
      assert np.all(np.asarray(update) != 0), name
    else:
      assert not np.any(update), name
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.make_optimizer(config(), params, optax.constant_schedule(0.1), trainable='nothing')


def test_grad_clipping_bounds_the_update():
  params = {'w': jnp.zeros(4)}
  tx = optim.make_optimizer(config(name='sgd', momentum=0.0, weight_decay=0.0,
                                   grad_clip_norm=1.0), params, optax.constant_schedule(1.0))
  updates, _ = tx.update({'w': jnp.full(4, 10.0)}, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-6)


def test_mesh_axes_and_batch_size_checks():
  mesh = sharding.make_mesh([('data', -1)])
  assert dict(mesh.shape) == {'data': 8}
  mesh = sharding.make_mesh([('data', 4), ('fsdp', -1)])
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  with pytest.raises(ValueError, match='needs 6 devices, but 8'):
    sharding.make_mesh([('data', 3), ('fsdp', 2)])
  with pytest.raises(ValueError, match=r'global_batch_size=12 is not divisible by the 8 devices'):
    sharding.check_batch_size(12, mesh, 'global_batch_size')
  assert sharding.check_batch_size(16, mesh) == 16  # one process holds the whole batch
  # 'slices': one per TPU slice; these 8 CPU devices are one slice.
  mesh = sharding.make_mesh([('replica', 'slices'), ('data', -1)])
  assert dict(mesh.shape) == {'replica': 1, 'data': 8}
  with pytest.raises(ValueError, match="Mesh axis 'data' has size 'all'.*'slices'"):
    sharding.make_mesh([('data', 'all')])


def test_fsdp_rules_shard_the_largest_divisible_dimension():
  mesh = sharding.make_mesh([('data', -1)])
  params = tiny_params()
  shardings = sharding.tree_shardings(
      {'params': params}, [('params/head/.*', 'replicate'), ('.*', 'fsdp:data')], mesh)
  block = shardings['params']['Transformer']['encoderblock_0']
  assert block['MlpBlock_3']['Dense_0']['kernel'].spec == P(None, 'data')  # (32, 64)
  assert block['MultiHeadDotProductAttention_1']['query']['kernel'].spec == P('data', None, None)
  assert block['LayerNorm_0']['scale'].spec == P('data')  # (32,)
  assert shardings['params']['head']['kernel'].spec == P()  # first rule wins
  assert shardings['params']['head']['bias'].spec == P()
  # (5,) divides by nothing: replicated.
  odd = sharding.tree_shardings({'x': jnp.zeros((5, 3))}, [('.*', 'fsdp:data')], mesh)
  assert odd['x'].spec == P()
  with pytest.raises(ValueError, match="names axes \\['model'\\]"):
    sharding.tree_shardings(params, [('.*', 'fsdp:model')], mesh)
  with pytest.raises(ValueError, match='Unknown sharding rule'):
    sharding.tree_shardings(params, [('.*', 'shard')], mesh)


def test_global_batch_from_process_local_data():
  mesh = sharding.make_mesh([('data', -1)])
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3), 'label': np.arange(16)}
  batch = sharding.make_global_batch(local, mesh)
  assert batch['image'].shape == (16, 3) and batch['image'].sharding.spec == P(('data',))
  np.testing.assert_array_equal(batch['label'], np.arange(16))
  assert len(batch['label'].addressable_shards) == 8
  assert batch['label'].addressable_shards[1].data.tolist() == [2, 3]


def test_scan_unscan_params_roundtrip_for_the_mae_decoder_too():
  tree = {'Decoder': {f'encoderblock_{i}': {'w': np.full(2, i)} for i in range(3)},
          'Transformer': {'encoderblock_0': {'w': np.zeros(2)}, 'encoder_norm': {'s': np.ones(1)}}}
  scanned = param_tree.scan_params(tree)
  assert scanned['Decoder']['encoderblock']['w'].shape == (3, 2)
  assert set(scanned['Transformer']) == {'encoderblock', 'encoder_norm'}
  back = param_tree.unscan_params(scanned)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_lars_follows_mae_util_lars_order():
  """A NumPy transcription of facebookresearch/mae util/lars.py, with a changing lr."""
  cfg = config(name='lars', weight_decay=0.1, momentum=0.9)
  params = {'head': {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]),
                     'bias': jnp.array([0.1, 0.2])}}
  grads = {'head': {'kernel': jnp.array([[0.3, 0.1], [-0.2, 0.4]]),
                    'bias': jnp.array([1.0, -1.0])}}
  schedule = lambda step: 0.5 * (step + 1)  # noqa: E731
  tx = optim.make_optimizer(cfg, params, schedule)
  state = tx.init(params)
  expected = jax.tree.map(np.asarray, params)
  momentum = jax.tree.map(np.zeros_like, expected)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name, weight in expected['head'].items():
      update = np.asarray(grads['head'][name])
      if weight.ndim > 1:  # kernels only: biases and norms get neither decay nor trust ratio
        update = update + 0.1 * weight
        update = update * 0.001 * np.linalg.norm(weight) / np.linalg.norm(update)
      momentum['head'][name] = 0.9 * momentum['head'][name] + update
      expected['head'][name] = weight - schedule(step) * momentum['head'][name]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), params, expected)


def test_a_key_the_optimizer_does_not_read_is_refused():
  params = {'w': jnp.ones(3)}
  schedule = optax.constant_schedule(0.1)
  with pytest.raises(ValueError, match=r"optim.momentum=0.5 has no effect with "
                                       r"optim.name='adamw' \(only sgd, lars read it\)"):
    optim.make_optimizer(config(momentum=0.5), params, schedule)
  with pytest.raises(ValueError, match=r"optim.b1=0.8 has no effect with optim.name='lars'"):
    optim.make_optimizer(config(name='lars', b1=0.8), params, schedule)
  optim.make_optimizer(config(name='lars', momentum=0.5), params, schedule)  # read: fine

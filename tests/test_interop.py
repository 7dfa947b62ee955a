"""Checkpoint import/export without PyTorch: names, layouts, fitting, MAE parity, security."""

import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from tests import mae_reference
from vit_jax import checkpoint, interop, models, param_tree
from vit_jax.models import get_model, layers

TINY_VIT = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8,
                num_classes=10)
TINY_MAE = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8,
                decoder_width=24, decoder_depth=2, decoder_num_heads=3, decoder_mlp_dim=48)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def assert_trees_equal(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def init(model, seed=0):
  """Stands in for freshly initialised params: random numpy arrays of the model's shapes.

  Fitting only needs the tree and distinct values; tracing shapes is much faster here
  than running the initialisers (which compiles every new shape).
  """
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def randomized(params, seed=0):
  """Every leaf moved by noise: real initialisations hide mix-ups behind zeros and ones."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed + 100)
  return jax.tree.unflatten(treedef, [
      (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves])


def vit(**overrides):
  return get_model('ViT-mu/8', **{**TINY_VIT, **overrides})


def logits(model, params, seed=0):
  images = jax.random.normal(jax.random.key(seed), (2, *layers.pair(model.image_size), 3))
  return np.asarray(model.apply({'params': params}, images))


# ---------------------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('overrides', [dict(representation_size=24), dict(pool='gap'),
                                       dict(pool='map', class_token=False)])
def test_npz_round_trip(tmp_path, overrides):
  model = vit(**overrides)
  params = randomized(init(model))
  interop.export_npz(params, tmp_path / 'model.npz')
  assert os.listdir(tmp_path) == ['model.npz']
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'model.npz')
  assert fmt == 'vit_jax'
  assert_trees_equal(loaded, params)  # the file holds our tree as it is
  fitted, report = interop.fit_params(loaded, init(model, seed=5), source='model.npz')
  assert_trees_equal(fitted, params)
  assert str(report) == f'model.npz: loaded {len(flat(params))} arrays'


def test_safetensors_round_trip_through_timm_names(tmp_path):
  model = vit(pool='gap')
  params = randomized(init(model))
  path = tmp_path / 'model.safetensors'
  kwargs = interop.export_timm_safetensors(params, model, path)
  assert kwargs == dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, global_pool='avg',
                        embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, class_token=True,
                        fc_norm=True, pool_include_prefix=False)
  fmt, loaded = interop.load_checkpoint_file(path)
  assert fmt == 'timm'
  # State dicts do not know the heads: attention arrays come with merged heads.
  assert flat(loaded)['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
                      ].shape == (32, 32)
  fitted, _ = interop.fit_params(loaded, init(model, seed=5))
  assert_trees_equal(fitted, params)


def test_scanned_params_export_unscanned_and_load_into_either_layout(tmp_path):
  plain, scanned = vit(), vit(scan=True)
  params = randomized(init(plain))
  scanned_params = jax.device_get(param_tree.scan_params(params))
  interop.export_npz(scanned_params, tmp_path / 'scanned.npz')
  _, loaded = interop.load_checkpoint_file(tmp_path / 'scanned.npz')
  assert_trees_equal(loaded, params)  # vit_jax files are unscanned
  fitted, _ = interop.fit_params(loaded, init(scanned, seed=3))
  assert_trees_equal(fitted, scanned_params)
  np.testing.assert_allclose(logits(scanned, fitted), logits(plain, params), atol=1e-5)
  fitted, _ = interop.fit_params(scanned_params, init(plain, seed=3))  # scanned source
  assert_trees_equal(fitted, params)


# ---------------------------------------------------------------------------------------
# Names and layouts, with arrays whose every value is known.
# ---------------------------------------------------------------------------------------


def test_timm_names_and_layouts_with_hand_built_arrays(tmp_path):
  width, heads, mlp, patch, channels = 4, 2, 6, 2, 3
  arange = lambda *shape: np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # noqa: E731
  state = {
      'patch_embed.proj.weight': arange(width, channels, patch, patch),
      'patch_embed.proj.bias': arange(width),
      'cls_token': arange(1, 1, width),
      'pos_embed': arange(1, 5, width),
      'blocks.0.norm1.weight': arange(width), 'blocks.0.norm1.bias': arange(width) + 1,
      'blocks.0.attn.qkv.weight': arange(3 * width, width),
      'blocks.0.attn.qkv.bias': arange(3 * width),
      'blocks.0.attn.proj.weight': arange(width, width), 'blocks.0.attn.proj.bias': arange(width),
      'blocks.0.norm2.weight': arange(width), 'blocks.0.norm2.bias': arange(width),
      'blocks.0.mlp.fc1.weight': arange(mlp, width), 'blocks.0.mlp.fc1.bias': arange(mlp),
      'blocks.0.mlp.fc2.weight': arange(width, mlp), 'blocks.0.mlp.fc2.bias': arange(width),
      'norm.weight': arange(width) + 7, 'norm.bias': arange(width),
      'head.weight': arange(5, width), 'head.bias': arange(5),
  }
  save_file(state, str(tmp_path / 'hand.safetensors'))
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'hand.safetensors')
  assert fmt == 'timm'
  model = get_model('ViT-mu/2', width=width, depth=1, num_heads=heads, mlp_dim=mlp,
                    image_size=4, num_classes=5)
  params, _ = interop.fit_params(loaded, init(model))

  # Conv weight (D, C, p, p) -> kernel (p, p, C, D): kernel[i, j, c, d] = weight[d, c, i, j].
  kernel = params['embedding']['kernel']
  assert kernel.shape == (patch, patch, channels, width)
  assert kernel[1, 0, 2, 3] == state['patch_embed.proj.weight'][3, 2, 1, 0]
  attn = params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  qkv, qkv_bias = state['blocks.0.attn.qkv.weight'], state['blocks.0.attn.qkv.bias']
  for index, name in enumerate(('query', 'key', 'value')):
    rows = qkv[index * width:(index + 1) * width]  # row block `index` of the fused matrix
    # kernel[in, head, d] = weight[head * head_dim + d, in]
    np.testing.assert_array_equal(attn[name]['kernel'], rows.T.reshape(width, heads, 2))
    assert attn[name]['kernel'][3, 1, 0] == qkv[index * width + 2, 3]
    np.testing.assert_array_equal(attn[name]['bias'],
                                  qkv_bias[index * width:(index + 1) * width].reshape(heads, 2))
  # out[head, d, o] = proj.weight[o, head * head_dim + d]
  assert attn['out']['kernel'].shape == (heads, 2, width)
  assert attn['out']['kernel'][1, 0, 3] == state['blocks.0.attn.proj.weight'][3, 2]
  mlp_params = params['Transformer']['encoderblock_0']['MlpBlock_3']
  np.testing.assert_array_equal(mlp_params['Dense_0']['kernel'],
                                state['blocks.0.mlp.fc1.weight'].T)
  np.testing.assert_array_equal(params['Transformer']['encoder_norm']['scale'],
                                state['norm.weight'])
  np.testing.assert_array_equal(params['Transformer']['encoderblock_0']['LayerNorm_0']['bias'],
                                state['blocks.0.norm1.bias'])
  np.testing.assert_array_equal(params['head']['kernel'], state['head.weight'].T)
  np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'],
                                state['pos_embed'])
  # And back: the exported state dict is the one we started from, bit for bit.
  exported = interop.to_timm_state_dict(params, model)
  assert sorted(exported) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(exported[key], state[key], err_msg=key)


def test_big_vision_and_old_vit_jax_npz_names(tmp_path):
  """big_vision: 'params/' prefix, linen block names, pos_embedding without a class row."""
  model = vit()
  params = randomized(init(model))
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  posemb[:, 0] = 0.0  # big_vision adds no position embedding to the class token
  ours = flat(params)
  linen = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
           'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
  big_vision = {}
  for key, value in ours.items():
    if key == interop.POSEMB:
      big_vision['params/pos_embedding'] = value[:, 1:]
      continue
    parts = key.split('/')
    big_vision['params/' + '/'.join(linen.get(p, p) for p in parts)] = value
  np.savez(tmp_path / 'bv.npz', **big_vision)
  # The image tower of a two-tower (SigLIP, LiT) checkpoint; the text tower is left out.
  np.savez(tmp_path / 'two_tower.npz', **{k.replace('params/', 'params/img/'): v
                                          for k, v in big_vision.items()},
           **{'params/txt/Encoder_0/kernel': np.zeros(3), 'params/t': np.zeros(1)})
  for name in ('bv.npz', 'two_tower.npz'):
    fmt, loaded = interop.load_checkpoint_file(tmp_path / name)
    assert fmt == 'big_vision'
    fitted, report = interop.fit_params(loaded, init(model, seed=4))
    assert_trees_equal(fitted, params)
    assert 'class-token row zero' in str(report)

  np.savez(tmp_path / 'old.npz', **{f'opt/target/{k}': v for k, v in ours.items()},
           **{'opt/state/step': np.zeros(())})
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'old.npz')
  assert fmt == 'vit_jax'
  assert_trees_equal(loaded, params)


# ---------------------------------------------------------------------------------------
# fit_params.
# ---------------------------------------------------------------------------------------


def test_fit_resamples_position_embeddings_to_another_resolution():
  source = randomized(init(vit()))
  target = vit(image_size=48)  # 4x4 -> 6x6 patches
  fitted, report = interop.fit_params(source, init(target), source='224.npz')
  old = source['Transformer']['posembed_input']['pos_embedding']
  new = fitted['Transformer']['posembed_input']['pos_embedding']
  assert new.shape == (1, 37, 32)
  np.testing.assert_array_equal(new[:, :1], old[:, :1])  # the class-token row is kept
  np.testing.assert_allclose(new, layers.resample_posemb(old, (6, 6), num_prefix_tokens=1),
                             atol=1e-6)
  assert 'pos_embedding: resampled 4x4 -> 6x6' in str(report)
  # A non-square target grid is given explicitly.
  wide = vit(image_size=(32, 48))
  fitted, _ = interop.fit_params(source, init(wide), new_grid=wide.grid)
  assert fitted['Transformer']['posembed_input']['pos_embedding'].shape == (1, 25, 32)


def test_fit_reinitialises_a_head_of_another_size():
  source = randomized(init(vit()))
  target = vit(num_classes=3)
  fresh = init(target, seed=7)
  fitted, report = interop.fit_params(source, fresh, source='i21k.npz')
  assert_trees_equal(fitted['head'], fresh['head'])
  assert_trees_equal(fitted['Transformer'], source['Transformer'])
  assert ('re-initialised head (2 arrays) (head (32, 10) in the file, (32, 3) in the model)'
          in str(report))
  # Asked for by regex, with the same shape.
  fitted, report = interop.fit_params(source, init(vit(), seed=7), reinit=('head/.*',))
  assert_trees_equal(fitted['head'], init(vit(), seed=7)['head'])
  # A file without a head (a feature extractor) gets a fresh head too.
  headless = {k: v for k, v in source.items() if k != 'head'}
  fitted, report = interop.fit_params(headless, fresh)
  assert 'no head in the file' in str(report)


@pytest.mark.parametrize('pool', ['gap', 'tok'])
def test_mae_encoder_into_vit_in_one_call(pool):
  """Fine-tuning (gap + fc_norm) and linear probing (class token + encoder_norm) alike."""
  mae = get_model('MAE-mu/8', **TINY_MAE)
  source = randomized(init(mae))
  target = vit(pool=pool, head_batchnorm=pool == 'tok', head_init_std=0.01)
  fresh = init(target, seed=9)
  fitted, report = interop.fit_params(source, fresh, source='mae', **interop.MAE_TO_VIT)
  posemb = fitted['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(posemb[0, 0], 0.0)
  np.testing.assert_allclose(posemb[0, 1:], layers.sincos2d_table((4, 4), 32))
  # ...which is the official table with its zero class row.
  np.testing.assert_allclose(posemb[0], mae_reference.sincos_2d_with_cls(32, 4), atol=1e-6)
  for i in range(2):
    assert_trees_equal(fitted['Transformer'][f'encoderblock_{i}'],
                       source['Transformer'][f'encoderblock_{i}'])
  assert_trees_equal(fitted['embedding'], source['embedding'])
  assert_trees_equal(fitted['head'], fresh['head'])
  if pool == 'gap':
    assert_trees_equal(fitted['fc_norm'], fresh['fc_norm'])
    assert 'not in the file, fresh init: fc_norm' in str(report)
    assert 'Transformer/encoder_norm' in str(report).split('ignored: ')[1]
  else:
    assert_trees_equal(fitted['Transformer']['encoder_norm'], source['Transformer']['encoder_norm'])
  assert 'decoder_embed' in str(report).split('ignored: ')[1]
  assert 'from the sincos2d table' in str(report)


def test_fit_errors_are_one_line_naming_the_file_and_keys():
  source = randomized(init(vit()))
  with pytest.raises(interop.CheckpointError) as error:
    interop.fit_params(source, init(vit(width=64, depth=3)), source='small.npz')
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('small.npz: does not fit the model: shapes differ: ')
  assert 'cls (1, 1, 32) in the file vs (1, 1, 64) in the model' in message
  assert 'a checkpoint of another model size?' in message
  assert 'missing from the file: Transformer/encoderblock_2 (16 arrays)' in message

  mae = randomized(init(get_model('MAE-mu/8', **TINY_MAE)))
  with pytest.raises(interop.CheckpointError) as error:
    interop.fit_params(mae, init(vit(pool='gap')), source='mae.npz')
  message = str(error.value)
  assert '\n' not in message
  assert ('mae.npz: does not fit the model: missing from the file: fc_norm (2 arrays); '
          'unexpected in the file: Decoder/encoder_norm (2 arrays), Decoder/encoderblock_0..1 '
          '(32 arrays), Transformer/encoder_norm (2 arrays), decoder_embed (2 arrays), '
          'decoder_pred (2 arrays), mask_token.') in message
  fitted, report = interop.fit_params(mae, init(vit(pool='gap')), allow_missing=('fc_norm/.*',),
                                      ignore_unexpected=('Decoder/.*', 'decoder_.*', 'mask_token',
                                                         'Transformer/encoder_norm/.*'))
  assert 'pos_embedding: from the sincos2d table' in str(report)


# ---------------------------------------------------------------------------------------
# Official MAE checkpoints (names of facebookresearch/mae), without PyTorch.
# ---------------------------------------------------------------------------------------


def official_mae_state(seed=0, *, width=32, depth=2, mlp=64, decoder_width=24, decoder_depth=2,
                       decoder_mlp=48, patch=8, grid=4, channels=3, decoder=True):
  """Random weights under the official names and shapes, with the official fixed tables."""
  rng = np.random.default_rng(seed)
  shapes = {'patch_embed.proj.weight': (width, channels, patch, patch),
            'patch_embed.proj.bias': (width,), 'cls_token': (1, 1, width),
            'norm.weight': (width,), 'norm.bias': (width,)}

  def block(prefix, dim, hidden):
    return {f'{prefix}.norm1.weight': (dim,), f'{prefix}.norm1.bias': (dim,),
            f'{prefix}.attn.qkv.weight': (3 * dim, dim), f'{prefix}.attn.qkv.bias': (3 * dim,),
            f'{prefix}.attn.proj.weight': (dim, dim), f'{prefix}.attn.proj.bias': (dim,),
            f'{prefix}.norm2.weight': (dim,), f'{prefix}.norm2.bias': (dim,),
            f'{prefix}.mlp.fc1.weight': (hidden, dim), f'{prefix}.mlp.fc1.bias': (hidden,),
            f'{prefix}.mlp.fc2.weight': (dim, hidden), f'{prefix}.mlp.fc2.bias': (dim,)}

  for i in range(depth):
    shapes.update(block(f'blocks.{i}', width, mlp))
  if decoder:
    shapes.update({'decoder_embed.weight': (decoder_width, width),
                   'decoder_embed.bias': (decoder_width,), 'mask_token': (1, 1, decoder_width),
                   'decoder_norm.weight': (decoder_width,), 'decoder_norm.bias': (decoder_width,),
                   'decoder_pred.weight': (patch * patch * channels, decoder_width),
                   'decoder_pred.bias': (patch * patch * channels,)})
    for i in range(decoder_depth):
      shapes.update(block(f'decoder_blocks.{i}', decoder_width, decoder_mlp))
  state = {k: (0.2 * rng.standard_normal(s) + ('norm' in k and k.endswith('weight')))
           .astype(np.float32) for k, s in shapes.items()}
  # The official tables: float64 numpy made float32 (torch.from_numpy(...).float()).
  state['pos_embed'] = mae_reference.sincos_2d_with_cls(width, grid)[None].astype(np.float32)
  if decoder:
    state['decoder_pos_embed'] = mae_reference.sincos_2d_with_cls(
        decoder_width, grid)[None].astype(np.float32)
  return state


def check_mae_matches_official_reference(path, state, norm_pix_loss=True):
  """Imports `path` into our MAE and compares loss/pred/mask with the reference on `state`."""
  fmt, loaded = interop.load_checkpoint_file(path)
  assert fmt == 'mae'
  model = get_model('MAE-mu/8', **TINY_MAE, norm_pix_loss=norm_pix_loss)
  params, report = interop.fit_params(loaded, init(model), source=str(path))
  assert str(report) == f'{path}: loaded {len(flat(params))} arrays'
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (3, 16))
  loss, pred, mask = model.apply({'params': params}, images, noise=noise)
  ref_loss, ref_pred, ref_mask = mae_reference.mae_forward_official(
      state, np.asarray(images), np.asarray(noise), num_heads=4, decoder_num_heads=3,
      mask_ratio=0.75, norm_pix_loss=norm_pix_loss)
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(pred, ref_pred, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  return float(abs(loss - ref_loss)), float(np.max(np.abs(pred - ref_pred)))


def test_official_mae_names_give_the_reference_loss(tmp_path):
  state = official_mae_state()
  save_file(state, str(tmp_path / 'mae_visualize.safetensors'))
  check_mae_matches_official_reference(tmp_path / 'mae_visualize.safetensors', state)


def test_official_mae_encoder_release_fine_tunes_a_vit(tmp_path):
  state = official_mae_state(decoder=False)
  save_file(state, str(tmp_path / 'mae_pretrain.safetensors'))
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'mae_pretrain.safetensors')
  assert fmt == 'mae'  # recognised by its fixed sincos2d pos_embed
  assert interop.POSEMB not in flat(loaded)
  fitted, report = interop.fit_params(loaded, init(vit(pool='gap')), **interop.MAE_TO_VIT)
  np.testing.assert_allclose(fitted['Transformer']['posembed_input']['pos_embedding'],
                             state['pos_embed'], atol=1e-7)
  np.testing.assert_array_equal(fitted['cls'], state['cls_token'])


def test_mae_fixed_position_embeddings_are_checked(tmp_path):
  state = official_mae_state()
  state['decoder_pos_embed'] = state['decoder_pos_embed'] + np.float32(0.01)
  save_file(state, str(tmp_path / 'bad.safetensors'))
  with pytest.raises(interop.CheckpointError) as error:
    interop.load_checkpoint_file(tmp_path / 'bad.safetensors')
  assert str(error.value) == (
      f'{tmp_path}/bad.safetensors: decoder_pos_embed (1, 17, 24) is not the fixed sincos2d '
      f'table of MAE (max difference 0.01).')
  # Without a decoder a pos_embed that moved from the table is a learned one (timm).
  state = official_mae_state(decoder=False)
  state['pos_embed'] = state['pos_embed'] + np.float32(0.01)
  save_file(state, str(tmp_path / 'finetuned.safetensors'))
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'finetuned.safetensors')
  assert fmt == 'timm' and interop.POSEMB in flat(loaded)
  # So does a head: a classifier whose pos_embed still is the table (not trained yet).
  state = {**official_mae_state(decoder=False), 'head.weight': np.ones((10, 32), np.float32),
           'head.bias': np.zeros(10, np.float32)}
  save_file(state, str(tmp_path / 'classifier.safetensors'))
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'classifier.safetensors')
  assert fmt == 'timm'
  np.testing.assert_array_equal(flat(loaded)[interop.POSEMB], state['pos_embed'])


# ---------------------------------------------------------------------------------------
# Security and bad files: one-line errors naming the file.
# ---------------------------------------------------------------------------------------


class CreatesAFile:
  """A pickle that, if unpickled, opens (creates) `marker` for writing."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def error_of(path) -> str:
  with pytest.raises(interop.CheckpointError) as error:
    interop.load_checkpoint_file(path)
  message = str(error.value)
  assert '\n' not in message and message.startswith(str(path))
  return message


@pytest.mark.parametrize('name', ['model.pth', 'model.bin', 'model.npz'])
def test_pickles_with_code_are_never_run(tmp_path, name):
  marker = tmp_path / 'executed'
  with open(tmp_path / name, 'wb') as f:
    pickle.dump({'model': CreatesAFile(str(marker))}, f)
  message = error_of(tmp_path / name)
  if name.endswith('.npz'):
    assert 'not a .npz checkpoint' in message
  else:  # refused by torch's weights-only unpickler, or not attempted without torch
    assert 'refused: not a weights-only PyTorch file' in message or 'needs torch' in message
  assert not marker.exists()


def test_object_arrays_in_npz_are_refused(tmp_path):
  marker = tmp_path / 'executed'
  np.savez(tmp_path / 'objects.npz', **{'embedding/kernel': np.zeros(3),
                                        'cls': np.array([CreatesAFile(str(marker))], object)})
  assert "refused 'cls': it holds Python objects" in error_of(tmp_path / 'objects.npz')
  assert not marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  assert "unknown checkpoint type '.txt'" in error_of(tmp_path / 'notes.txt')
  (tmp_path / 'model.pkl').write_bytes(pickle.dumps({'a': 1}))
  assert "unknown checkpoint type '.pkl'" in error_of(tmp_path / 'model.pkl')
  (tmp_path / 'text.safetensors').write_text('not tensors at all')
  assert 'not a .safetensors checkpoint' in error_of(tmp_path / 'text.safetensors')
  assert 'no such file' in error_of(tmp_path / 'missing.npz')
  np.savez(tmp_path / 'other.npz', weights=np.zeros(3))
  assert ('not a ViT checkpoint: no embedding/kernel among its keys (weights)'
          in error_of(tmp_path / 'other.npz'))
  save_file({'conv1.weight': np.zeros((2, 2), np.float32), 'fc.weight': np.zeros(2, np.float32)},
            str(tmp_path / 'resnet.safetensors'))
  assert ('keys with no equivalent in vit_jax models: conv1.weight, fc.weight'
          in error_of(tmp_path / 'resnet.safetensors'))
  state = interop.to_timm_state_dict(randomized(init(vit())), vit())
  state.update({f'blocks.{i}.ls1.gamma': np.ones(32, np.float32) for i in range(2)})
  save_file(state, str(tmp_path / 'layerscale.safetensors'))
  assert ('keys with no equivalent in vit_jax models: blocks.0..1.ls1.gamma (2 arrays)'
          in error_of(tmp_path / 'layerscale.safetensors'))


def test_models_timm_cannot_express_are_refused(tmp_path):
  model = vit(representation_size=16)
  with pytest.raises(ValueError, match=r"no equivalent of \['representation_size'\]; export to "
                                       r'\.npz instead'):
    interop.export_timm_safetensors(init(model), model, tmp_path / 'x.safetensors')
  assert not (tmp_path / 'x.safetensors').exists()


# ---------------------------------------------------------------------------------------
# scripts/convert_checkpoint.py
# ---------------------------------------------------------------------------------------


def test_convert_script_writes_an_orbax_checkpoint_the_loop_reads(tmp_path):
  params = randomized(init(vit()))
  interop.export_npz(params, tmp_path / 'pretrained.npz')
  output = tmp_path / 'orbax'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'convert_checkpoint.py'),
       f'--input={tmp_path / "pretrained.npz"}', '--model=ViT-mu/8', '--num_classes=3',
       '--image_size=48', '--model_overrides=width=32,depth=2,num_heads=4,mlp_dim=64',
       f'--output={output}'],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'resampled 4x4 -> 6x6' in result.stdout and 're-initialised head' in result.stdout
  source, restored = checkpoint.load_params(str(output))
  assert source.startswith('orbax')
  restored = flat(restored)
  assert restored['Transformer/posembed_input/pos_embedding'].shape == (1, 37, 32)
  assert restored['head/kernel'].shape == (32, 3)
  np.testing.assert_array_equal(restored['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'],
                                params['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0'][
                                    'kernel'])

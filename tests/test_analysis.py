"""The ViT paper's analyses (vit_jax/analysis.py, scripts/analyze_vit.py): known answers,
attention weights against a from-scratch computation, and the script on a demo workdir."""

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from tests.test_main import demo_config, env8, run_in_process
from vit_jax import analysis, checkpoint, train
from vit_jax.models import get_model, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'analyze_vit.py')
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8,
            num_classes=5)


@functools.cache
def load_script():
  """scripts/analyze_vit.py as a module (once: it defines absl flags)."""
  spec = importlib.util.spec_from_file_location('analyze_vit', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def uniform(tokens: int) -> np.ndarray:
  return np.full((1, tokens, tokens), 1.0 / tokens)  # (heads=1, queries, keys)


# ------------------------------------------------------------------ known answers


def test_uniform_attention_over_a_grid_gives_the_analytic_mean_distance():
  # 2x2 patches of 10 px: from each patch, one at distance 0, two at 10, one at 10*sqrt(2).
  distance, share = analysis.mean_attention_distance(uniform(4), (2, 2), 10)
  np.testing.assert_allclose(distance, [10 * (2 + math.sqrt(2)) / 4], rtol=1e-12)
  np.testing.assert_allclose(share, [0.0], atol=1e-12)
  # 3x3 of 16 px: per axis |i - j| is 0, 1, 2 for 3, 4, 2 of the 9 pairs, so
  # E[dist] = (48 + 24 sqrt(2) + 16 sqrt(5)) / 81 patches. A class token that takes its
  # uniform share (1/10) is set aside and the rest renormalised: the same distance.
  want = 16 * (48 + 24 * math.sqrt(2) + 16 * math.sqrt(5)) / 81
  distance, share = analysis.mean_attention_distance(uniform(10), (3, 3), 16, num_prefix_tokens=1)
  np.testing.assert_allclose(distance, [want], rtol=1e-12)
  np.testing.assert_allclose(share, [0.1], rtol=1e-12)
  assert analysis.uniform_attention_distance((3, 3), 16) == pytest.approx(want, rel=1e-12)
  # A fine grid approaches the mean distance of two uniform points in a unit square,
  # (2 + sqrt(2) + 5 ln(1 + sqrt(2))) / 15 = 0.5214 of its side.
  k = 40
  distance, _ = analysis.mean_attention_distance(uniform(k * k), (k, k), 1)
  square = (2 + math.sqrt(2) + 5 * math.log(1 + math.sqrt(2))) / 15
  assert distance[0] / k == pytest.approx(square, rel=0.02)


def test_attention_to_self_gives_zero_distance_and_to_a_corner_its_mean_distance():
  grid, p = (3, 4), 1
  tokens = p + 12
  to_self = np.broadcast_to(np.eye(tokens), (2, 3, tokens, tokens))  # (batch, heads, ...)
  distance, share = analysis.mean_attention_distance(to_self, grid, 14, num_prefix_tokens=p)
  np.testing.assert_array_equal(distance, np.zeros(3))
  np.testing.assert_array_equal(share, np.zeros(3))
  # Every query looks at the top-left patch: the mean of its distances to all patches.
  corner = np.zeros((1, tokens, tokens))
  corner[..., p] = 1.0
  rows, cols = np.meshgrid(np.arange(3), np.arange(4), indexing='ij')
  want = 14 * np.sqrt(rows**2 + cols**2).mean()
  np.testing.assert_allclose(analysis.mean_attention_distance(corner, grid, 14, p)[0], [want])


def test_rollout_of_identity_attention_is_the_identity():
  eye = np.broadcast_to(np.eye(5), (3, 2, 4, 5, 5))  # (layers, batch, heads, T, T)
  for residual in (True, False):
    np.testing.assert_array_equal(analysis.attention_rollout(eye, residual=residual),
                                  np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_multiplies_head_means_with_the_residual_from_the_first_layer():
  rng = np.random.default_rng(0)
  weights = rng.random((2, 3, 4, 4))  # (layers, heads, T, T)
  weights /= weights.sum(-1, keepdims=True)
  first, second = (0.5 * w.mean(0) + 0.5 * np.eye(4) for w in weights)
  np.testing.assert_allclose(analysis.attention_rollout(weights), second @ first, rtol=1e-12)
  rollout = analysis.attention_rollout(weights)
  np.testing.assert_allclose(rollout.sum(-1), np.ones(4), rtol=1e-12)
  assert not np.allclose(rollout, first @ second)  # the order matters


def test_rollout_to_patches_reads_the_output_each_pool_uses():
  rollout = np.arange(9.0).reshape(3, 3)  # 1 prefix token, 2 patches
  np.testing.assert_array_equal(
      analysis.rollout_to_patches(rollout, pool='tok', num_prefix_tokens=1), [1.0, 2.0])
  np.testing.assert_array_equal(
      analysis.rollout_to_patches(rollout, pool='gap', num_prefix_tokens=1), [5.5, 6.5])
  probe = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # two heads: token 0 and token 2
  np.testing.assert_array_equal(
      analysis.rollout_to_patches(rollout, pool='map', num_prefix_tokens=1,
                                  pool_attention=probe), [4.0, 5.0])


def test_position_similarity_has_a_unit_diagonal_and_is_local_for_sincos():
  rng = np.random.default_rng(0)
  similarity = analysis.cosine_similarity(rng.standard_normal((49, 16)) * 3.0)
  np.testing.assert_allclose(np.diag(similarity), np.ones(49), rtol=1e-12)
  np.testing.assert_allclose(similarity, similarity.T)
  table = analysis.cosine_similarity(layers.sincos2d_table((7, 7), 64))
  np.testing.assert_allclose(np.diag(table), np.ones(49), rtol=1e-12)
  # Neighbours are more alike than patches further away, at every step of distance.
  distances = np.round(analysis.patch_distances((7, 7), 1))
  by_distance = [table[distances == d].mean() for d in range(9)]
  assert np.all(np.diff(by_distance) < 0), by_distance


@pytest.mark.parametrize('kernel_sign', [1.0, -1.0])
@pytest.mark.parametrize('gap', [0.0, 1e-11])
def test_embedding_components_recover_the_directions_of_the_filters(gap, kernel_sign):
  # 200 filters of 2x2x3 pixels: 3 * a * u + b * v + a constant, a and b standard normal.
  # v's two pixels tie in magnitude (gap 0: exactly, so the SVD's last bit decides which
  # is larger; gap 1e-11: the negative one is larger by far more than rounding, so a bare
  # argmax would pick it on every processor): the first of them sets the sign.
  rng = np.random.default_rng(1)
  u, v = np.zeros(12), np.zeros(12)
  u[0], v[[5, 7]] = 1.0, [1.0, -(1.0 + gap)]
  v /= np.linalg.norm(v)
  a, b = rng.standard_normal(200), rng.standard_normal(200)
  a, b = a - a.mean(), b - b.mean()
  b -= a * (a @ b) / (a @ a)  # exactly uncorrelated: the components are u and v
  filters = kernel_sign * (3 * a[:, None] * u + b[:, None] * v + 0.7)
  kernel = filters.T.reshape(2, 2, 3, 200)
  components, explained = analysis.embedding_components(kernel, 5)
  assert components.shape == (5, 2, 2, 3)
  np.testing.assert_allclose(components[0].ravel(), u, atol=1e-12)
  np.testing.assert_allclose(components[1].ravel(), v, atol=1e-12)  # pixel 5 positive
  total = 9 * (a @ a) + b @ b
  np.testing.assert_allclose(explained, [9 * (a @ a) / total, b @ b / total, 0, 0, 0], atol=1e-12)


# ---------------------------------------- captured weights against a from-scratch softmax


def layer_norm(x, params, epsilon=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + epsilon) * params['scale'] + params['bias']


def softmax_qk(inputs_q, inputs_kv, attention):
  """Plain NumPy, float64: softmax(Q K^T / sqrt(d)) per head -> (batch, heads, q, k)."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in attention.items()}
  query = np.einsum('btd,dhk->bhtk', inputs_q, p['query']['kernel']) + p['query']['bias'][:, None]
  key = np.einsum('btd,dhk->bhtk', inputs_kv, p['key']['kernel']) + p['key']['bias'][:, None]
  logits = query @ key.swapaxes(-1, -2) / math.sqrt(query.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def randomized_params(model, seed=0):
  images = np.zeros((1, *layers.pair(model.image_size), model.channels), np.float32)
  params = model.init(jax.random.key(seed), images)['params']
  rng = np.random.default_rng(seed)
  # Fresh biases are zero and norms one: move every parameter so that none hides a mix-up.
  return jax.tree.map(lambda x: np.asarray(x + 0.2 * rng.standard_normal(x.shape), np.float32),
                      params)


@pytest.mark.parametrize('pool', ['tok', 'gap', 'map'])
def test_captured_weights_equal_a_plain_softmax_from_the_same_parameters(pool):
  model = get_model('ViT-mu/8', **TINY, pool=pool, class_token=pool != 'map')
  params = randomized_params(model)
  images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  blocks, pool_attention = jax.device_get(analysis.attention_weights(model, params, images))
  prefix = model.num_prefix_tokens
  assert blocks.shape == (2, 2, 4, 16 + prefix, 16 + prefix)

  # Block 0's input from scratch: patches x embedding, class token, position embedding.
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  patches = np.asarray(layers.patchify(images, 8), np.float64)
  x = patches @ p['embedding']['kernel'].reshape(-1, 32) + p['embedding']['bias']
  if prefix:
    x = np.concatenate([np.broadcast_to(p['cls'], (2, 1, 32)), x], axis=1)
  x = x + p['Transformer']['posembed_input']['pos_embedding']
  # The later block's input and the attention outputs, captured from the model itself.
  _, state = model.apply({'params': params}, images, capture_intermediates=True,
                         mutable=['intermediates'])
  captured = state['intermediates']['Transformer']
  for i in range(2):
    block = p['Transformer'][f'encoderblock_{i}']
    if i:
      x = np.asarray(captured[f'encoderblock_{i - 1}']['__call__'][0][0], np.float64)
    normed = layer_norm(x, block['LayerNorm_0'])
    want = softmax_qk(normed, normed, block['MultiHeadDotProductAttention_1'])
    np.testing.assert_allclose(blocks[i], want, atol=2e-6)
    # The weights are those the model uses: weights x values x out = its attention output.
    attention = block['MultiHeadDotProductAttention_1']
    values = np.einsum('btd,dhk->bhtk', normed, attention['value']['kernel']) + (
        attention['value']['bias'][:, None])
    heads = np.einsum('bhqt,bhtk->bqhk', blocks[i], values)
    out = np.einsum('bqhk,hkd->bqd', heads, attention['out']['kernel']) + attention['out']['bias']
    model_out = captured[f'encoderblock_{i}']['MultiHeadDotProductAttention_1']['__call__'][0]
    np.testing.assert_allclose(out, model_out, atol=2e-4, rtol=1e-4)
  if pool == 'map':
    tokens = np.asarray(captured['encoder_norm']['__call__'][0], np.float64)
    head = p['MAPHead_0']
    probe = np.broadcast_to(head['probe'], (2, 1, 32))
    want = softmax_qk(probe, tokens, head['MultiHeadDotProductAttention_0'])[:, :, 0]
    np.testing.assert_allclose(pool_attention, want, atol=2e-6)
  else:
    assert pool_attention is None


def test_attention_summary_is_the_weights_reduced_batch_by_batch():
  model = get_model('ViT-mu/8', **TINY, pool='gap')
  params = randomized_params(model, seed=2)
  images = np.random.default_rng(3).standard_normal((5, 32, 32, 3)).astype(np.float32)
  summary = analysis.attention_summary(model, params, images, batch_size=2)
  blocks, _ = jax.device_get(analysis.attention_weights(model, params, images))
  for i, layer in enumerate(blocks):
    distance, share = analysis.mean_attention_distance(layer, (4, 4), 8, 1)
    np.testing.assert_allclose(summary['distance'][i], distance, rtol=1e-5)
    np.testing.assert_allclose(summary['prefix_share'][i], share, rtol=1e-5, atol=1e-7)
  rollout = analysis.rollout_to_patches(analysis.attention_rollout(blocks), pool='gap',
                                        num_prefix_tokens=1)
  np.testing.assert_allclose(summary['rollout'], rollout, rtol=1e-5)


# ------------------------------------------------------------------------- the script


@pytest.fixture(scope='module')
def finetune_workdir(tmp_path_factory):
  """A demo classifier trained for 2 steps (tiny model, built-in data)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = tmp_path_factory.mktemp('finetune')
  run_in_process(demo_config('mae_finetune', data_dir, total_steps=2), workdir)
  return workdir, data_dir


def png_size(path):
  with Image.open(path) as image:
    return image.size


def test_the_script_on_a_demo_workdir(finetune_workdir, tmp_path):
  workdir, data_dir = finetune_workdir
  out = tmp_path / 'analysis'
  result = subprocess.run(
      [sys.executable, SCRIPT, f'--workdir={workdir}', f'--output_dir={out}',
       '--num_images=12', '--num_examples=3', '--batch_size=5'],
      env=env8(data_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ('embedding_filters', 'position_similarity', 'attention_distance',
               'attention_rollout'):
    width, height = png_size(out / f'{name}.png')
    assert 150 < width < 1600 and 150 < height < 1600, (name, width, height)
  numbers = json.load(open(out / 'analysis.json'))
  assert numbers['model']['pool'] == 'gap' and numbers['model']['depth'] == 1
  assert numbers['images'] == 'the first 12 images of fashion_mnist_t10k:test[:128]'
  distance = np.array(numbers['attention_distance']['pixels'])
  assert distance.shape == (1, 2)  # (layers, heads) of the tiny demo model
  # 7x7 patches of 4 px: every distance lies between 0 and the grid's diagonal.
  assert np.all(distance > 0) and np.all(distance < 4 * 6 * math.sqrt(2))
  assert numbers['attention_distance']['uniform_attention_pixels'] == pytest.approx(
      analysis.uniform_attention_distance((7, 7), 4), abs=1e-3)
  similarity = np.array(numbers['position_similarity']['similarity'])
  assert similarity.shape == (49, 49) and numbers['position_similarity']['kind'] == 'learned'
  np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-3)
  explained = numbers['embedding_filters']['explained_variance']
  assert len(explained) == 16 and explained == sorted(explained, reverse=True)  # 4x4x1 filters
  assert 0.99 < sum(explained) <= 1.0 + 1e-3
  maps = np.array(numbers['attention_rollout']['maps'])
  assert maps.shape == (3, 49)
  np.testing.assert_allclose(maps.sum(1), 1.0, atol=1e-3)
  assert 'mean of the patch tokens' in numbers['attention_rollout']['output']
  # The figures also in the workdir's TensorBoard, at the analysed checkpoint's step.
  from tests.test_outputs import tensorboard_events  # pylint: disable=import-outside-toplevel
  events = tensorboard_events(workdir)
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  for name in ('embedding_filters', 'position_similarity', 'attention_distance',
               'attention_rollout'):
    [image] = events.Images(f'analysis/{name}')
    assert image.step == step and (image.width, image.height) == png_size(out / f'{name}.png')

  # The numbers are those of the workdir's weights on those images, computed here.
  script = load_script()
  model, params, config, _ = script.load(str(workdir), None, None, {})
  images = script.load_images(model, config, [], 12)[0]
  want = analysis.attention_summary(model, params, images)['distance']
  np.testing.assert_allclose(distance, want, atol=2e-3)


def test_an_mae_workdir_is_analysed_as_its_encoder(tmp_path):
  """An MAE run's workdir (config.json + Orbax checkpoint) -> its encoder as a ViT."""
  config = demo_config('mae_pretrain', str(tmp_path / 'tfds'))
  mae = get_model(config.model_name, **config.model)
  variables = mae.init({'params': jax.random.key(0), 'masking': jax.random.key(1)},
                       np.zeros((1, 28, 28, 1), np.float32))
  saved = jax.device_get(variables['params'])
  workdir = str(tmp_path / 'mae')
  os.makedirs(workdir)
  train.write_config(config, workdir)
  checkpointer = checkpoint.Checkpointer(workdir, keep=1, asynchronous=False)
  checkpointer.save(1, {'params': saved}, {})
  checkpointer.close()
  model, params, _, source = load_script().load(workdir, None, None, {})
  assert source.startswith('orbax:')
  assert (model.pool, model.posemb, model.num_classes, model.depth) == ('tok', 'sincos2d', 0, 1)
  saved = traverse_util.flatten_dict(saved, sep='/')
  loaded = traverse_util.flatten_dict(params, sep='/')
  assert 'Transformer/encoder_norm/scale' in loaded
  assert not any(k.startswith(('Decoder', 'decoder_', 'mask_token')) for k in loaded)
  for key, value in loaded.items():
    np.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_bad_input_is_one_error_line(tmp_path):
  np.savez(tmp_path / 'w.npz', x=np.zeros(3))
  for args, expected in (
      ([f'--checkpoint={tmp_path / "w.npz"}'], 'has no config.json: give --model=NAME'),
      (['--workdir=x', '--num_images=0'], '--num_images=0 must be at least 1')):
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, (args, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith('Error: ') and expected in lines[-1], (args, lines[-3:])
  # The rest of what main() reports as that one line, raised by the loading functions:
  script = load_script()
  for args, expected in (((None, str(tmp_path / 'w.npz'), 'ViT-mu/8', {}), 'embedding/kernel'),
                         ((None, str(tmp_path / 'none'), 'ViT-mu/8', {}), 'does not exist')):
    with pytest.raises(ValueError, match=expected):
      script.load(*args)
  with pytest.raises(ValueError, match="'num_heads' is not key=value"):
    script.parse_fields(['num_heads'])
  assert script.parse_fields(['num_heads=4', 'pool=gap', 'fc_norm=false']) == dict(
      num_heads=4, pool='gap', fc_norm=False)
  with pytest.raises(ValueError, match='no images: give --images'):
    script.load_images(get_model('ViT-mu/8', **TINY), None, [], 4)


def test_the_script_on_an_imported_timm_checkpoint(tmp_path):
  """The parity tests' class-token model, saved by timm, analysed; weights equal timm's."""
  torch = pytest.importorskip('torch', reason='PyTorch is not installed: pip install -r '
                              'requirements-interop.txt')
  pytest.importorskip('timm', reason='timm is not installed: pip install -r '
                      'requirements-interop.txt')
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=import-outside-toplevel
  from tests.test_interop_timm import VARIANTS, perturbed_timm  # pylint: disable=import-outside-toplevel
  from vit_jax import interop  # pylint: disable=import-outside-toplevel

  ours = get_model('ViT-mu/16', **{**TINY, **VARIANTS['token_patch16'], 'num_classes': 10})
  reference = perturbed_timm(VisionTransformer(**interop.timm_kwargs(ours)), seed=1)
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
            str(tmp_path / 'timm.safetensors'))
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])

  out = tmp_path / 'analysis'
  result = subprocess.run(
      [sys.executable, SCRIPT, f'--checkpoint={tmp_path / "timm.safetensors"}',
       '--model=ViT-mu/16', '--model_fields=num_heads=4', f'--images={",".join(paths)}',
       f'--output_dir={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  numbers = json.load(open(out / 'analysis.json'))
  assert numbers['model']['pool'] == 'tok' and numbers['model']['num_heads'] == 4
  assert (numbers['model']['depth'], numbers['model']['width'], numbers['model']['image_size']
          ) == (2, 32, 32)
  assert np.array(numbers['attention_distance']['pixels']).shape == (2, 4)

  # timm's own attention probabilities, from its blocks' inputs, equal ours.
  script = load_script()
  model, params, _, _ = script.load(None, str(tmp_path / 'timm.safetensors'), 'ViT-mu/16',
                                    {'num_heads': 4})
  images = script.load_images(model, None, paths, 3)[0]
  inputs = []
  hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
           for block in reference.blocks]
  with torch.no_grad():
    reference(torch.from_numpy(np.transpose(images, (0, 3, 1, 2))))
    theirs = []
    for block, x in zip(reference.blocks, inputs):
      attention = block.attn
      batch, tokens, width = x.shape
      qkv = attention.qkv(block.norm1(x)).reshape(batch, tokens, 3, 4, width // 4)
      query, key = qkv.permute(2, 0, 3, 1, 4)[:2]
      theirs.append(torch.softmax(query @ key.transpose(-1, -2) * (width // 4) ** -0.5, -1))
  for hook in hooks:
    hook.remove()
  blocks, _ = jax.device_get(analysis.attention_weights(model, params, images))
  np.testing.assert_allclose(blocks, np.stack([t.numpy() for t in theirs]), atol=1e-5)

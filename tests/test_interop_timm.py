"""Parity with timm's VisionTransformer and PyTorch checkpoint files.

Needs the packages of requirements-interop.txt (torch, torchvision, timm), which are
not in the main test environment, where these tests skip:

  pip install -r requirements-test.txt -r requirements-interop.txt
  python -m pytest -q tests/test_interop_timm.py
"""

import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch is not installed: pip install -r '
                            'requirements-interop.txt to run the timm parity tests')
timm = pytest.importorskip('timm', reason='timm is not installed: pip install -r '
                           'requirements-interop.txt to run the timm parity tests')
safetensors_torch = pytest.importorskip('safetensors.torch')

from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tests.test_interop import (  # noqa: E402
    CreatesAFile, assert_trees_equal, check_mae_matches_official_reference, error_of, flat, init,
    official_mae_state, vit)
from vit_jax import interop  # noqa: E402
from vit_jax.models import layers  # noqa: E402

VARIANTS = {
    # name: our model fields (tiny: width 32, depth 2, 4 heads, MLP 64)
    'token_patch16': dict(patch_size=16, image_size=32, pool='tok'),
    'avg_fc_norm_patch32': dict(patch_size=32, image_size=64, pool='gap'),
    'avg_no_class_token': dict(patch_size=16, image_size=48, pool='gap', class_token=False,
                               fc_norm=False),
    'map_patch16': dict(patch_size=16, image_size=32, pool='map', class_token=False),
}
MAX_LOGIT_DIFFERENCE = {}  # printed at the end of the session, for the record


@pytest.fixture(scope='module', autouse=True)
def report_differences():
  yield
  print('\nmax |ours - theirs| (logits against timm; MAE against the official-names reference):')
  for name, difference in MAX_LOGIT_DIFFERENCE.items():
    print(f'  {name}: {difference:.2e}')


def perturbed_timm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """timm initialises biases to zero and norms to one: move every parameter off them."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
  return model.eval()


def torch_logits(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)))).numpy()


def our_logits(model, params, images_nhwc):
  return np.asarray(jax.jit(model.apply)({'params': params}, images_nhwc))


def images_for(model, seed=0):
  size = layers.pair(model.image_size)
  return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def record(name, ours, theirs):
  difference = float(np.max(np.abs(ours - theirs)))
  scale = float(np.max(np.abs(theirs)))
  assert scale > 0.1  # logits large enough for the tolerance to mean something
  MAX_LOGIT_DIFFERENCE[name] = max(difference, MAX_LOGIT_DIFFERENCE.get(name, 0.0))
  assert difference < 1e-4, (name, difference)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_timm_parity_import_and_export(tmp_path, variant):
  model = vit(**VARIANTS[variant])
  kwargs = interop.timm_kwargs(model)
  reference = perturbed_timm(VisionTransformer(**kwargs), seed=1)
  state = {k: v.contiguous() for k, v in reference.state_dict().items()}
  safetensors_torch.save_file(state, str(tmp_path / 'timm.safetensors'))
  images = images_for(model)
  want = torch_logits(reference, images)

  # Import: a timm state dict -> our model -> the same logits.
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'timm.safetensors')
  assert fmt == 'timm'
  params, report = interop.fit_params(loaded, init(model))
  assert str(report).endswith(f'loaded {len(flat(params))} arrays')
  record(variant, our_logits(model, params, images), want)

  # Export: the state dict timm gets back is the one it gave, bit for bit.
  exported = tmp_path / 'ours.safetensors'
  assert interop.export_timm_safetensors(params, model, exported) == kwargs
  round_trip = safetensors_torch.load_file(str(exported))
  assert sorted(round_trip) == sorted(state)
  for key in state:
    assert torch.equal(round_trip[key], state[key]), key
  # ... which timm loads strictly and runs to the same logits.
  again = VisionTransformer(**kwargs).eval()
  again.load_state_dict(round_trip, strict=True)
  record(variant, our_logits(model, params, images), torch_logits(again, images))
  # Export then import gives identical parameters.
  _, reloaded = interop.load_checkpoint_file(exported)
  assert_trees_equal(interop.fit_params(reloaded, init(model, seed=3))[0], params)

  # Our .npz goes through timm's own loader of vit_jax/big_vision files (which reads no
  # fc_norm): an independent check of the vit_jax names.
  if not model.use_fc_norm:
    interop.export_npz(params, tmp_path / 'ours.npz')
    from_npz = VisionTransformer(**kwargs).eval()
    from_npz.load_pretrained(str(tmp_path / 'ours.npz'))
    record(variant + ' (npz via timm)', our_logits(model, params, images),
           torch_logits(from_npz, images))


def test_representation_layer_of_old_timm_state_dicts(tmp_path):
  """timm < 0.9 had pre_logits.fc (Linear + tanh) before the head; timm 1.0 has none."""
  model = vit(patch_size=32, image_size=64, representation_size=24)
  trunk = perturbed_timm(VisionTransformer(
      img_size=64, patch_size=32, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
      num_classes=0), seed=2)
  pre_logits = torch.nn.Linear(32, 24)
  head = torch.nn.Linear(24, 10)
  state = {**trunk.state_dict(), **{f'pre_logits.fc.{k}': v for k, v in
                                    pre_logits.state_dict().items()},
           **{f'head.{k}': v for k, v in head.state_dict().items()}}
  # A training checkpoint as timm's train.py writes it, argparse.Namespace included.
  torch.save({'state_dict': state, 'args': argparse.Namespace(model='vit'), 'epoch': 3},
             tmp_path / 'old_timm.pth')
  fmt, loaded = interop.load_checkpoint_file(tmp_path / 'old_timm.pth')
  assert fmt == 'timm'
  params, _ = interop.fit_params(loaded, init(model))
  images = images_for(model)
  with torch.no_grad():
    features = trunk(torch.from_numpy(np.transpose(images, (0, 3, 1, 2))))
    want = head(torch.tanh(pre_logits(features))).numpy()
  record('representation_patch32', our_logits(model, params, images), want)
  interop.export_npz(params, tmp_path / 'ours.npz')  # timm cannot take it; .npz can
  assert_trees_equal(interop.load_checkpoint_file(tmp_path / 'ours.npz')[1], params)


def test_timm_create_model_loads_our_export(tmp_path):
  model = vit(**VARIANTS['avg_fc_norm_patch32'])
  params = init(model, seed=4)
  path = tmp_path / 'ours.safetensors'
  kwargs = interop.export_timm_safetensors(params, model, path)
  overlay = dict(file=str(path), custom_load=False, num_classes=kwargs['num_classes'])
  created = timm.create_model('vit_base_patch32_224', pretrained=True,
                              pretrained_cfg_overlay=overlay, **kwargs).eval()
  images = images_for(model)
  record('create_model', our_logits(model, params, images), torch_logits(created, images))


def test_resampling_matches_timm_when_upsampling():
  model = vit(patch_size=16, image_size=32, pool='tok')  # 2x2 patches
  source = init(model, seed=5)
  target = vit(patch_size=16, image_size=64, pool='tok')  # 4x4
  fitted, _ = interop.fit_params(source, init(target))
  posemb = torch.from_numpy(source['Transformer']['posembed_input']['pos_embedding'])
  want = resample_abs_pos_embed(posemb, [4, 4], num_prefix_tokens=1, interpolation='bilinear',
                                antialias=False).numpy()
  np.testing.assert_allclose(fitted['Transformer']['posembed_input']['pos_embedding'], want,
                             atol=1e-6)


def test_official_mae_pth_gives_the_reference_loss(tmp_path):
  """The 'model' entry of a .pth written as the official main_pretrain.py saves it."""
  state = official_mae_state(seed=1)
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}, 'optimizer': {},
              'epoch': 799, 'scaler': {'scale': 65536.0},
              'args': argparse.Namespace(model='mae_vit_tiny', norm_pix_loss=True)},
             tmp_path / 'checkpoint-799.pth')
  loss_difference, pred_difference = check_mae_matches_official_reference(
      tmp_path / 'checkpoint-799.pth', state)
  MAX_LOGIT_DIFFERENCE['MAE loss'] = loss_difference
  MAX_LOGIT_DIFFERENCE['MAE pred'] = pred_difference


def test_bfloat16_files(tmp_path):
  model = vit(pool='gap')
  state = {k: torch.from_numpy(v).to(torch.bfloat16)
           for k, v in interop.to_timm_state_dict(init(model), model).items()}
  safetensors_torch.save_file(state, str(tmp_path / 'bf16.safetensors'))
  torch.save(state, tmp_path / 'bf16.pth')
  want = None
  for name in ('bf16.safetensors', 'bf16.pth'):
    params, _ = interop.fit_params(interop.load_checkpoint_file(tmp_path / name)[1], init(model))
    assert flat(params)['embedding/kernel'].dtype == np.float32
    if want is None:
      want = params
    assert_trees_equal(params, want)
  np.testing.assert_array_equal(flat(want)['head/bias'], state['head.bias'].float().numpy())


def test_pickle_with_code_is_refused_by_torch(tmp_path):
  marker = tmp_path / 'executed'
  torch.save({'model': {'cls_token': torch.zeros(1)}, 'payload': CreatesAFile(str(marker))},
             tmp_path / 'evil.pth')
  message = error_of(tmp_path / 'evil.pth')
  assert 'refused: not a weights-only PyTorch file' in message
  assert message.endswith('(it calls io.open).')
  assert not marker.exists()

"""scripts/benchmark.py: the FLOP count by hand, the checks of a preset, one row end to end.

No timing is asserted: the numbers of a run depend on the machine.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import metrics, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32, patch_size=8)
TINY_DECODER = dict(decoder_width=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32)


@pytest.fixture(scope='module')
def bench():
  """The script as a module (its flags are only defined when it runs as a script)."""
  spec = importlib.util.spec_from_file_location('benchmark', f'{ROOT}/scripts/benchmark.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_vit_flops_equal_a_hand_count():
  model = models.get_model('ViT-mu/8', **TINY, num_classes=10)
  # 32x32 images in 8x8 patches: 16 patches of 8*8*3 = 192 numbers, 17 tokens, width 32.
  embedding = 2 * 16 * 192 * 32
  qkv_and_out = 4 * (2 * 17 * 32 * 32)
  scores_and_values = 2 * (2 * 17 * 17 * 32)
  mlp = 2 * (2 * 17 * 32 * 64)
  head = 2 * 32 * 10
  expected = embedding + 2 * (qkv_and_out + scores_and_values + mlp) + head
  assert expected == 828_288
  assert metrics.forward_flops(model) == expected
  assert metrics.train_flops(model, 'classification') == 3 * expected
  # A linear probe only needs the head's weight gradient: one more head's worth.
  assert metrics.train_flops(model, 'linear_probe') == expected + head


def test_mae_flops_equal_a_hand_count():
  model = models.get_model('MAE-mu/8', **TINY, **TINY_DECODER, mask_ratio=0.75)
  # 4 of 16 patches visible: the encoder sees 5 tokens, the decoder all 17.
  embedding = 2 * 4 * 192 * 32
  encoder_block = 4 * (2 * 5 * 32 * 32) + 2 * (2 * 5 * 5 * 32) + 2 * (2 * 5 * 32 * 64)
  decoder_embed = 2 * 5 * 32 * 16
  decoder_block = 4 * (2 * 17 * 16 * 16) + 2 * (2 * 17 * 17 * 16) + 2 * (2 * 17 * 16 * 32)
  decoder_pred = 2 * 17 * 16 * 192
  expected = embedding + 2 * encoder_block + decoder_embed + decoder_block + decoder_pred
  assert expected == 417_088
  assert metrics.forward_flops(model) == expected


@pytest.mark.parametrize('name, overrides', [
    ('ViT-Ti/16', dict(num_classes=10)),
    ('ViT-Ti/16', dict(pool='map', class_token=False, representation_size=100)),
    ('MAE-Ti/16', dict()),
])
def test_flops_agree_with_xla_for_the_forward_pass(name, overrides):
  """XLA also counts norms, softmax and GELU: a little more than the matmuls alone."""
  model = models.get_model(name, image_size=64, **overrides)
  images = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  compiled = jax.jit(lambda v, x: model.apply(v, x, rngs={'masking': jax.random.key(1)})).lower(
      variables, images).compile()
  ratio = metrics.compiled_flops(compiled) / (2 * metrics.forward_flops(model))
  assert 1.0 <= ratio < 1.03, ratio


def test_checks_of_a_preset(bench):
  vit, mae = bench.Row('ViT-B/16', 8), bench.Row('MAE-B/16', 8, mask_ratio=0.75)
  scanned = bench.Row('ViT-B/16', 8, scan=True)
  results = {
      vit: dict(mfu=0.61, images_per_s=2.0, batch_size=8, analytic_flops_per_step=8 * 90.0),
      mae: dict(mfu=0.55, images_per_s=3.0, batch_size=8, analytic_flops_per_step=8 * 50.0),
      scanned: dict(compile_s=21.0),
  }
  checks = bench.run_checks([('mfu', vit, 0.60), ('mfu', mae, 0.60),
                             ('mae_speedup', (vit, mae), 0.9), ('compile_s', scanned, 20.0)],
                            results)
  assert [c['passed'] for c in checks] == [True, False, False, False]
  # The MAE must reach 0.9 x (90 / 50) x 2.0 = 3.24 images/s.
  assert checks[2]['flop_ratio'] == pytest.approx(1.8)
  assert checks[2]['target'] == pytest.approx(3.24)
  assert all(c['kind'] == 'check' and c['text'] for c in checks)


def test_the_loop_is_checked_against_its_step_alone_back_to_back(bench):
  mae, probe = 'configs/fashion_mnist.py:mae', 'configs/fashion_mnist.py:probe'
  results = {mae: dict(images_per_s_median=1040.0, images_per_s_sustained=1000.0),
             ('loop', mae): dict(loop_images_per_s=905.0),
             probe: dict(images_per_s_median=2100.0, images_per_s_sustained=2000.0),
             ('loop', probe): dict(loop_images_per_s=1790.0)}
  checks = bench.run_checks([('loop', mae, 0.9), ('loop', probe, 0.9)], results)
  assert [c['passed'] for c in checks] == [True, False]
  assert [c['value'] for c in checks] == pytest.approx([0.905, 0.895])
  assert checks[1]['text'] == ('1790 img/s in the loop, 2000 for the step alone back to back: '
                               '89.5% >= 90% (one step at a time: 2100 median, 85.2%)')
  # The preset covers every recipe the studies run.
  studies = bench.PRESETS['studies']
  assert studies['configs'] == [f'configs/fashion_mnist.py:{v}'
                                for v in ('mae', 'finetune', 'scratch', 'probe')]
  assert [c[1] for c in studies['checks']] == studies['configs']


def test_preset_rows_are_those_of_issue_7(bench):
  rows = bench.PRESETS['cpu_issue7']['rows']
  assert [(r.model, r.batch_size, r.dtype, r.image_size, r.scan) for r in rows] == [
      ('ViT-B/16', 8, 'float32', 224, False), ('ViT-S/16', 16, 'float32', 224, False),
      ('MAE-B/16', 8, 'float32', 224, False), ('ViT-B/16', 8, 'float32', 224, True)]
  assert rows[2].mask_ratio == 0.75


def test_one_row_in_process(bench):
  row = bench.Row('ViT-mu/8', 8, image_size=32)
  config = bench.row_config(row)
  config.model.update(TINY)
  result = bench.benchmark(config, num_classes=10, steps=2, warmup=1)
  peak = bench.Peak(wait_idle=False)
  peak.measure()
  result = bench.finish(result, peak)
  assert result['num_devices'] == jax.device_count()
  assert result['analytic_flops_per_step'] == 8 * 3 * 828_288
  assert len(result['step_times_s']) == 2 and result['step_time_s'] == min(result['step_times_s'])
  assert result['images_per_s'] == pytest.approx(8 / result['step_time_s'])
  assert 0 < result['images_per_s_sustained'] < float('inf')
  assert result['mfu'] == pytest.approx(result['analytic_flops_per_step'] / result['step_time_s']
                                        / result['peak_flops'])
  assert result['xla_flops_per_step'] > result['analytic_flops_per_step']
  assert result['xla_total_bytes'] > 0 and np.isfinite(result['loss'])
  assert '| ViT-mu/8 (float32, 32px, batch 8) |' in bench.table([result])


def test_script_runs_a_config_and_appends_json_rows(tmp_path):
  output = tmp_path / 'rows.jsonl'
  output.write_text('{"earlier": "row"}\n')
  command = [sys.executable, f'{ROOT}/scripts/benchmark.py',
             '--config=configs/mae_pretrain.py:demo', '--config.global_batch_size=8',
             '--steps=1', '--warmup=1', f'--output={output}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = output.read_text().splitlines()
  assert len(lines) == 2 and json.loads(lines[0]) == {'earlier': 'row'}
  row = json.loads(lines[1])
  expected = {'kind', 'row', 'model', 'objective', 'batch_size', 'image_size', 'dtype', 'scan',
              'mask_ratio', 'platform', 'device_kind', 'num_devices', 'step_times_s',
              'step_time_s', 'step_time_median_s', 'images_per_s', 'analytic_flops_per_step',
              'xla_flops_per_step', 'peak_flops', 'peak_source', 'mfu', 'mfu_xla', 'compile_s',
              'xla_total_bytes', 'rss_growth_bytes', 'loss', 'images_per_s_sustained'}
  assert expected <= set(row), expected - set(row)
  assert (row['kind'], row['model'], row['objective'], row['batch_size']) == (
      'step', 'MAE-mu/4', 'mae', 8)
  assert row['image_size'] == [28, 28] and row['steps'] == 1
  assert row['peak_flops'] > 0 and row['mfu'] > 0
  assert 'MAE-mu/4' in result.stdout and 'MFU' in result.stdout

"""The pre-flight: compiling the run's steps for a TPU topology on this CPU (needs libtpu).

Compiles are of tiny models (ViT-mu and MAE-mu at 32x32) and skip cleanly without
libtpu (`pip install -r requirements-tpu.txt`; CI installs it).
"""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip('libtpu', reason='needs libtpu (requirements-tpu.txt)')

from vit_jax import metrics, models, preflight  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(kind: str, **changes):
  """A paper config shrunk to a tiny model at 32x32 on ImageNet's (known) split sizes."""
  if kind == 'vit':
    config = preflight.load_config(os.path.join(ROOT, 'configs/vit_scratch.py'),
                                   'model=mu/8,data=imagenet2012')
    config.model.representation_size = 32
  else:
    config = preflight.load_config(os.path.join(ROOT, 'configs/mae_pretrain.py'),
                                   'model=mu/8,data=imagenet2012')
  config.model.image_size = 32
  config.model.scan = False
  config.global_batch_size = config.eval_batch_size = 64
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.mark.parametrize('topology,devices,chips', [('v5e:2x2', 4, 4), ('v3:2x2', 8, 4)])
@pytest.mark.parametrize('kind', ['vit', 'mae'])
def test_small_models_fit_and_report_memory(kind, topology, devices, chips):
  report = preflight.run(tiny_config(kind), topology, estimate=False)
  assert (report.num_devices, report.num_chips) == (devices, chips)
  assert report.fits
  memory = report.train_memory
  # Batch: 64 images of 32x32x3 float32 and their int32 labels, split over the devices.
  assert memory.parts['batch'] == 64 * (32 * 32 * 3 * 4 + 4) // devices
  # The paper configs split the float32 parameters and AdamW's two moments over the
  # devices (FSDP).
  tpu = preflight.tpu_slice(topology)
  params = preflight._setup(tiny_config(kind), tpu.devices, 1000,
                            1_281_167).steps.abstract_state['params']
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert num_params > 10_000
  assert memory.parts['parameters'] == pytest.approx(4 * num_params / devices, rel=0.02)
  assert memory.parts['optimizer state'] == pytest.approx(2 * 4 * num_params / devices,
                                                         rel=0.02)
  # The arguments XLA allocates are the state and batch shards counted by shape, plus the
  # TPU's tiling of small dimensions (this model's width of 32 is padded to 128 lanes, and
  # its slices of 4 or 8 too): less than 3x what replicated state would take.
  replicated = 3 * 4 * num_params + memory.parts['batch']
  assert sum(memory.parts.values()) <= memory.arguments < 3 * replicated
  assert 0 < memory.temporaries < 2**30
  lines = '\n'.join(report.lines())
  assert f'fits ({report.hbm_fraction:.0%} of HBM)' in lines
  assert f'of {preflight.CHIPS[topology.split(":")[0]].hbm_bytes / 2**30:.0f} GiB' in lines


def test_an_oversized_batch_does_not_fit_and_exits_non_zero():
  command = [sys.executable, '-m', 'vit_jax.preflight',
             '--config=configs/vit_scratch.py:model=mu/8,data=imagenet2012',
             '--topology=v5e:2x2', '--noestimate',
             '--config.global_batch_size=262144', '--config.eval_batch_size=64']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert 'does not fit' in result.stdout, result.stdout
  assert 'would help: ' in result.stdout
  assert 'compiler ran out of memory' in result.stdout
  # 749 GiB of temporaries (the compiler's count) in 16 GiB: 64 micro-batches.
  assert '--config.grad_accum_steps=64 ' in result.stdout
  assert 'Traceback' not in result.stderr


def test_hours_and_mfu_arithmetic():
  """MAE-L/16's recipe on 128 v3 cores at an assumed 0.2 s per step."""
  model = models.get_model('MAE-L/16')
  flops = metrics.train_flops(model, 'mae') * 4096
  chip = preflight.CHIPS['v3']
  report = preflight.Report(
      title='', chip=chip, num_devices=128, num_chips=64, train_memory=None,
      eval_memory=None, step_seconds=0.2, model_flops_per_step=flops,
      xla_flops_per_step=flops, global_batch_size=4096, steps_per_epoch=1_281_167 / 4096,
      total_steps=math.ceil(800 * 1_281_167 / 4096))
  assert report.images_per_second == pytest.approx(20_480)
  assert report.epoch_hours == pytest.approx(1_281_167 / 20_480 / 3600)
  assert report.total_steps == 250_228
  assert report.run_hours == pytest.approx(250_228 * 0.2 / 3600)  # 13.9 h
  assert report.chip_hours == pytest.approx(report.run_hours * 64)
  # 128 cores x 61.5 TFLOP/s = 7.87 PFLOP/s peak.
  assert report.mfu == pytest.approx(flops / 0.2 / 7.872e15)
  assert 0.3 < report.mfu < 0.6


@pytest.mark.parametrize('rules,tolerance', [([('.*', 'replicate')], 0.03),
                                             ([('.*', 'fsdp:data')], 0.05)])
def test_the_scan_correction_matches_an_unrolled_compile(rules, tolerance):
  """A scanned 4-block ViT (XLA counts its loop body once) against the same ViT unrolled,
  replicated and with the paper recipes' FSDP."""
  scanned = tiny_config('vit', **{'model.depth': 4, 'model.scan': True, 'sharding_rules': rules})
  unrolled = tiny_config('vit', **{'model.depth': 4, 'sharding_rules': rules})
  tpu = preflight.tpu_slice('v5e:2x2')

  def estimate(config, compiled=None):
    setup = preflight._setup(config, tpu.devices, 1000, 1_281_167)
    if compiled:
      compiled, _ = preflight._compile_train(setup, 64)
    return preflight.estimate_step(config, tpu.devices, 1000, 1_281_167, setup.model, compiled)

  scanned_seconds, scanned_flops, how, scanned_cycles = estimate(scanned)
  unrolled_seconds, unrolled_flops, _, unrolled_cycles = estimate(unrolled, compiled=True)
  assert 'unrolled compiles at depth 1 and 2' in how
  assert scanned_seconds == pytest.approx(unrolled_seconds, rel=tolerance)
  assert scanned_flops == pytest.approx(unrolled_flops, rel=tolerance)
  # The breakdown by operation extrapolates the same way: the costliest operations of the
  # unrolled step have the same shares in the scanned estimate, and the blocks' are among
  # them.
  top = preflight._shares(unrolled_cycles, 6)
  scanned_shares = dict(preflight._shares(scanned_cycles, len(scanned_cycles)))
  for name, share in top:
    assert scanned_shares[name] == pytest.approx(share, abs=0.02), name
  assert sum(scanned_shares.values()) == pytest.approx(1.0)
  assert any('/Transformer/encoderblock/' in name for name, _ in top), top


def test_two_slices_put_the_data_axis_over_the_slices():
  config = tiny_config('vit', **{'mesh': [('data', -1)]})
  report = preflight.run(config, 'v5e:2x2', num_slices=2, estimate=False)
  assert (report.num_devices, report.num_chips) == (8, 8)
  assert report.fits
  assert '2 slices' in report.title
  tpu = preflight.tpu_slice('v5e:2x2', num_slices=2)
  from vit_jax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh([('data', -1)], devices=tpu.devices)
  slices = [d.slice_index for d in mesh.devices.flat]
  # Each slice holds one contiguous half of the batch: only the gradient all-reduce
  # crosses the slow network between slices.
  assert slices == [0] * 4 + [1] * 4


def test_the_paper_recipes_keep_fsdp_inside_each_slice():
  """The paper recipes split their state over `data` (FSDP); on two slices their mesh
  gives each slice a replica, so the gathers of the parameters stay inside a slice."""
  config = tiny_config('mae')
  assert (config.mesh, config.sharding_rules) == ([('replica', 'slices'), ('data', -1)],
                                                  [('.*', 'fsdp:data')])
  report = preflight.run(config, 'v5e:2x2', num_slices=2, estimate=False)
  assert report.fits
  assert "mesh {'replica': 2, 'data': 4}" in report.title
  tpu = preflight.tpu_slice('v5e:2x2', num_slices=2)
  setup = preflight._setup(config, tpu.devices, 1000, 1_281_167)
  assert [[d.slice_index for d in row] for row in setup.mesh.devices] == [[0] * 4, [1] * 4]
  # A kernel is split 4 ways over `data` (inside a slice), not over the 8 devices.
  kernel = setup.steps.abstract_state['params']['decoder_pred']['kernel']
  assert 'data' in kernel.sharding.spec and 'replica' not in kernel.sharding.spec
  assert math.prod(kernel.sharding.shard_shape(kernel.shape)) * 4 == math.prod(kernel.shape)


def test_operations_are_named_the_same_for_every_block():
  name = 'jit(train_step)/transpose(jvp(MAE))/Decoder/encoderblock_3/MlpBlock_0/Dense_1/dot_general'
  assert preflight.operation(name) == 'backward MAE/Decoder/encoderblock/MlpBlock/Dense/dot_general'
  assert preflight.operation('jit(train_step)/jvp(ViT)/Transformer/encoderblock_11/'
                             'MultiHeadDotProductAttention_0/bhqd,bhkd->bhqk/dot_general') == (
      'forward ViT/Transformer/encoderblock/MultiHeadDotProductAttention/bhqd,bhkd->bhqk/'
      'dot_general')
  assert preflight.operation('jit(train_step)/add') == 'add'
  report = preflight.Report(title='t', chip=preflight.CHIPS['v4'], num_devices=4, num_chips=4,
                            train_memory=preflight.Memory(2**30, 0, 0, 0, {}),
                            eval_memory=None, step_seconds=0.2, model_flops_per_step=1e15, xla_flops_per_step=1e15,
                            global_batch_size=64, steps_per_epoch=10, total_steps=100,
                            breakdown=preflight._shares({'a': 3, 'b': 1, 'c': 0}, 2))
  lines = report.lines()
  assert lines[-3].startswith('  where the estimated step goes')
  assert lines[-2:] == ['     75.0%   150.00 ms  a', '     25.0%    50.00 ms  b']


def test_the_program_text_comes_from_xla_dump_when_jax_cannot_reread_it():
  """compiled.as_text() fails for some v6e programs; the estimate then reads XLA's dump."""
  setup = preflight._setup(tiny_config('vit'), preflight.tpu_slice('v5e:2x2').devices, 1000,
                           1_281_167)
  compiled, _ = preflight._compile_train(setup, 64)

  class Unreadable:
    def as_text(self):
      raise jax.errors.JaxRuntimeError('INTERNAL: RET_CHECK failure prev_op->IsAsynchronous()')

  text = preflight.hlo_text(Unreadable(),
                            lambda options: preflight._compile_train(setup, 64, options))
  cycles = preflight.op_cycles(text)
  assert cycles == preflight.op_cycles(compiled.as_text())
  assert sum(cycles.values()) > 0

  # The step time alone does not need the text (on v6e, a second compile) unless the cost
  # model returned a negative time that the program's ConcatBitcasts must correct.
  def no_text():
    raise AssertionError('the text was read')

  seconds, flops = preflight._cost(compiled, no_text)
  assert seconds > 0 and flops > 0

  class Negative:
    def cost_analysis(self):
      return {'optimal_seconds': -2.0 + 1e-3, 'flops': 1.0}

  concat, token = ('custom_call_target="ConcatBitcast"', 'custom_call_target="NopReturnToken"')
  assert preflight._cost(Negative(), lambda: f'{concat}\n{token}') == (pytest.approx(1e-3), 1.0)
  with pytest.raises(ValueError, match='could not cost the step'):
    preflight._cost(Negative(), lambda: concat)


def test_bad_topologies_are_refused_in_one_line():
  for bad in ('v4-512', 'v9:2x2', 'v5e:16'):
    with pytest.raises(ValueError, match='GENERATION:AxB'):
      preflight.parse_topology(bad)
  assert preflight.parse_topology('v3:8x8') == (preflight.CHIPS['v3'], 64)
  assert preflight.parse_topology('v4:4x4x4') == (preflight.CHIPS['v4'], 64)


def test_every_paper_variant_names_its_hardware():
  topologies = {config_file: preflight.paper_hardware(os.path.join(ROOT, config_file))
                for config_file, _ in preflight.PAPER_VARIANTS}
  assert topologies == {'configs/mae_pretrain.py': 'v3:8x8',
                        'configs/mae_finetune.py': 'v3:8x8',
                        'configs/linear_probe.py': 'v3:8x8',
                        'configs/vit_scratch.py': 'v3:2x2'}


def test_with_libtpu_installed_the_commands_start_quietly(tmp_path):
  # libtpu, installed for the pre-flight, must not print its TPU start-up errors on a
  # machine without a TPU (vit_jax/platform.py): the demo's commands and a prediction.
  from tests import test_outputs  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / 'tfds')
  _, finetune, printed = test_outputs.run_demo_commands(tmp_path, data_dir)
  predict = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--checkpoint={finetune}',
       f'--images={os.path.join(os.path.dirname(__file__), "..", "docs", "examples")}'],
      env=test_outputs.quiet_env(data_dir), capture_output=True, text=True, timeout=300)
  assert predict.returncode == 0, predict.stderr
  test_outputs.assert_quiet(printed + predict.stdout + predict.stderr)

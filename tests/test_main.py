"""The main job end to end: resume after SIGKILL, SIGTERM, bad input, every config key read.

Runs the demo configs with a tiny model on the built-in data, 8 simulated devices.
"""

import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from vit_jax import checkpoint, metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
TINY_DECODER = dict(decoder_width=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32)


def tiny_flags(data_dir, total_steps=8, mae=True):
  del data_dir  # passed as TFDS_DATA_DIR, see env8
  flags = [f'--config.total_steps={total_steps}',
           '--config.global_batch_size=32', '--config.eval_batch_size=64',
           '--config.data.eval_split=test[:128]', '--config.log_every_steps=1',
           '--config.checkpoint_every_steps=2', '--config.optim.warmup_epochs=0']
  for key, value in (TINY_MODEL | (TINY_DECODER if mae else {})).items():
    flags.append(f'--config.model.{key}={value}')
  return flags


def main_command(config, workdir, flags):
  return [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/{config}',
          f'--workdir={workdir}', *flags]


def env8(data_dir):
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TFDS_DATA_DIR=data_dir,
              XLA_FLAGS='--xla_force_host_platform_device_count=8')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def losses(workdir):
  return {row['step']: row['train/loss'] for row in metrics.read_metrics(workdir)
          if 'train/loss' in row}


def wait_for_step(workdir, step, process, timeout=120):
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline:
    if os.path.exists(path) and max(losses(workdir), default=0) >= step:
      return
    if process.poll() is not None:
      raise AssertionError(f'The run ended early: {process.stdout.read()}')
    time.sleep(0.05)
  raise AssertionError(f'Step {step} was not logged within {timeout}s.')


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
  flags = tiny_flags(data_dir, total_steps=10)
  straight = str(tmp_path / 'straight')
  subprocess.run(main_command('mae_pretrain.py:demo', straight, flags), env=env8(data_dir), check=True,
                 cwd=ROOT, capture_output=True)
  expected = losses(straight)
  assert sorted(expected) == list(range(1, 11))

  interrupted = str(tmp_path / 'interrupted')
  command = main_command('mae_pretrain.py:demo', interrupted, flags)
  # 1. SIGKILL after step 5: at most the checkpoint of step 4 survives.
  process = subprocess.Popen(command, env=env8(data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  wait_for_step(interrupted, 5, process)
  process.kill()
  process.wait()
  # 2. Rerun; SIGTERM after it logged step 7: it saves the step it is at and exits 0.
  process = subprocess.Popen(command, env=env8(data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  wait_for_step(interrupted, 7, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert 'Resumed from' in output
  saved = [int(d) for d in os.listdir(os.path.join(interrupted, 'checkpoints')) if d.isdigit()]
  stopped_at = max(losses(interrupted))
  assert max(saved) == stopped_at and stopped_at < 10
  assert f'SIGTERM: saved step {stopped_at}' in output
  # 3. Rerun to the end: every logged loss equals the uninterrupted run's, bit for bit.
  subprocess.run(command, env=env8(data_dir), check=True, cwd=ROOT, capture_output=True)
  assert losses(interrupted) == expected


def run_in_process(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def demo_config(name, data_dir, total_steps=2):
  module = {'mae_pretrain': 'configs.mae_pretrain', 'mae_finetune': 'configs.mae_finetune',
            'linear_probe': 'configs.linear_probe', 'vit_scratch': 'configs.vit_scratch'}[name]
  sys.path.insert(0, ROOT)
  config = __import__(module, fromlist=['get_config']).get_config('demo')
  config.data.data_dir = data_dir
  config.total_steps = total_steps
  config.optim.warmup_epochs = 0
  config.eval_batch_size = 64
  config.data.eval_split = 'test[:128]'
  config.model.update(TINY_MODEL | (TINY_DECODER if name == 'mae_pretrain' else {}))
  if name == 'mae_pretrain':
    config.reconstructions = 2
  return config


class ReadTracker:
  """Records which keys of a ConfigDict tree are read, by patching ConfigDict access."""

  def __init__(self, config):
    self.config = config
    self.paths = {}
    self._register(config, '')
    self.read = set()
    self.active = True

  def _register(self, node, prefix):
    self.paths[id(node)] = prefix
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        self._register(value, f'{prefix}{key}.')

  def leaves(self):
    def walk(node, prefix):
      for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict) and prefix + key != 'model':
          yield from walk(value, f'{prefix}{key}.')
        else:
          yield prefix + key
    return set(walk(self.config, ''))

  def unread(self) -> list[str]:
    """The leaves nothing read. Reading a parent (`config.data`) reads none of its keys:
    each nested key counts only when it is itself read (`config.data.name`)."""
    return sorted(self.leaves() - self.read)

  def __enter__(self):
    tracker = self
    original_getitem = ml_collections.ConfigDict.__getitem__
    original_get = ml_collections.ConfigDict.get

    def getitem(node, key):
      if tracker.active and id(node) in tracker.paths:
        tracker.read.add(tracker.paths[id(node)] + str(key))
      return original_getitem(node, key)

    def get(node, key, default=None):
      if tracker.active and id(node) in tracker.paths:
        tracker.read.add(tracker.paths[id(node)] + str(key))
      return original_get(node, key, default)

    self._originals = (original_getitem, original_get, train.write_config)

    def write_config(config, workdir):  # serialising the config is not reading it
      tracker.active = False
      try:
        self._originals[2](config, workdir)
      finally:
        tracker.active = True

    ml_collections.ConfigDict.__getitem__ = getitem
    ml_collections.ConfigDict.get = get
    train.write_config = write_config
    return self

  def __exit__(self, *exc):
    (ml_collections.ConfigDict.__getitem__, ml_collections.ConfigDict.get,
     train.write_config) = self._originals


@pytest.mark.slow
def test_every_key_of_every_demo_config_is_read_and_finetuning_loads_the_mae(
    tmp_path, data_dir, monkeypatch):
  unread = {}
  pretrained = tmp_path / 'mae_pretrain'
  monkeypatch.chdir(tmp_path)
  for name in ('mae_pretrain', 'mae_finetune', 'linear_probe', 'vit_scratch'):
    config = demo_config(name, data_dir)
    if name in ('mae_finetune', 'linear_probe'):
      # Relative, as in the README's commands (Orbax found no metadata in one).
      config.init.path = 'mae_pretrain' if name == 'mae_finetune' else str(pretrained)
    with ReadTracker(config) as tracker:
      result = run_in_process(config, tmp_path / name)
    assert result['step'] == 2
    missing = tracker.unread()
    if missing:
      unread[name] = missing
    if name == 'mae_pretrain':
      assert os.path.getsize(pretrained / 'reconstructions.png') > 1000
    else:
      # 128 images of 10 classes: a top-1 of k/128 (chance is about 13 of them).
      assert result['eval/count'] == 128
      assert result['eval/top1'] * 128 == pytest.approx(round(result['eval/top1'] * 128))
      assert result['eval/top5'] >= result['eval/top1'] + 1 / 128  # 5 guesses hit more
  assert not unread, f'Config keys that nothing reads: {unread}'


def test_the_read_tracker_reports_unread_nested_keys():
  """A nested key nothing reads is reported even when its parent was read."""
  config = ml_collections.ConfigDict(dict(data=dict(name='demo', unused=1),
                                          optim=dict(base_lr=0.1), seed=0))
  with ReadTracker(config) as tracker:
    assert (config.data.name, config.seed) == ('demo', 0)
    assert isinstance(config['optim'], ml_collections.ConfigDict)  # the parent alone
  assert tracker.unread() == ['data.unused', 'optim.base_lr']


def test_the_fashion_mnist_holdout_keeps_the_test_set_out_of_choosing():
  from vit_jax import config_utils  # pylint: disable=import-outside-toplevel
  path = f'{ROOT}/configs/fashion_mnist.py'
  for variant in ('mae', 'finetune'):
    held = config_utils.load_config_file(path, f'{variant},holdout=1')
    assert (held.data.train_split, held.data.eval_split) == ('train[:54000]', 'train[54000:]')
    plain = config_utils.load_config_file(path, variant)
    assert (plain.data.train_split, plain.data.eval_split) == ('train', 'test')
  held = config_utils.load_config_file(path, 'finetune,holdout=1')
  assert held.eval_every_steps == 54_000 // held.global_batch_size


def test_non_demo_variants_have_no_keys_the_demo_lacks():
  """The demo runs in the test above; the paper variants must not add unread keys."""
  sys.path.insert(0, ROOT)
  for name in ('mae_pretrain', 'mae_finetune', 'linear_probe', 'vit_scratch'):
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    demo = set(flatten(module.get_config('demo')))
    for arg in ('', 'model=L/16', 'data=cifar10'):
      config = module.get_config(arg)
      extra = {k for k in set(flatten(config)) - demo if not k.startswith('model.')}
      assert not extra, (name, arg, extra)


def flatten(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flatten(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def expect_error_before_compiling(monkeypatch, config, tmp_path, match):
  def no_compile(*args, **kwargs):
    raise AssertionError('build_steps was reached: the error should come before compiling')
  monkeypatch.setattr(train, 'build_steps', no_compile)
  with pytest.raises(ValueError, match=match):
    run_in_process(config, tmp_path)


@pytest.mark.slow
def test_the_main_job_never_imports_tensorflow(tmp_path):
  """Preparing the demo data, training, evaluating and saving: TensorFlow stays out.

  A stand-in `tensorflow` package first on the path records any import of it, even one
  that a library would catch and recover from.
  """
  fake = tmp_path / 'fake' / 'tensorflow'
  fake.mkdir(parents=True)
  marker = tmp_path / 'tensorflow_was_imported'
  (fake / '__init__.py').write_text(
      f'import traceback\nopen({str(marker)!r}, "w").write("".join(traceback.format_stack()))\n'
      'raise ImportError("stand-in tensorflow of test_main.py")\n')
  env = env8(str(tmp_path / 'tfds'))  # empty: the demo dataset is prepared in this run
  env['PYTHONPATH'] = os.pathsep.join([str(fake.parent), ROOT])
  result = subprocess.run(
      main_command('mae_pretrain.py:demo', tmp_path / 'run', tiny_flags(None, total_steps=2)),
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(losses(tmp_path / 'run')) == 2
  assert not marker.exists(), f'TensorFlow was imported from:\n{marker.read_text()}'


def test_bad_input_is_refused_before_compiling(monkeypatch, tmp_path, data_dir):
  config = demo_config('vit_scratch', data_dir)
  config.model_name = 'ViT-Q/4'
  expect_error_before_compiling(monkeypatch, config, tmp_path, r"Unknown model name 'ViT-Q/4'")
  config = demo_config('vit_scratch', data_dir)
  config.model.patch_size = 5
  expect_error_before_compiling(monkeypatch, config, tmp_path,
                                'image size 28x28 is not divisible by the patch size 5')
  config = demo_config('vit_scratch', data_dir)
  config.global_batch_size = 36
  expect_error_before_compiling(monkeypatch, config, tmp_path,
                                'global_batch_size=36 is not divisible by the 8 devices')
  config = demo_config('vit_scratch', data_dir)
  config.data.name = 'no_such_dataset'
  expect_error_before_compiling(monkeypatch, config, tmp_path,
                                r"no_such_dataset.*scripts/prepare_dataset.py")
  config = demo_config('vit_scratch', data_dir)
  config.objective = 'contrastive'
  expect_error_before_compiling(monkeypatch, config, tmp_path, "Unknown objective 'contrastive'")


def test_a_checkpoint_that_does_not_fit_is_named(tmp_path, data_dir):
  source = demo_config('vit_scratch', data_dir, total_steps=1)
  run_in_process(source, tmp_path / 'source')
  config = demo_config('mae_finetune', data_dir)
  config.model.width = 48  # another model size
  config.model.num_heads = 2
  config.init.path = str(tmp_path / 'source')
  with pytest.raises(ValueError, match=r'embedding/kernel.*\(4, 4, 1, 32\).*\(4, 4, 1, 48\)|'
                     r'embedding/kernel.*\(4, 4, 1, 48\).*\(4, 4, 1, 32\)'):
    run_in_process(config, tmp_path / 'target')


def test_command_line_errors_are_one_line(tmp_path, data_dir):
  result = subprocess.run(
      main_command('vit_scratch.py:demo', str(tmp_path), ['--config.no_such_key=1']),
      env=env8(data_dir), cwd=ROOT, capture_output=True, text=True)
  assert result.returncode != 0
  assert 'no_such_key' in result.stderr
  result = subprocess.run(
      main_command('vit_scratch.py:demo', str(tmp_path),
                   ['--config.global_batch_size=12']),
      env=env8(data_dir), cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'Error: global_batch_size=12 is not divisible by the 8 devices of the mesh '
      '(1 process(es)); use a multiple of 8.')


def test_a_resumed_run_does_not_read_init_path_again(tmp_path, data_dir, monkeypatch, capsys):
  """A restart after each preemption would otherwise read the whole pretrained checkpoint."""
  source = demo_config('vit_scratch', data_dir, total_steps=1)
  run_in_process(source, tmp_path / 'source')
  reads = []
  check = checkpoint.check_initial_params
  monkeypatch.setattr(checkpoint, 'check_initial_params',
                      lambda *a, **k: reads.append(a) or check(*a, **k))
  config = demo_config('vit_scratch', data_dir, total_steps=2)
  config.checkpoint_every_steps = 2
  config.init.path = str(tmp_path / 'source')
  first = run_in_process(config, tmp_path / 'target')
  assert len(reads) == 1 and first['step'] == 2
  config.total_steps = 4  # the same run, longer: it resumes from step 2
  second = run_in_process(config, tmp_path / 'target')
  assert f"Resumed from {tmp_path / 'target'}/checkpoints/2." in capsys.readouterr().out
  assert len(reads) == 1 and second['step'] == 4

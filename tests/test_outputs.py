"""What a user reads of a run: a quiet start, and TensorBoard holding every metric.

The demo's two commands (MAE pretraining, then fine-tuning from its workdir) run as a new
user runs them: as processes, the built-in data prepared on first use, JAX's platforms
not chosen (tests/test_preflight.py runs the same with libtpu installed). Nothing they
print may look like a fault; TensorBoard's own reader must find in the event files
every scalar of metrics.jsonl, at the same steps, and the MAE reconstructions.
"""

import os
import re
import subprocess

import numpy as np
import pytest

from tests.test_main import ROOT, env8, main_command, tiny_flags
from vit_jax import metrics

# Lines that read as a fault, whatever their source (absl, Python warnings, TFDS, libtpu).
ALARMING = re.compile(r'warn|error|fail|downloading|traceback|source location|TPU_WORKER|'
                      r'could not|deprecat', re.I)


def quiet_env(data_dir):
  env = env8(data_dir)
  del env['JAX_PLATFORMS']  # as a user starts it: JAX picks its platforms
  return env


def run_demo_commands(tmp_path, data_dir) -> tuple[str, str, str]:
  """(pretraining workdir, fine-tuning workdir, everything both printed)."""
  env = quiet_env(data_dir)
  mae, finetune = str(tmp_path / 'mae'), str(tmp_path / 'finetune')
  flags = tiny_flags(data_dir, total_steps=4) + ['--config.reconstructions=2']
  printed = []
  for command in (main_command('mae_pretrain.py:demo', mae, flags),
                  main_command('mae_finetune.py:demo', finetune,
                               tiny_flags(data_dir, total_steps=4, mae=False)
                               + [f'--config.init.path={mae}'])):
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    printed += [result.stdout, result.stderr]
  return mae, finetune, ''.join(printed)


def assert_quiet(printed: str) -> None:
  alarming = [line for line in printed.splitlines() if ALARMING.search(line)]
  assert not alarming, '\n'.join(alarming)


def tensorboard_events(workdir):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard'), size_guidance={'scalars': 0, 'images': 0})
  events.Reload()
  return events


def assert_tensorboard_holds_the_metrics(workdir) -> None:
  events = tensorboard_events(workdir)
  expected = {}
  for row in metrics.read_metrics(workdir):
    for name, value in row.items():
      if name != 'step':
        expected.setdefault(name, {})[row['step']] = value
  assert set(events.Tags()['scalars']) == set(expected)
  for name, values in expected.items():
    seen = {event.step: event.value for event in events.Scalars(name)}
    assert sorted(seen) == sorted(values), name
    np.testing.assert_allclose([seen[s] for s in sorted(seen)],
                               [values[s] for s in sorted(values)], rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_the_demo_starts_quietly_and_tensorboard_sees_everything(tmp_path, data_dir):
  mae, finetune, printed = run_demo_commands(tmp_path, data_dir)
  assert 'Preparing the built-in fashion_mnist_t10k' in printed  # it did prepare the data
  assert 'Initialised from' in printed
  assert_quiet(printed)
  for workdir in (mae, finetune):
    assert_tensorboard_holds_the_metrics(workdir)
  events = tensorboard_events(mae)
  assert events.Tags()['images'] == ['mae/reconstructions']
  [image] = events.Images('mae/reconstructions')
  assert image.step == 4
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(os.path.join(mae, 'reconstructions.png')) as png:
    assert (image.width, image.height) == png.size


@pytest.fixture
def data_dir(tmp_path):
  return str(tmp_path / 'tfds')  # empty: the built-in data is prepared as on a new machine


@pytest.mark.slow
def test_training_on_an_image_folder_starts_quietly(tmp_path, data_dir):
  from tests.test_faults import white_glyph_icons  # pylint: disable=import-outside-toplevel
  from vit_jax.data import datasets  # pylint: disable=import-outside-toplevel
  white_glyph_icons(tmp_path / 'icons', per_class=16, seed=0)
  datasets.prepare('image_folder', data_dir, source_dir=str(tmp_path / 'icons'))
  flags = tiny_flags(data_dir, total_steps=2, mae=False) + [
      '--config.data.name=image_folder', f'--config.data.source_dir={tmp_path / "icons"}',
      '--config.data.eval_split=test', '--config.model.channels=3',
      '--config.model.image_size=32', '--config.global_batch_size=16']
  result = subprocess.run(main_command('vit_scratch.py:demo', str(tmp_path / 'run'), flags),
                          env=quiet_env(data_dir), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'eval/top1' in result.stdout
  assert_quiet(result.stdout + result.stderr)

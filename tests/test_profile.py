"""config.profile_steps: a jax.profiler trace of chosen steps, for TensorBoard's profiler."""

import glob
import os
import subprocess

import pytest

from tests.test_main import env8, main_command, tiny_flags


def test_a_profile_of_the_chosen_steps_is_written_to_the_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  flags = tiny_flags(None, total_steps=4, mae=False) + ['--config.profile_steps=(2, 3)']
  result = subprocess.run(main_command('vit_scratch.py:demo', workdir, flags),
                          env=env8(str(tmp_path / 'tfds')), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # Where TensorBoard's profile plugin looks: <logdir>/plugins/profile/<run>/<host>.xplane.pb
  traces = glob.glob(os.path.join(workdir, 'tensorboard', 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1, traces
  with open(traces[0], 'rb') as f:
    trace = f.read()
  assert b'train_step' in trace  # the jitted step ran while the trace was on


@pytest.mark.parametrize('steps', ['(3, 2)', '(0, 1)', '(1, 2, 3)'])
def test_bad_profile_steps_are_refused(tmp_path, steps):
  from vit_jax import config_utils, train  # pylint: disable=import-outside-toplevel
  config = config_utils.base_config()
  config.profile_steps = eval(steps)  # pylint: disable=eval-used
  with pytest.raises(ValueError, match='profile_steps'):
    train.check_loop_keys(config)

"""What a command starts JAX with: one CPU device per core unless the user chose."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_main import ROOT, losses, main_command, tiny_flags
from vit_jax import platform


@pytest.mark.parametrize('cores, devices', [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8),
                                            (96, 64), (0, 1)])
def test_the_cpu_device_count_is_the_largest_power_of_two_within_the_cores(cores, devices):
  assert platform.cpu_device_count(cores) == devices


def env_without_a_device_count(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  return env | {'JAX_PLATFORMS': 'cpu'} | extra


def devices_at_start(env) -> tuple[str, int]:
  """(what use_every_cpu_core returned, jax.device_count()) in a fresh process."""
  code = ('from vit_jax import platform; set_to = platform.use_every_cpu_core(); '
          'import jax; print(set_to, jax.device_count())')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                       text=True, check=True, timeout=120).stdout.split()
  return out[0], int(out[1])


def test_every_core_gets_a_device_unless_the_user_chose_a_count():
  cores = len(os.sched_getaffinity(0))
  expected = platform.cpu_device_count(cores)
  assert devices_at_start(env_without_a_device_count()) == (str(expected), expected)
  # The user's choice stands: JAX's option, or XLA's flag.
  assert devices_at_start(env_without_a_device_count(JAX_NUM_CPU_DEVICES='3')) == ('None', 3)
  assert devices_at_start(env_without_a_device_count(
      XLA_FLAGS='--xla_force_host_platform_device_count=5')) == ('None', 5)


def test_a_run_on_one_cpu_device_and_on_two_gives_the_same_losses(tmp_path):
  results = {}
  for devices in (1, 2):
    workdir = tmp_path / f'devices{devices}'
    env = env_without_a_device_count(JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED='1',
                                     TFDS_DATA_DIR=str(tmp_path / 'tfds'))
    command = main_command('vit_scratch.py:demo', workdir,
                           tiny_flags(None, total_steps=6, mae=False))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'on {devices} cpu device(s)' in result.stdout
    results[devices] = losses(workdir)
  assert sorted(results[1]) == list(range(1, 7))
  # The same batches and updates; only the order of the gradient sums differs.
  np.testing.assert_allclose([results[2][s] for s in range(1, 7)],
                             [results[1][s] for s in range(1, 7)], rtol=1e-5)

"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must come after the environment is set)
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line('markers', 'multiprocess: starts several JAX processes (slower)')
  config.addinivalue_line('markers', 'slow: end-to-end runs of the main job')


@pytest.fixture(scope='session')
def num_devices():
  return jax.device_count()

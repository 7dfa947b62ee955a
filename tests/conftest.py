"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere, and one
XLA compilation cache for the whole run.

The cache is new for every run of the suite (nothing is carried over from an earlier run)
and shared by the pytest-xdist workers and by every process the tests start: the same tiny
models are compiled again and again by the end-to-end tests (an uninterrupted run, then the
interrupted one and its resumes), and a compile is most of their time.
"""

import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Made by the first process to read this file (pytest's, before it starts the workers,
# which inherit it) and removed by that process at the end.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vit_jax_tests_xla_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402  (must come after the environment is set)
import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line('markers', 'multiprocess: starts several JAX processes (slower)')
  config.addinivalue_line('markers', 'slow: end-to-end runs of the main job')


@pytest.fixture(scope='session')
def num_devices():
  return jax.device_count()

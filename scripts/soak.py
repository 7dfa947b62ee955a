r"""A long run stays flat: memory, open files, checkpoints and disk over a soak of the demo.

  python scripts/soak.py --workdir=runs/soak [--minutes=30 --kill_at=0.5 --sample_seconds=10]

Runs the demo's MAE pretraining (configs/mae_pretrain.py:demo, with epochs enough to
outlast the soak) with frequent checkpoints (every 100 steps, 3 kept), evaluations (every
200 steps) and a log line every 10 steps. At `kill_at` of the time (or at the first
checkpoint, if that comes later) it SIGKILLs the run and starts the same command again,
which resumes; at the end it sends SIGTERM (a preemption: save and exit). Every
`sample_seconds` it records the training process's resident memory, its open file
descriptors (Linux /proc), the checkpoints on disk and the workdir's size. Writes
WORKDIR/soak.csv, soak.json (the checks below) and soak.png, and exits 1 if a check fails:
  * memory: the highest per-minute peak of the resident set in the last third of the
    soak is at most 5% above the highest in the first third (the resident set swings by
    hundreds of MiB within a minute as batches and checkpoints come and go, so single
    samples are not compared; the slope of the per-minute peaks over the second half of
    each process's life is reported, not checked: over minutes it mostly shows the
    allocator settling after a start);
  * open files: the last count of each process is at most 10 above its count at the first
    sample after its first checkpoint;
  * checkpoints: never more than keep_checkpoints (3) step folders plus one being written;
  * disk: the workdir's size at the end is at most 1.5x its size at the middle;
  * metrics.jsonl: every logged step exactly once, no gap and no duplicate across the kill.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_EVERY, EVAL_EVERY, KEEP = 10, 200, 3

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the soaked run (made new).')
_MINUTES = flags.DEFINE_float('minutes', 30.0, 'Length of the soak.')
_KILL_AT = flags.DEFINE_float('kill_at', 0.5, 'Fraction of the soak at which to SIGKILL.')
_SAMPLE = flags.DEFINE_float('sample_seconds', 10.0, 'Seconds between samples.')
_CHECKPOINT_EVERY = flags.DEFINE_integer('checkpoint_every_steps', 100,
                                         'Steps between checkpoints.')
_REPORT = flags.DEFINE_bool('report', False, 'Only recompute soak.json and soak.png from '
                            'WORKDIR/soak.csv and metrics.jsonl.')


def command(workdir: str) -> list[str]:
  return [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/mae_pretrain.py:demo',
          f'--workdir={workdir}', '--config.num_epochs=10000',
          f'--config.log_every_steps={LOG_EVERY}',
          f'--config.checkpoint_every_steps={_CHECKPOINT_EVERY.value}',
          f'--config.eval_every_steps={EVAL_EVERY}', f'--config.keep_checkpoints={KEEP}']


def resident_mib(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def open_files(pid: int) -> int:
  return len(os.listdir(f'/proc/{pid}/fd'))


def checkpoints(workdir: str) -> int:
  folder = os.path.join(workdir, 'checkpoints')
  return sum(name.split('.')[0].isdigit() for name in os.listdir(folder)) if os.path.isdir(
      folder) else 0


def saved(workdir: str) -> bool:
  """Whether a checkpoint is complete (Orbax renames a step's folder to its number last):
  checkpoint.has_saved_steps's test, without importing JAX into the monitor."""
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def size_mib(path: str) -> float:
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # removed while we walked (a checkpoint being replaced)
        pass
  return total / 2**20


def logged_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row['step'] for row in map(json.loads, f) if 'train/loss' in row]


def start(workdir: str, log):
  return subprocess.Popen(command(workdir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))


def growth_per_hour(times, values) -> float:
  """Slope, per hour, of a least-squares line through the per-minute peaks of the second
  half of (seconds, MiB)."""
  times, values = np.array(times), np.array(values)
  keep = times >= times[0] + (times[-1] - times[0]) / 2
  minutes = np.floor(times[keep] / 60)
  peaks = [(m * 60 + 30, values[keep][minutes == m].max()) for m in np.unique(minutes)]
  if len(peaks) < 3:
    return float('nan')
  slope = np.polyfit(*zip(*peaks), 1)[0]
  return float(slope * 3600)


def plot(rows, kill_time, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  minutes = [r['seconds'] / 60 for r in rows]
  figure, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
  for ax, key, label in zip(axes, ('rss_mib', 'open_files', 'workdir_mib'),
                            ('resident memory (MiB)', 'open file descriptors', 'workdir (MiB)')):
    for process in sorted({r['process'] for r in rows}):
      mine = [(m, r[key]) for m, r in zip(minutes, rows) if r['process'] == process]
      ax.plot(*zip(*mine), marker='.', label=f'process {process + 1}')
    ax.axvline(kill_time / 60, color='red', linestyle='--', linewidth=1)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(title='SIGKILL at the dashed line, then the same command', loc='lower right',
                 fontsize=8, title_fontsize=8)
  axes[-1].set_xlabel('minutes')
  figure.suptitle('Soak of configs/mae_pretrain.py:demo (checkpoint every 100 steps, '
                  'eval every 200)', fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  kill_time = _KILL_AT.value * _MINUTES.value * 60
  if _REPORT.value:
    with open(os.path.join(workdir, 'soak.csv')) as f:
      rows = [{k: (float(v) if '.' in v else int(v)) for k, v in row.items()}
              for row in csv.DictReader(f)]
    rows = [r for r in rows if r['rss_mib'] > 50]
    with open(os.path.join(workdir, 'soak.json')) as f:
      summary = json.load(f)
    return report(workdir, rows, summary['killed_at_seconds'], summary['exit_code_after_sigterm'])
  if os.path.exists(workdir):
    raise app.UsageError(f'--workdir={workdir} exists: the soak starts from nothing.')
  os.makedirs(workdir)
  log = open(os.path.join(workdir, 'soak_log.txt'), 'w')
  length = _MINUTES.value * 60
  began = time.time()
  process, process_index, killed, rows = start(workdir, log), 0, False, []
  while (now := time.time() - began) < length:
    if process.poll() is not None:
      raise SystemExit(f'The run ended by itself (exit code {process.returncode}); see '
                       f'{workdir}/soak_log.txt.')
    # The kill comes once the run has a checkpoint to resume from: on a slow or busy
    # machine the first one can come after kill_time (a first-time data preparation, a
    # compile sharing the cores).
    if not killed and now >= kill_time and saved(workdir):
      process.kill()
      process.wait()
      killed, kill_time = True, now
      process, process_index = start(workdir, log), process_index + 1
      continue
    try:
      rss = resident_mib(process.pid)
      if not rss > 50:  # a process that has only just started: no Python, no JAX yet
        raise FileNotFoundError
      rows.append({'seconds': round(now, 1), 'process': process_index,
                   'rss_mib': round(rss, 1),
                   'open_files': open_files(process.pid), 'checkpoints': checkpoints(workdir),
                   'workdir_mib': round(size_mib(workdir), 2),
                   'last_step': max(logged_steps(workdir), default=0)
                   if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else 0})
      print(' '.join(f'{k}={v}' for k, v in rows[-1].items()), flush=True)
    except (FileNotFoundError, ProcessLookupError):
      pass
    time.sleep(max(0.0, _SAMPLE.value - (time.time() - began - now)))
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=300)
  log.close()
  with open(os.path.join(workdir, 'soak.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return report(workdir, rows, kill_time, process.returncode)


def peak(rows, low: float, high: float) -> float:
  """The highest resident set sampled between `low` and `high` seconds."""
  return max(r['rss_mib'] for r in rows if low <= r['seconds'] < high)


def report(workdir: str, rows, kill_time: float, exit_code: int) -> int:
  """Checks the samples, writes soak.json and soak.png; 1 if a check fails."""
  steps = logged_steps(workdir)
  length = rows[-1]['seconds']
  middle = [r for r in rows if r['seconds'] <= kill_time][-1]
  checks = {}
  for index in sorted({r["process"] for r in rows}):
    mine = [r for r in rows if r['process'] == index]
    growth = growth_per_hour([r['seconds'] for r in mine], [r['rss_mib'] for r in mine])
    after_checkpoint = [r for r in mine if r['checkpoints'] > 0] or mine
    checks[f'process {int(index) + 1}'] = {
        'samples': len(mine), 'rss_mib_first': mine[0]['rss_mib'],
        'rss_mib_max': max(r['rss_mib'] for r in mine), 'rss_mib_last': mine[-1]['rss_mib'],
        'rss_growth_mib_per_hour_second_half': round(growth, 1),
        'open_files_after_first_checkpoint': after_checkpoint[0]['open_files'],
        'open_files_last': mine[-1]['open_files']}
  expected = list(range(LOG_EVERY, steps[-1] + 1, LOG_EVERY))
  summary = {
      'command': ' '.join(command('WORKDIR')), 'minutes': _MINUTES.value,
      'killed_at_seconds': round(kill_time, 1), 'exit_code_after_sigterm': exit_code,
      'rss_mib_peak_first_third': peak(rows, 0, length / 3),
      'rss_mib_peak_last_third': peak(rows, 2 * length / 3, length + 1),
      'processes': checks, 'checkpoints_max': max(r['checkpoints'] for r in rows),
      'workdir_mib_middle': middle['workdir_mib'], 'workdir_mib_last': rows[-1]['workdir_mib'],
      'last_step': steps[-1], 'logged_steps': len(steps),
      'duplicates': len(steps) - len(set(steps)),
      'gaps': len(set(expected) - set(steps))}
  failures = []
  if summary['rss_mib_peak_last_third'] > 1.05 * summary['rss_mib_peak_first_third']:
    failures.append(f'resident memory peaks {summary["rss_mib_peak_first_third"]} MiB in the '
                    f'first third, {summary["rss_mib_peak_last_third"]} in the last')
  for name, numbers in checks.items():
    if numbers['open_files_last'] > numbers['open_files_after_first_checkpoint'] + 10:
      failures.append(f'{name}: open files {numbers["open_files_after_first_checkpoint"]} -> '
                      f'{numbers["open_files_last"]}')
  if summary['checkpoints_max'] > KEEP + 1:
    failures.append(f'{summary["checkpoints_max"]} checkpoints on disk, {KEEP} kept')
  if summary['workdir_mib_last'] > 1.5 * summary['workdir_mib_middle']:
    failures.append(f'workdir {summary["workdir_mib_middle"]} -> {summary["workdir_mib_last"]} MiB')
  if summary['duplicates'] or summary['gaps'] or steps != sorted(steps):
    failures.append(f'metrics.jsonl: {summary["duplicates"]} duplicate and {summary["gaps"]} '
                    'missing steps')
  if exit_code != 0:
    failures.append(f'SIGTERM at the end gave exit code {exit_code}, not 0')
  summary['failures'] = failures
  with open(os.path.join(workdir, 'soak.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(rows, kill_time, os.path.join(workdir, 'soak.png'))
  print(json.dumps(summary, indent=1))
  print('Soak: ' + ('every check holds.' if not failures else 'FAILED: ' + '; '.join(failures)))
  return 1 if failures else 0


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)

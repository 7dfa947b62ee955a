"""From finished runs to committed results: training hours (vit_jax.metrics),
scripts/headline_curve.py, and the committed study folders rebuilt by their commands."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def test_headline_curve_puts_fine_tuning_after_the_pretraining_hours(tmp_path):
  # Pretraining: 3,600 steps of 1 s = 1 h; fine-tuning: 200 steps of 9 s = 0.5 h.
  _write(tmp_path / 'pre', [{'step': s, 'train/loss': 1.0, 'perf/step_time': 1.0}
                            for s in range(900, 3601, 900)])
  _write(tmp_path / 'ft', [{'step': 100, 'train/loss': 1.0, 'perf/step_time': 9.0},
                           {'step': 100, 'eval/top1': 0.91},
                           {'step': 200, 'train/loss': 0.5, 'perf/step_time': 9.0},
                           {'step': 200, 'eval/top1': 0.935}])
  (tmp_path / 'ft' / 'config.json').write_text(
      json.dumps({'init': {'path': str(tmp_path / 'pre')}}))
  # A fine-tuning of the checkpoint at step 1,800: after half an hour of pretraining.
  _write(tmp_path / 'early', [{'step': 100, 'train/loss': 1.0, 'perf/step_time': 9.0},
                              {'step': 100, 'eval/top1': 0.90}])
  (tmp_path / 'early' / 'config.json').write_text(json.dumps(
      {'init': {'path': str(tmp_path / 'pre' / 'checkpoints' / '1800')}}))
  checkpoints = tmp_path / 'checkpoints.json'
  checkpoints.write_text(json.dumps({'knn_k': 20, 'rows': [
      {'step': 1800, 'train_hours': 0.5, 'eval/knn_top1': 0.84},
      {'step': 3600, 'train_hours': 1.0, 'eval/knn_top1': 0.86}]}))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, f'{ROOT}/scripts/headline_curve.py', f'--pretrain={tmp_path / "pre"}',
       f'--checkpoints={checkpoints}', f'--finetune={tmp_path / "ft"},{tmp_path / "early"}',
       '--target=0.94', f'--output_dir={out}'],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((out / 'curve.json').read_text())
  assert summary['pretrain_hours'] == pytest.approx(1.0)
  curve = summary['finetune'][str(tmp_path / 'ft')]
  assert [p['hours'] for p in curve] == pytest.approx([1.25, 1.5])
  assert [p['hours'] for p in summary['finetune'][str(tmp_path / 'early')]] == pytest.approx(
      [0.75])
  assert summary['best']['top1'] == 0.935 and summary['best']['hours'] == pytest.approx(1.5)
  assert summary['reached_target'] is False
  assert 'Best top-1 93.50% at 1.50 h (1.00 h of pretraining); target 94.0% not reached.' in (
      result.stdout)
  assert (out / 'curve.png').stat().st_size > 10_000


def test_headline_curve_says_what_another_doubling_of_the_fine_tuning_gives(tmp_path):
  _write(tmp_path / 'pre', [{'step': s, 'train/loss': 1.0, 'perf/step_time': 1.0}
                            for s in (900, 1800)])
  finals = {'a': (10, 0.90), 'b': (10, 0.91), 'c': (20, 0.93), 'd': (20, 0.935),
            'e': (None, 0.99)}  # 'e': no budget in its config, left out of the trend
  for name, (epochs, top1) in finals.items():
    _write(tmp_path / name, [{'step': 100, 'train/loss': 1.0, 'perf/step_time': 1.0},
                             {'step': 100, 'eval/top1': top1 - 0.05},
                             {'step': 200, 'train/loss': 1.0, 'perf/step_time': 1.0},
                             {'step': 200, 'eval/top1': top1}])
    (tmp_path / name / 'config.json').write_text(json.dumps(
        {'init': {'path': str(tmp_path / 'pre')}, 'num_epochs': epochs}))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, f'{ROOT}/scripts/headline_curve.py', f'--pretrain={tmp_path / "pre"}',
       '--finetune=' + ','.join(str(tmp_path / n) for n in finals), f'--output_dir={out}'],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  trend = json.loads((out / 'curve.json').read_text())['doubling']
  # Means 90.5% at 10 epochs and 93.25% at 20: +2.75 points a doubling, 96% at 40.
  assert [(b['epochs'], b['runs']) for b in trend['budgets']] == [(10, 2), (20, 2)]
  assert [b['mean_top1'] for b in trend['budgets']] == pytest.approx([0.905, 0.9325])
  assert trend['gain_per_doubling'] == pytest.approx(0.0275)
  assert (trend['next_epochs'], trend['projected_top1']) == (40, pytest.approx(0.96))
  assert ('10 epochs 90.50% (2 runs), 20 epochs 93.25% (2 runs); +2.75 points a doubling, so '
          '40 epochs would give about 96.00%') in result.stdout
  # Three budgets on a straight line in log2(epochs) give its slope.
  from vit_jax.sweep import fits  # pylint: disable=import-outside-toplevel
  line = fits.doubling({5: [0.80], 10: [0.82, 0.82], 20: [0.84]})
  assert line['gain_per_doubling'] == pytest.approx(0.02)
  assert line['projected_top1'] == pytest.approx(0.86)
  assert fits.doubling({20: [0.9]}) is None


def test_training_hours_leave_out_the_evaluations(monkeypatch):
  from vit_jax import metrics  # pylint: disable=import-outside-toplevel
  clock = iter([0.0, 50.0, 130.0])  # start, the log at step 100, the log at step 200
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  progress = metrics.Progress(total_steps=200, global_batch_size=10, flops_per_step=1.0,
                              peak_flops=1.0, start_step=0)
  first = progress.measure(100)
  progress.exclude(80.0 - 50.0)  # a 30 s evaluation after step 100
  second = progress.measure(200)
  assert first['perf/step_time'] == pytest.approx(0.5)
  assert second['perf/step_time'] == pytest.approx(0.5)  # not 0.8
  rows = [{'step': 100, 'train/loss': 1.0, **first}, {'step': 100, 'eval/top1': 0.5},
          {'step': 200, 'train/loss': 1.0, **second}]
  logged = metrics.training_seconds(rows)
  assert logged == [(0, 0.0), (100, pytest.approx(50.0)), (200, pytest.approx(100.0))]
  assert metrics.seconds_at(logged, 150) == pytest.approx(75.0)


def _kept_studies():
  """The committed study folders that --results keeps (docs/results/NAME/runs/), each with
  its sweep file."""
  results = os.path.join(ROOT, 'docs', 'results')
  return sorted(name for name in os.listdir(results)
                if os.path.isdir(os.path.join(results, name, 'runs'))
                and os.path.exists(os.path.join(ROOT, 'configs', 'sweeps', f'{name}.py')))


@pytest.fixture(scope='module')
def full_fashion_mnist(tmp_path_factory):
  from vit_jax.data import builders, datasets  # pylint: disable=import-outside-toplevel
  if not os.path.exists(builders.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip('needs apt-get install dataset-fashion-mnist (the studies count their steps '
                'on the full Fashion-MNIST)')
  data_dir = tmp_path_factory.mktemp('tfds')
  datasets.prepare('fashion_mnist', str(data_dir))
  return data_dir


@pytest.mark.parametrize('name', _kept_studies())
def test_a_committed_study_is_rebuilt_exactly_by_its_command(name, tmp_path,
                                                            full_fashion_mnist):
  """docs/results/NAME's report, rebuilt on a fresh clone by the command it names with
  --report (no workdir, no runs here), is the committed one byte for byte."""
  committed = os.path.join(ROOT, 'docs', 'results', name)
  os.symlink(os.path.join(ROOT, 'configs'), tmp_path / 'configs')
  (tmp_path / 'docs' / 'results').mkdir(parents=True)
  copy = tmp_path / 'docs' / 'results' / name
  # What the sweep does not write: the kept runs, the steps alone, any notes beside them.
  shutil.copytree(committed, copy, ignore=lambda _, names: [
      n for n in names if n in ('results.md', 'results.csv') or n.endswith('.png')])
  with open(os.path.join(committed, 'results.md')) as f:
    command = next(line.strip() for line in f if line.startswith('python -m vit_jax.sweep'))
  assert f'--results=docs/results/{name}' in command
  result = subprocess.run(
      [sys.executable, *command.split()[1:], '--report'], cwd=tmp_path, capture_output=True,
      text=True, check=False, timeout=600,
      env={**os.environ, 'TFDS_DATA_DIR': str(full_fashion_mnist),
           'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')})
  assert result.returncode == 0, result.stderr[-3000:]
  for table in ('results.md', 'results.csv'):
    with open(os.path.join(committed, table)) as f:
      assert (copy / table).read_text() == f.read(), table
  written = {os.path.relpath(os.path.join(d, f), copy)
             for d, _, files in os.walk(copy) for f in files}
  kept = {os.path.relpath(os.path.join(d, f), committed)
          for d, _, files in os.walk(committed) for f in files}
  assert written == kept  # the tables and every plot written, nothing new

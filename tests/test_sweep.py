"""Sweeps: grid expansion and names, stages, skipping and resuming, the report, the
power-law fit, the cluster launch lines, bad sweep files, and one real sweep end to end."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from vit_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MAE = f'{ROOT}/configs/mae_pretrain.py:demo'
DEMO_FT = f'{ROOT}/configs/mae_finetune.py:demo'


def test_product_and_zip_expand_in_order():
  grid = sweep.product(sweep.zipped({'model.width': [32, 64], 'model.depth': [1, 2]}),
                       {'seed': [0, 1]})
  assert grid == [{'model.width': 32, 'model.depth': 1, 'seed': 0},
                  {'model.width': 32, 'model.depth': 1, 'seed': 1},
                  {'model.width': 64, 'model.depth': 2, 'seed': 0},
                  {'model.width': 64, 'model.depth': 2, 'seed': 1}]
  assert len(sweep.product({'a': [1, 2, 3], 'b': [4, 5]})) == 6
  with pytest.raises(ValueError, match='different lengths'):
    sweep.zipped({'a': [1, 2], 'b': [1]})
  with pytest.raises(ValueError, match="'a' must be a list"):
    sweep.product({'a': 0.5})


def test_member_names_are_readable_stable_and_filesystem_safe(tmp_path):
  stage = sweep.Stage('pretrain', DEMO_MAE, grid=sweep.product(
      {'model_name': ['MAE-mu/4'], 'model.mask_ratio': [0.75, 0.9], 'data.crop_scale': [(0.2, 1.0)],
       'seed': [1]}))
  names = [m.name for m in sweep.expand(sweep.Sweep([stage]), str(tmp_path))]
  assert names == ['model_name=MAE-mu_4,mask_ratio=0.75,crop_scale=0.2_1,seed=1',
                   'model_name=MAE-mu_4,mask_ratio=0.9,crop_scale=0.2_1,seed=1']
  # The same key's last part under two parents: the full keys tell them apart.
  assert sweep.key_labels(['model.width', 'data.width', 'seed']) == {
      'model.width': 'model.width', 'data.width': 'data.width', 'seed': 'seed'}
  single = sweep.expand(sweep.Sweep([sweep.Stage('only', DEMO_MAE)]), str(tmp_path))
  assert [m.workdir for m in single] == [str(tmp_path / 'only' / 'base')]


def test_stages_start_from_their_siblings_and_inherit_the_seed(tmp_path):
  pretrain = sweep.Stage('pretrain', DEMO_MAE, grid=sweep.product(
      {'model.mask_ratio': [0.5, 0.75], 'seed': [0, 1]}))
  finetune = sweep.Stage('finetune', DEMO_FT, grid=sweep.product({'optim.base_lr': [1e-3]}),
                         init_from='pretrain')
  members = sweep.expand(sweep.Sweep([pretrain, finetune]), str(tmp_path))
  assert [m.stage.name for m in members] == ['pretrain'] * 4 + ['finetune'] * 4
  child = members[5]
  assert child.parent is members[1]
  assert child.name == 'mask_ratio=0.5,seed=1,base_lr=0.001'
  assert child.overrides == {'optim.base_lr': 1e-3, 'seed': 1,
                             'init.path': str(tmp_path / 'pretrain' / 'mask_ratio=0.5,seed=1')}
  assert 'model.mask_ratio' not in child.overrides  # a pretraining key, not the classifier's
  assert child.command()[:5] == ['python', '-m', 'vit_jax.main', f'--config={DEMO_FT}',
                                 f'--workdir={child.workdir}']
  assert '--config.optim.base_lr=0.001' in child.command()


def test_a_stage_may_start_from_some_of_its_parents_only(tmp_path):
  pretrain = sweep.Stage('pretrain', DEMO_MAE, grid=sweep.product(
      {'model.mask_ratio': [0.25, 0.5, 0.75], 'seed': [0, 1]}))
  finetune = sweep.Stage('finetune', DEMO_FT, init_from='pretrain',
                         parents={'model.mask_ratio': [0.25, 0.75]})
  probe = sweep.Stage('probe', DEMO_FT, init_from='pretrain',
                      parents={'model.mask_ratio': 0.75, 'seed': 1.0})
  members = sweep.expand(sweep.Sweep([pretrain, finetune, probe]), str(tmp_path))
  assert [m.name for m in members if m.stage.name == 'finetune'] == [
      'mask_ratio=0.25,seed=0', 'mask_ratio=0.25,seed=1', 'mask_ratio=0.75,seed=0',
      'mask_ratio=0.75,seed=1']
  assert [m.name for m in members if m.stage.name == 'probe'] == ['mask_ratio=0.75,seed=1']
  nobody = sweep.Stage('probe', DEMO_FT, init_from='pretrain', parents={'model.mask_ratio': 0.6})
  with pytest.raises(ValueError, match=r"no member of 'pretrain' has \{'model.mask_ratio': 0.6\}"):
    sweep.expand(sweep.Sweep([pretrain, nobody]), str(tmp_path))


def test_a_stage_naming_a_missing_or_later_sibling_is_refused(tmp_path):
  finetune = sweep.Stage('finetune', DEMO_FT, init_from='pretrain')
  with pytest.raises(ValueError, match=r"init_from='pretrain' is not a stage of this sweep"):
    sweep.expand(sweep.Sweep([finetune]), str(tmp_path))
  with pytest.raises(ValueError, match=r"init_from='pretrain' comes after it"):
    sweep.expand(sweep.Sweep([finetune, sweep.Stage('pretrain', DEMO_MAE)]), str(tmp_path))


def test_an_unknown_or_mistyped_key_is_named_before_anything_runs(tmp_path):
  bad = sweep.Stage('pretrain', DEMO_MAE, grid=[{'optim.base_lrr': 1e-3}])
  (member,) = sweep.expand(sweep.Sweep([bad]), str(tmp_path))
  with pytest.raises(ValueError, match=r"'optim.base_lrr' is not a key of .*mae_pretrain.py:demo"):
    sweep.member_config(member)
  mistyped = sweep.Stage('pretrain', DEMO_MAE, grid=[{'optim.base_lr': 'fast'}])
  (member,) = sweep.expand(sweep.Sweep([mistyped]), str(tmp_path))
  with pytest.raises(ValueError, match=r"optim.base_lr='fast' does not fit"):
    sweep.member_config(member)
  good = sweep.Stage('pretrain', DEMO_MAE, grid=[{'optim.base_lr': 1e-3, 'data.crop_scale': [0.3, 1]}])
  (member,) = sweep.expand(sweep.Sweep([good]), str(tmp_path))
  config = sweep.member_config(member)
  assert config.optim.base_lr == 1e-3 and config.data.crop_scale == (0.3, 1)


def _write_run(workdir, *, steps, evals, flops_per_step=1e9, step_time=0.5, batch=256):
  """A member's workdir as the loop leaves it: train rows every 10 steps, eval rows."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in range(10, steps + 1, 10):
      f.write(json.dumps({'step': step, 'train/loss': 3.0 / step,
                          'perf/images_per_sec': batch / step_time, 'perf/step_time': step_time,
                          'perf/flops_per_step': flops_per_step}) + '\n')
    for step, top1, loss in evals:
      f.write(json.dumps({'step': step, 'eval/top1': top1, 'eval/loss': loss,
                          'eval/count': 1000.0}) + '\n')


def test_report_tables_hold_the_runs_numbers_and_seed_statistics(tmp_path):
  stage = sweep.Stage('train', DEMO_FT, grid=sweep.product({'optim.base_lr': [1e-3, 3e-3],
                                                            'seed': [0, 1]}))
  spec = sweep.Sweep([stage], title='lr')
  members = sweep.expand(spec, str(tmp_path))
  tops = {(1e-3, 0): 0.80, (1e-3, 1): 0.84, (3e-3, 0): 0.70, (3e-3, 1): 0.74}
  for m in members:
    top1 = tops[(m.values['optim.base_lr'], m.values['seed'])]
    _write_run(m.workdir, steps=100, evals=[(50, top1 + 0.05, 0.5), (100, top1, 0.6)])
  # The last member stopped at step 60 of 100.
  _write_run(members[-1].workdir, steps=60, evals=[(50, 0.6, 0.9)])
  with open(os.path.join(members[0].workdir, sweep.RECORD), 'w') as f:
    json.dump({'attempts': [{'seconds': 30.0}, {'seconds': 12.5}]}, f)
  steps = {m.label: 100 for m in members}

  written = sweep.report(spec, members, steps, str(tmp_path))
  rows = {(r['optim.base_lr'], r['seed']): r for r in written['rows']}
  first = rows[(1e-3, 0)]
  assert first['status'] == 'done' and first['steps'] == 100
  assert first['last_eval/top1'] == pytest.approx(0.80)
  assert first['best_eval/top1'] == pytest.approx(0.85)
  assert first['best_eval/loss'] == pytest.approx(0.5)
  assert first['final_train_loss'] == pytest.approx(0.03)
  assert first['train_flops'] == pytest.approx(100e9)
  assert first['train_seconds'] == pytest.approx(50.0)  # 100 steps of 0.5 s
  assert first['images_per_sec'] == pytest.approx(512.0)
  assert first['wall_clock_s'] == pytest.approx(42.5)
  assert rows[(3e-3, 1)]['status'] == 'unfinished' and rows[(3e-3, 1)]['steps'] == 60

  with open(tmp_path / 'results.csv') as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == 4 and float(csv_rows[1]['last_eval/top1']) == pytest.approx(0.84)
  text = (tmp_path / 'results.md').read_text()
  assert '3 of 4 runs finished.' in text
  # Mean and std over the two seeds of lr 1e-3; lr 3e-3 has one finished seed.
  agg = {a['optim.base_lr']: a for a in sweep.aggregate_seeds(written['rows'],
                                                              ['optim.base_lr', 'seed'])}
  assert agg[1e-3]['seeds'] == 2
  assert agg[1e-3]['last_eval/top1 mean'] == pytest.approx(0.82)
  assert agg[1e-3]['last_eval/top1 std'] == pytest.approx(np.std([0.80, 0.84], ddof=1))
  assert agg[3e-3]['seeds'] == 1 and agg[3e-3]['last_eval/top1 mean'] == pytest.approx(0.70)
  assert '| 0.0010 | 2 | 0.8200 | 0.0283 |' in text
  # One run has no spread: blank, not 0.
  assert agg[3e-3]['last_eval/top1 std'] is None and '| 0.0030 | 1 | 0.7000 |  |' in text
  assert os.path.exists(tmp_path / 'train_base_lr.png')


def test_a_one_factor_grid_shows_its_base_run_with_the_values_it_ran(tmp_path):
  # The base run sweeps nothing: the table and the lr plot take its config's values
  # (the demo's lr 1e-3, layer decay 0.75); the run that sweeps the layer decay does not
  # join the lr plot.
  stage = sweep.Stage('train', DEMO_FT, overrides={'optim.weight_decay': 0.2},
                      grid=[{}, {'optim.base_lr': 2e-3}, {'optim.layer_decay': 0.65}])
  spec = sweep.Sweep([stage], title='one factor at a time')
  members = sweep.expand(spec, str(tmp_path))
  for m, top1 in zip(members, (0.80, 0.84, 0.78)):
    _write_run(m.workdir, steps=100, evals=[(100, top1, 0.5)])
  written = sweep.report(spec, members, {m.label: 100 for m in members}, str(tmp_path))
  base, lr, decay = written['rows']
  assert (base['optim.base_lr'], base['optim.layer_decay']) == (1e-3, 0.75)
  assert 'optim.layer_decay' not in lr and 'optim.base_lr' not in decay
  assert '| 0.0010 | 0.7500 | done |' in (tmp_path / 'results.md').read_text()


def test_welch_interval_matches_scipys_welch_test():
  from scipy import stats
  a, b = [0.921, 0.930, 0.942], [0.905, 0.911, 0.926]
  diff, half, note = sweep.welch_interval(a, b)
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert diff == pytest.approx(np.mean(a) - np.mean(b))
  assert (diff - half, diff + half) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert note == ''
  # Two groups of three with equal spread: 4 degrees of freedom, t = 2.776, not 1.96.
  diff, half, _ = sweep.welch_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  assert diff == 0 and half == pytest.approx(2.776445 * np.sqrt(2 / 3), rel=1e-6)


def _claim_rows(a, b, *, stage_b='scratch'):
  rows = [{'stage': 'finetune', 'status': 'done', 'seed': i, 'last_eval/top1': v}
          for i, v in enumerate(a)]
  rows += [{'stage': stage_b, 'status': 'done', 'seed': i, 'last_eval/top1': v}
           for i, v in enumerate(b)]
  return rows


@pytest.mark.parametrize('a, b, kind, verdict', [
    ([0.930, 0.932, 0.934], [0.910, 0.912, 0.914], 'greater', 'reproduced'),
    ([0.910, 0.912, 0.914], [0.930, 0.932, 0.934], 'greater', 'not reproduced'),
    ([0.920, 0.935, 0.905], [0.915, 0.930, 0.900], 'greater', 'inconclusive'),
    ([0.9200, 0.9205, 0.9210], [0.9195, 0.9200, 0.9205], 'within', 'reproduced'),
    ([0.930, 0.931, 0.932], [0.910, 0.911, 0.912], 'within', 'not reproduced'),
    ([0.920, 0.935, 0.905], [0.915, 0.930, 0.900], 'within', 'inconclusive'),
    # Doubling a budget (a) against the budget (b): a loss counts as flat, a gain does not.
    ([0.910, 0.911, 0.912], [0.930, 0.931, 0.932], 'at_most', 'reproduced'),
    ([0.9200, 0.9205, 0.9210], [0.9195, 0.9200, 0.9205], 'at_most', 'reproduced'),
    ([0.930, 0.931, 0.932], [0.910, 0.911, 0.912], 'at_most', 'not reproduced'),
    ([0.920, 0.935, 0.905], [0.915, 0.930, 0.900], 'at_most', 'inconclusive'),
])
def test_claims_are_judged_by_the_interval_of_the_difference(a, b, kind, verdict):
  claim = sweep.Claim('a claim', sweep.Group('finetune'), sweep.Group('scratch'), kind=kind,
                      margin=0.0 if kind == 'greater' else 0.005)
  judged = sweep.judge(claim, _claim_rows(a, b))
  assert judged['verdict'] == verdict
  assert judged['difference'] == pytest.approx(np.mean(a) - np.mean(b))
  assert judged['line'].startswith(f'**{verdict.capitalize()}**: a claim.')


def test_a_claim_on_single_runs_says_what_it_lacks():
  claim = sweep.Claim('doubling moves little', sweep.Group('finetune'),
                      sweep.Group('twice'), kind='within', margin=0.005)
  one_each = sweep.judge(claim, _claim_rows([0.92], [0.921], stage_b='twice'))
  assert one_each['verdict'] == 'inconclusive' and 'one run each' in one_each['line']
  # Three seeds against one run: the single run borrows the seeds' spread.
  borrowed = sweep.judge(claim, _claim_rows([0.9200, 0.9202, 0.9204], [0.9203],
                                            stage_b='twice'))
  assert borrowed['verdict'] == 'reproduced' and 'single run' in borrowed['line']
  # One variance estimate from three runs: 2 degrees of freedom, t = 4.303.
  sd = np.std([0.9200, 0.9202, 0.9204], ddof=1)
  assert borrowed['half_width'] == pytest.approx(4.302653 * sd * np.sqrt(1 / 3 + 1), rel=1e-6)
  missing = sweep.judge(claim, _claim_rows([0.92], []))
  assert missing['verdict'] == 'not run yet' and 'twice' in missing['line']


def test_the_report_puts_the_verdicts_first_and_refuses_a_misspelt_group(tmp_path):
  stages = [sweep.Stage('finetune', DEMO_FT, grid=sweep.product({'seed': [0, 1, 2]})),
            sweep.Stage('scratch', DEMO_FT, grid=sweep.product({'seed': [0, 1, 2]}))]
  claim = sweep.Claim('Pretraining beats scratch (He et al. 2022)', sweep.Group('finetune'),
                      sweep.Group('scratch'))
  spec = sweep.Sweep(stages, claims=[claim])
  members = sweep.expand(spec, str(tmp_path))
  for m in members:
    top1 = (0.93 if m.stage.name == 'finetune' else 0.91) + 0.002 * m.values['seed']
    _write_run(m.workdir, steps=100, evals=[(100, top1, 0.3)])
  written = sweep.report(spec, members, {m.label: 100 for m in members}, str(tmp_path))
  assert [v['verdict'] for v in written['verdicts']] == ['reproduced']
  text = (tmp_path / 'results.md').read_text()
  assert text.index('## Verdicts') < text.index('## finetune')
  assert ('- **Reproduced**: Pretraining beats scratch (He et al. 2022). eval/top1: finetune '
          '93.20% \u00b1 0.20 (3 runs) against scratch 91.20% \u00b1 0.20 (3 runs): +2.00 '
          'points \u00b1 0.45 (95% interval).') in text
  bad = sweep.Sweep(stages, claims=[sweep.Claim('x', sweep.Group('fine-tune'),
                                                sweep.Group('scratch'))])
  with pytest.raises(ValueError, match="stage 'fine-tune' is not a stage of this sweep"):
    sweep.expand(bad, str(tmp_path))
  bad = sweep.Sweep(stages, claims=[sweep.Claim('x', sweep.Group('finetune', {'lr': 1}),
                                                sweep.Group('scratch'))])
  with pytest.raises(ValueError, match=r"\['lr'\] are not swept in stage 'finetune'"):
    sweep.expand(bad, str(tmp_path))
  bad = sweep.Sweep(stages, claims=[sweep.Claim('x', sweep.Group('finetune', {'seed': 3}),
                                                sweep.Group('scratch'))])
  with pytest.raises(ValueError, match=r"no run of stage 'finetune' has \{'seed': 3\}"):
    sweep.expand(bad, str(tmp_path))
  # A group pools seeds only: one that takes in two points is refused.
  two = [sweep.Stage('finetune', DEMO_FT, grid=sweep.product({'seed': [0, 1],
                                                              'optim.base_lr': [1e-3, 2e-3]})),
         stages[1]]
  pooled = sweep.Claim('x', sweep.Group('finetune', {'seed': 0}), sweep.Group('scratch'))
  with pytest.raises(ValueError, match=r"pools runs that differ in more than their seed"):
    sweep.expand(sweep.Sweep(two, claims=[pooled]), str(tmp_path))
  sweep.expand(sweep.Sweep(two, claims=[sweep.Claim(
      'x', sweep.Group('finetune', {'optim.base_lr': 2e-3}), sweep.Group('scratch'))]),
      str(tmp_path))
  # Numbers match by value: seed 1.0 is seed 1.
  one = sweep.Claim('x', sweep.Group('finetune', {'seed': 1.0}), sweep.Group('scratch'))
  sweep.expand(sweep.Sweep(stages, claims=[one]), str(tmp_path))
  assert sweep.judge(one, written['rows'])['a'] == [pytest.approx(0.932)]


def test_power_law_fit_recovers_a_known_exponent():
  compute = np.geomspace(1e12, 1e16, 9)
  loss = 40.0 * compute ** -0.12
  fit = sweep.fit_power_law(compute, loss)
  assert fit['exponent'] == pytest.approx(-0.12, abs=1e-9)
  assert fit['a'] == pytest.approx(40.0, rel=1e-6)
  assert fit['r2'] == pytest.approx(1.0)
  noisy = loss * np.exp(np.random.default_rng(0).normal(0, 0.02, loss.shape))
  fit = sweep.fit_power_law(compute, noisy)
  assert fit['exponent'] == pytest.approx(-0.12, abs=0.01) and 0.95 < fit['r2'] < 1.0


def test_frontier_keeps_points_better_than_every_cheaper_one():
  points = [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (5, 3.5), (6, 2.0)]
  assert sweep.frontier(points) == [(1, 5.0), (2, 4.0), (4, 3.0), (6, 2.0)]


def test_scaling_report_draws_the_fit_of_the_frontier_of_the_seeds_means(tmp_path):
  stage = sweep.Stage('scratch', DEMO_FT, grid=sweep.product(
      {'model.width': [32, 64], 'num_epochs': [1.0, 2.0, 4.0], 'seed': [0, 1]}))
  spec = sweep.Sweep([stage], scaling='model.width')
  members = sweep.expand(spec, str(tmp_path))
  for m in members:
    width, epochs = m.values['model.width'], m.values['num_epochs']
    flops = width * 1e9
    compute = flops * 100 * epochs
    # The two seeds 1% either side of the law: their means lie on it.
    noise = 1.01 if m.values['seed'] else 0.99
    _write_run(m.workdir, steps=int(100 * epochs), flops_per_step=flops,
               evals=[(int(100 * epochs), 0.9, noise * 2e3 * compute ** -0.25)])
  written = sweep.report(spec, members, {m.label: int(100 * m.values['num_epochs'])
                                         for m in members}, str(tmp_path))
  fit = written['fits']['scratch']
  assert fit['exponent'] == pytest.approx(-0.25, abs=1e-6) and fit['r2'] == pytest.approx(1.0)
  assert fit['points'] == 4  # 6 means at 4 distinct computes (two pairs tie), not 12 runs
  assert os.path.exists(tmp_path / 'scratch_scaling.png')
  assert 'C^-0.250' in (tmp_path / 'results.md').read_text()


def test_rerun_skips_finished_members_and_runs_the_rest_parents_first(tmp_path, monkeypatch):
  pretrain = sweep.Stage('pretrain', DEMO_MAE, grid=sweep.product({'seed': [0, 1]}))
  finetune = sweep.Stage('finetune', DEMO_FT, init_from='pretrain')
  members = sweep.expand(sweep.Sweep([pretrain, finetune]), str(tmp_path))
  steps = {m.label: 100 for m in members}
  _write_run(members[0].workdir, steps=100, evals=[(100, 0.5, 1.0)])  # finished
  _write_run(members[1].workdir, steps=40, evals=[])  # interrupted at step 40
  ran = []

  def fake_run(member, alone=None):
    del alone
    ran.append(member.label)
    if member.name == 'seed=0' and member.stage.name == 'finetune':
      return False, 'Error: something broke'
    _write_run(member.workdir, steps=100, evals=[(100, 0.5, 1.0)])
    return True, 'ok'

  monkeypatch.setattr(sweep.runner, 'run_member', fake_run)
  lines = []
  failures = sweep.run(members, steps, log=lines.append)
  assert ran == ['pretrain/seed=1', 'finetune/seed=0', 'finetune/seed=1']
  assert lines[0] == '1 of 4 members finished; running 3.'
  assert failures == ['finetune/seed=0: Error: something broke']
  ran.clear()
  assert sweep.run(members, steps, log=lines.append) == ['finetune/seed=0: Error: something broke']
  assert ran == ['finetune/seed=0']


def test_a_child_of_an_unfinished_parent_is_not_run(tmp_path, monkeypatch):
  members = sweep.expand(sweep.Sweep([sweep.Stage('pretrain', DEMO_MAE),
                                      sweep.Stage('finetune', DEMO_FT, init_from='pretrain')]),
                         str(tmp_path))
  monkeypatch.setattr(sweep.runner, 'run_member',
                      lambda m, alone=None: (False, 'Error: out of memory'))
  failures = sweep.run(members, {m.label: 10 for m in members}, log=lambda _: None)
  assert failures == ['pretrain/base: Error: out of memory',
                      'finetune/base: not run: its parent pretrain/base did not finish']


def test_launch_print_gives_slurm_arrays_and_tpu_lines_in_dependency_order(tmp_path):
  pretrain = sweep.Stage('pretrain', DEMO_MAE, grid=sweep.product({'model.mask_ratio': [0.5, 0.75]}))
  probe = sweep.Stage('probe', f'{ROOT}/configs/linear_probe.py:demo', init_from='pretrain')
  text = sweep.launch_lines(sweep.expand(sweep.Sweep([pretrain, probe]), 'runs/x'))
  lines = text.splitlines()
  assert lines.count('#SBATCH --array=0-1') == 2
  assert text.index('#SBATCH --job-name=pretrain') < text.index('#SBATCH --job-name=probe')
  assert '--dependency=afterok:$previous' in text
  assert ('  1) srun python -m vit_jax.main --config=' + DEMO_MAE +
          " --workdir=runs/x/pretrain/mask_ratio=0.75 --config.model.mask_ratio=0.75 ;;") in lines
  gcloud = [line for line in lines if line.startswith('gcloud compute tpus tpu-vm ssh')]
  assert len(gcloud) == 4 and all('--worker=all' in line for line in gcloud)
  assert 'init.path=runs/x/pretrain/mask_ratio=0.5' in gcloud[2]
  # The script is valid bash.
  script = tmp_path / 'launch.sh'
  script.write_text(text)
  subprocess.run(['bash', '-n', str(script)], check=True)


SWEEP_FILE = '''
from vit_jax import sweep
TINY = {{'model.width': 32, 'model.depth': 1, 'model.num_heads': 2, 'model.mlp_dim': 64,
        'total_steps': 4, 'global_batch_size': 32, 'eval_batch_size': 64,
        'data.eval_split': 'test[:128]', 'log_every_steps': 2, 'checkpoint_every_steps': 2,
        'optim.warmup_epochs': 0.0}}
DECODER = {{'model.decoder_width': 16, 'model.decoder_depth': 1, 'model.decoder_num_heads': 2,
           'model.decoder_mlp_dim': 32, 'reconstructions': 0}}

def get_sweep():
  return sweep.Sweep(stages=[
      sweep.Stage('pretrain', '{mae}', overrides=TINY | DECODER,
                  grid=sweep.product({{'optim.base_lr': [1e-3]}})),
      sweep.Stage('finetune', '{ft}', overrides=TINY, grid=sweep.product({{'model.num_heads': {heads}}}),
                  init_from='pretrain')])
'''


def _sweep(tmp_path, heads, *extra, key='model.num_heads'):
  """Runs the tiny sweep whose fine-tuning stage sweeps KEY over HEADS."""
  path = tmp_path / f'sweep_{len(heads)}.py'
  path.write_text(SWEEP_FILE.format(mae=DEMO_MAE, ft=DEMO_FT, heads=heads).replace(
      "'model.num_heads'", repr(key)))
  return subprocess.run([sys.executable, '-m', 'vit_jax.sweep', f'--sweep={path}',
                         f'--workdir={tmp_path / "runs"}', *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / 'tfds')))


@pytest.mark.slow
def test_a_tiny_sweep_end_to_end_with_a_failing_member_then_rerun(tmp_path):
  # Fine-tuning with 3 heads fails (they do not divide width 32); the other runs go on.
  first = _sweep(tmp_path, [2, 3])
  assert first.returncode == 1, first.stdout + first.stderr
  assert '0 of 3 members finished; running 3.' in first.stdout
  assert 'finetune/base_lr=0.001,num_heads=3: FAILED: Error:' in first.stdout
  assert '1 run(s) failed' in first.stderr
  root = tmp_path / 'runs'
  with open(root / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['stage'], r['model.num_heads'], r['status'], r['steps']) for r in rows] == [
      ('pretrain', '', 'done', '4'), ('finetune', '2', 'done', '4'),
      ('finetune', '3', 'failed', '0')]
  assert 0 < float(rows[1]['last_eval/top1']) and float(rows[0]['last_eval/loss']) > 0
  # Each step was timed alone before the runs (3 heads fail to compile: not measured), and
  # the finished runs' rows hold that rate beside their own.
  with open(root / sweep.ALONE) as f:
    alone = json.load(f)
  assert len(alone) == 2 and all(rates['back_to_back'] > 0 for rates in alone.values())
  assert 'not measured: ' in first.stdout
  assert all(float(r['images_per_sec_alone']) > 0 for r in rows[:2])
  # Each attempt keeps the rate of its own sitting, which its row shows.
  for r in rows[:2]:
    with open(root / r['stage'] / r['name'] / sweep.RECORD) as f:
      (attempt,) = json.load(f)['attempts']
    assert attempt['images_per_sec_alone'] == pytest.approx(float(r['images_per_sec_alone']))
  finetune_log = (root / 'finetune' / 'base_lr=0.001,num_heads=2' / 'log.txt').read_text()
  assert 'Initialised from' in finetune_log and 'pretrain/base_lr=0.001' in finetune_log
  report = (root / 'results.md').read_text()

  # Again: the finished runs are skipped, the failing one is tried again, and the
  # report is rebuilt the same.
  again = _sweep(tmp_path, [2, 3])
  assert again.returncode == 1
  assert '2 of 3 members finished; running 1.' in again.stdout
  assert (root / 'results.md').read_text() == report


@pytest.mark.slow
def test_a_lost_workdir_costs_no_finished_run_when_results_are_kept(tmp_path):
  """--results keeps each finished run's metrics (and the weights its children start
  from): with the workdir gone, --report rebuilds the same tables, and the sweep goes on
  from the kept weights instead of running the pretraining again."""
  from vit_jax import checkpoint, param_tree  # pylint: disable=import-outside-toplevel
  results, root = tmp_path / 'results', tmp_path / 'runs'
  first = _sweep(tmp_path, [0], f'--results={results}', key='seed')
  assert first.returncode == 0, first.stdout + first.stderr
  kept = results / 'runs' / 'pretrain' / 'base_lr=0.001'
  assert sorted(os.listdir(kept)) == ['metrics.jsonl', 'params.npz', sweep.RECORD]
  assert 'params.npz' not in os.listdir(results / 'runs' / 'finetune' / 'base_lr=0.001,seed=0')
  # The kept weights are the last step's, array for array, and the fine-tuning read them.
  pretrain = root / 'pretrain' / 'base_lr=0.001'
  assert checkpoint.saved_steps(str(pretrain))[-1] == 4
  _, saved = checkpoint.load_params(str(pretrain / 'checkpoints' / '4'))
  _, exported = checkpoint.load_params(str(kept / 'params.npz'))
  flat_saved, flat_exported = (param_tree.flat_numpy(p) for p in (saved, exported))
  assert flat_saved.keys() == flat_exported.keys() and len(flat_saved) > 10
  assert all(flat_saved[k].dtype == flat_exported[k].dtype
             and np.array_equal(flat_saved[k], flat_exported[k]) for k in flat_saved)
  first_log = (root / 'finetune' / 'base_lr=0.001,seed=0' / 'log.txt').read_text()
  assert 'Initialised from' in first_log and str(kept / 'params.npz') in first_log
  assert not (root / 'results.md').exists()
  table, report = (results / 'results.csv').read_text(), (results / 'results.md').read_text()
  assert f'--results={results}' in report and '2 of 2 runs finished.' in report

  shutil.rmtree(root)
  rebuilt = _sweep(tmp_path, [0], f'--results={results}', '--report', key='seed')
  assert rebuilt.returncode == 0, rebuilt.stderr
  assert '2 finished run(s) taken from' in rebuilt.stdout
  assert (results / 'results.csv').read_text() == table
  assert (results / 'results.md').read_text() == report

  # A new fine-tuning after the workdir is lost again: nothing finished runs twice.
  shutil.rmtree(root)
  more = _sweep(tmp_path, [0, 1], f'--results={results}', '--nomeasure_alone',
                key='seed')
  assert more.returncode == 0, more.stdout + more.stderr
  assert '2 of 3 members finished; running 1.' in more.stdout
  new_log = (root / 'finetune' / 'base_lr=0.001,seed=1' / 'log.txt').read_text()
  assert 'Initialised from' in new_log and str(kept / 'params.npz') in new_log
  assert '3 of 3 runs finished.' in (results / 'results.md').read_text()
  assert (results / 'runs' / 'finetune' / 'base_lr=0.001,seed=1' / 'metrics.jsonl').exists()


def test_bad_sweep_files_give_one_error_line(tmp_path):
  unknown = tmp_path / 'unknown.py'
  unknown.write_text(SWEEP_FILE.format(mae=DEMO_MAE, ft=DEMO_FT, heads=[2]).replace(
      "'total_steps'", "'total_stepz'"))
  missing = tmp_path / 'missing.py'
  missing.write_text('from vit_jax import sweep\ndef get_sweep():\n  return sweep.Sweep('
                     f"[sweep.Stage('ft', '{DEMO_FT}', init_from='pretrain')])\n")
  for path, message in ((unknown, "Error: Stage 'pretrain': 'total_stepz' is not a key of"),
                        (missing, "Error: Stage 'ft': init_from='pretrain' is not a stage"),
                        (tmp_path / 'nope.py', 'Error: --sweep=')):
    result = subprocess.run([sys.executable, '-m', 'vit_jax.sweep', f'--sweep={path}',
                             f'--workdir={tmp_path / "runs"}'], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'runs').exists()
  # --launch=print checks the keys too: a cluster job must not be the first to find them.
  result = subprocess.run([sys.executable, '-m', 'vit_jax.sweep', f'--sweep={unknown}',
                           f'--workdir={tmp_path / "runs"}', '--launch=print'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stdout == ''
  assert "'total_stepz' is not a key of" in result.stderr


def test_sigterm_stops_the_sweep_after_the_run_saved(tmp_path, monkeypatch):
  """A preemption of the sweep reaches the running member (which saves and exits 0, as
  vit_jax.main does) and stops the sweep instead of going on to the next member."""
  (member,) = sweep.expand(sweep.Sweep([sweep.Stage('pretrain', DEMO_MAE)]), str(tmp_path))
  child = ('import signal, sys, time\n'
           'signal.signal(signal.SIGTERM, lambda *_: (print("saved"), sys.exit(0)))\n'
           'print("ready", flush=True)\n'
           'time.sleep(60)\n')
  monkeypatch.setattr(sweep.Member, 'command', lambda self, python='python': [python, '-c', child])
  log = tmp_path / 'pretrain' / 'base' / 'log.txt'

  def preempt():
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and 'ready' in log.read_text().splitlines()):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt, daemon=True).start()
  start = time.time()
  with pytest.raises(sweep.Stop):
    sweep.run_member(member)
  assert time.time() - start < 30
  assert 'saved' in log.read_text().splitlines()
  record = json.loads((tmp_path / 'pretrain' / 'base' / sweep.RECORD).read_text())
  assert record['attempts'][-1]['returncode'] == 0


@pytest.mark.parametrize('name', sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs', 'sweeps')) if f.endswith('.py')))
def test_shipped_sweep_files_expand_to_valid_configs(name, monkeypatch):
  monkeypatch.chdir(ROOT)
  members = sweep.expand(sweep.load_sweep(f'configs/sweeps/{name}.py'), f'runs/{name}')
  assert len(members) >= 2
  for member in members:
    config = sweep.member_config(member)
    for key, value in member.overrides.items():
      node = config
      for part in key.split('.'):
        node = node[part]
      assert node == (tuple(value) if isinstance(value, list) else value)


def test_runs_slower_than_their_step_alone_are_marked_as_run_on_a_shared_machine(tmp_path):
  stage = sweep.Stage('train', DEMO_FT, grid=sweep.product({'model.width': [32, 64],
                                                            'seed': [0, 1]}))
  spec = sweep.Sweep([stage], title='widths')
  members = sweep.expand(spec, str(tmp_path))
  # The step alone: 1000 images/s at width 32, 600 at width 64; seeds share a step.
  alone = {sweep.step_key(m): 1000.0 if m.values['model.width'] == 32 else 600.0
           for m in members}
  assert len(alone) == 2
  with open(tmp_path / sweep.ALONE, 'w') as f:  # one at a time is faster: not the reference
    json.dump({k: {'back_to_back': v, 'one_at_a_time': 1.15 * v} for k, v in alone.items()}, f)
  # The loops' rates: 20% and 23% below alone are not marked, 30% and 50% below are.
  rates = {(32, 0): 800.0, (32, 1): 700.0, (64, 0): 460.0, (64, 1): 300.0}
  for m in members:
    rate = rates[(m.values['model.width'], m.values['seed'])]
    _write_run(m.workdir, steps=100, evals=[(100, 0.8, 0.5)], step_time=256 / rate)
  written = sweep.report(spec, members, {m.label: 100 for m in members}, str(tmp_path))
  marks = {(r['model.width'], r['seed']): (r['shared_machine'], r['images_per_sec_alone'])
           for r in written['rows']}
  assert marks == {(32, 0): ('no', 1000.0), (32, 1): ('yes', 1000.0),
                   (64, 0): ('no', 600.0), (64, 1): ('yes', 600.0)}
  text = (tmp_path / 'results.md').read_text()
  assert ('**Ran on a shared machine** (median images/s more than 25% below the same steps '
          'alone back to back, images_per_sec_alone): width=32,seed=1, width=64,seed=1.') in text
  assert sweep.shared_machine(740.0, 1000.0) and not sweep.shared_machine(760.0, 1000.0)
  assert 'older version' not in text
  # Entries an older version wrote (bare numbers) are not compared, and the page says so.
  with open(tmp_path / sweep.ALONE, 'w') as f:
    json.dump({k: 0.5 * v for k, v in alone.items()}, f)
  rows = sweep.report(spec, members, {m.label: 100 for m in members}, str(tmp_path))['rows']
  assert all('shared_machine' not in r for r in rows)
  assert ('2 steps of step_alone.json were timed by an older version'
          in (tmp_path / 'results.md').read_text())
  # Without a measurement nothing is marked.
  (tmp_path / sweep.ALONE).unlink()
  rows = sweep.report(spec, members, {m.label: 100 for m in members}, str(tmp_path))['rows']
  assert all('shared_machine' not in r for r in rows)
  assert 'shared machine' not in (tmp_path / 'results.md').read_text()


def test_the_step_alone_is_measured_once_per_step_at_each_start(tmp_path, monkeypatch):
  tiny = {'model.width': 32, 'model.depth': 1, 'model.num_heads': 2, 'model.mlp_dim': 64,
          'global_batch_size': 32}
  stage = sweep.Stage('train', DEMO_FT, overrides=tiny, grid=sweep.product(
      {'optim.base_lr': [1e-3, 3e-3], 'seed': [0, 1], 'num_epochs': [1, 2]}))
  members = sweep.expand(sweep.Sweep([stage]), str(tmp_path))
  # The learning rate, the seed and the budget do not change the step; the model, the
  # objective's mixup and the optimizer do.
  key = sweep.step_key(members[0])
  assert {sweep.step_key(m) for m in members} == {key}
  for other in ({'model.width': 64}, {'mixup.prob': 0.0}, {'optim.name': 'sgd'}):
    changed = sweep.expand(sweep.Sweep([sweep.Stage('train', DEMO_FT,
                                                    overrides={**tiny, **other})]),
                           str(tmp_path))[0]
    assert sweep.step_key(changed) != key, other
  lines = []
  alone = sweep.measure_steps_alone(members, str(tmp_path), {m.label: 10 for m in members},
                                    log=lines.append)
  assert list(alone) == [key] and alone[key] > 0  # one measurement for eight runs
  assert sweep.read_steps_alone(str(tmp_path)) == alone
  assert sum(line.startswith('The step alone: ') for line in lines) == 1
  with open(tmp_path / sweep.ALONE) as f:
    stored = json.load(f)[key]
  assert stored['back_to_back'] == alone[key] and stored['one_at_a_time'] > 0
  assert stored['machine'] == sweep.machine() and stored['measured_for'].startswith(DEMO_FT)
  # A sweep started again (another day, maybe another machine) measures again, and the
  # file keeps the latest; the runs already made keep the rate of their own sitting.
  _write_run(members[0].workdir, steps=100, evals=[(100, 0.8, 0.5)], step_time=32 / 300)
  with open(os.path.join(members[0].workdir, sweep.RECORD), 'w') as f:
    json.dump({'attempts': [{'start': 0, 'seconds': 60.0, 'returncode': 0,
                             'images_per_sec_alone': 350.0}]}, f)
  measured = []
  real_run = subprocess.run

  def counted(*args, **kwargs):
    measured.append(args)
    return real_run(*args, **kwargs)

  monkeypatch.setattr(subprocess, 'run', counted)
  again = sweep.measure_steps_alone(members, str(tmp_path), {m.label: 10 for m in members},
                                    log=lines.append)
  assert len(measured) == 1 and list(again) == [key]
  assert sweep.read_steps_alone(str(tmp_path)) == again
  assert sweep.alone_for(members[0], again) == 350.0  # its attempt's, not the latest
  assert sweep.alone_for(members[1], again) == again[key]  # no attempt yet: the latest
  # The longest attempt decides. One of an earlier version (no rate in its record) is
  # judged against that version's entry (keyed by the stage's config string); one of this
  # version that was not measured (--nomeasure_alone), against the latest.
  legacy_key = sweep.runner._legacy_step_key(members[0])  # pylint: disable=protected-access
  legacy = {**again, legacy_key: 280.0}

  def attempts(*rates):
    with open(os.path.join(members[0].workdir, sweep.RECORD), 'w') as f:
      json.dump({'attempts': [{'start': 0, 'seconds': seconds, 'returncode': 0, **rate}
                              for seconds, rate in rates]}, f)

  attempts((600.0, {}), (60.0, {'images_per_sec_alone': 350.0}))
  assert sweep.alone_for(members[0], legacy) == 280.0
  attempts((600.0, {'images_per_sec_alone': None}))
  assert sweep.alone_for(members[0], legacy) == again[key]
  attempts((60.0, {}), (600.0, {'images_per_sec_alone': 350.0}))
  assert sweep.alone_for(members[0], legacy) == 350.0
  # An older sweep's entry (a bare number: one step at a time) is not read, is counted so
  # that the report can say so, and is dropped when the step is measured again.
  monkeypatch.undo()
  with open(tmp_path / sweep.ALONE, 'w') as f:
    json.dump({key: 1e6}, f)
  assert sweep.read_steps_alone(str(tmp_path)) == {}
  assert sweep.old_steps_alone(str(tmp_path)) == 1
  sweep.measure_steps_alone(members[:1], str(tmp_path), {members[0].label: 10},
                            log=lines.append)
  assert sweep.old_steps_alone(str(tmp_path)) == 0
  assert 0 < sweep.read_steps_alone(str(tmp_path))[key] < 1e6

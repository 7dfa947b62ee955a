"""scripts/preflight_table.py continues its table: a rerun compiles only the missing rows."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'scripts'))

import preflight_table  # noqa: E402


def test_a_rerun_appends_only_the_rows_not_there_yet(tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(preflight_table, 'row', lambda *run: compiled.append(run) or
                      preflight_table.row_key(*run) + ' yes | 0.1 | | | | | | | |')
  output = str(tmp_path / 'table.md')
  preflight_table.extend_table(output, preflight_table.ROWS[:2])  # a first sitting
  assert compiled == list(preflight_table.ROWS[:2])
  preflight_table.extend_table(output, preflight_table.ROWS[:4])  # the next one
  assert compiled == list(preflight_table.ROWS[:4])
  with open(output) as f:
    lines = f.read().splitlines()
  assert '\n'.join(lines[:2]) + '\n' == preflight_table.HEADER
  assert [line.split(' yes')[0] for line in lines[2:]] == [  # in reading order
      preflight_table.row_key(*run) for run in preflight_table.READING_ORDER
      if run in preflight_table.ROWS[:4]]
  keys = [preflight_table.row_key(*run) for run in preflight_table.ROWS]
  assert len(set(keys)) == len(keys) == 50  # every run has its own row
  assert sorted(preflight_table.READING_ORDER) == sorted(preflight_table.ROWS)


def test_shards_split_the_missing_rows_and_fill_one_table(tmp_path, monkeypatch):
  """Two commands with --shard=0/2 and 1/2 compile disjoint halves into the same table."""
  compiled = []
  monkeypatch.setattr(preflight_table, 'row', lambda *run: compiled.append(run) or
                      preflight_table.row_key(*run) + ' yes | 0.1 | | | | | | | |')
  output = str(tmp_path / 'table.md')
  rows = preflight_table.ROWS[:7]
  preflight_table.extend_table(output, rows[:2])  # an earlier sitting
  preflight_table.extend_table(output, rows, shard=1, num_shards=2)
  assert compiled[2:] == [rows[3], rows[5]]  # every other run, from the second
  preflight_table.extend_table(output, rows, shard=0, num_shards=2)
  assert compiled[4:] == [rows[2], rows[4], rows[6]]  # the rest, each compiled once
  preflight_table.extend_table(output, rows, shard=1, num_shards=2)
  assert len(compiled) == 7  # nothing left
  with open(output) as f:
    lines = f.read().splitlines()[2:]
  assert lines == [preflight_table.row_key(*run) + ' yes | 0.1 | | | | | | | |'
                   for run in preflight_table.READING_ORDER if run in rows]


def test_a_run_the_compiler_found_too_big_gets_a_row_with_its_message(monkeypatch):
  """A compiler out-of-memory leaves no memory analysis; the row says what the compiler said."""
  chip = preflight_table.preflight.Chip('v4', 32 * 2**30, 275e12, 1)
  report = preflight_table.preflight.Report(
      title='', chip=chip, num_devices=4, num_chips=4, train_memory=None, eval_memory=None,
      oom='RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 40.1G of 32G hbm.')
  monkeypatch.setattr(preflight_table.preflight, 'run', lambda *args, **kwargs: report)
  line = preflight_table.row('configs/mae_pretrain.py', 'model=H/14,data=imagenet2012',
                             'v4:2x2x1')
  assert line.startswith('| `mae_pretrain.py:model=H/14` | v4:2x2x1 | **no** (RESOURCE_EXHAUSTED: '
                         'Ran out of memory in memory space hbm. Used 40.1G of 32G hbm.) |')
  assert line.count('|') == 11

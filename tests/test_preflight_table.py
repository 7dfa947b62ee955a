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
  assert [line.split(' yes')[0] for line in lines[2:]] == [
      preflight_table.row_key(*run) for run in preflight_table.ROWS[:4]]
  keys = [preflight_table.row_key(*run) for run in preflight_table.ROWS]
  assert len(set(keys)) == len(keys) == 50  # every run has its own row

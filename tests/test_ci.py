""".ci/run: every stage runs even after one fails, and the failed ones are named at the end.

The script runs on a copy of itself in a scratch repository whose README holds stand-in
commands, with stand-ins for the virtual environment's pip and python and for apt-get.
"""

import os
import shutil
import stat
import subprocess

from tests.test_main import ROOT

FENCE = '```'


def readme(test_command):
  blocks = [('<!-- test-command -->', test_command), ('<!-- main-command -->', 'echo main-ran'),
            ('<!-- ci -->', 'echo ci-command-ran'), ('<!-- ci-tpu -->', 'echo preflight-printed')]
  text = ''.join(f'{marker}\n{FENCE}\n{command}\n{FENCE}\n\n' for marker, command in blocks)
  return text + f'It prints:\n\n{FENCE}\npreflight-printed\n{FENCE}\n'


def executable(path, text):
  with open(path, 'w') as f:
    f.write('#!/bin/sh\n' + text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def run_ci(tmp_path, test_command, gcs_fails=True):
  repo = tmp_path / 'repo'
  (repo / '.ci').mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, '.ci', 'run'), repo / '.ci' / 'run')
  (repo / 'README.md').write_text(readme(test_command))
  venv_bin = repo / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'activate').write_text('')
  executable(venv_bin / 'pip', 'exit 0\n')
  # The stand-in python fails the GCS tests when asked to.
  gcs_exit = 3 if gcs_fails else 0
  executable(venv_bin / 'python',
             f'echo "python $*"\ncase "$*" in *test_gcs*) exit {gcs_exit};; esac\n')
  fake_path = tmp_path / 'bin'
  fake_path.mkdir()
  executable(fake_path / 'apt-get', 'exit 0\n')
  env = dict(os.environ, PATH=f'{fake_path}:{os.environ["PATH"]}')
  return subprocess.run(['bash', str(repo / '.ci' / 'run')], env=env, capture_output=True,
                        text=True, timeout=60)


def test_a_failing_first_stage_does_not_stop_the_others(tmp_path):
  result = run_ci(tmp_path, 'echo test-command-ran; exit 1')
  assert result.returncode == 1
  ran = result.stdout.splitlines()
  for line in ('test-command-ran', 'main-ran', 'ci-command-ran', '+ echo preflight-printed'):
    assert line in ran  # the pre-flight's output is compared with the README's, not shown
  for tests in ('test_interop_timm.py', 'test_preflight.py', 'test_gcs.py'):
    assert any(line.startswith('python -m pytest') and tests in line for line in ran)
  # The summary, last: both failed stages by name, and nothing that passed.
  summary = result.stderr.splitlines()[-3:]
  assert summary == ['CI failed in 2 stage(s):', '  README test command', '  GCS tests']


def test_every_stage_passing_exits_zero(tmp_path):
  result = run_ci(tmp_path, 'true', gcs_fails=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == 'CI passed: every stage'
  assert 'CI stage failed' not in result.stderr

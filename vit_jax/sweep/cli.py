"""The command line: python -m vit_jax.sweep --sweep=FILE --workdir=DIR [--results=DIR]
[--report]."""

import os
import shlex
import sys

from vit_jax.sweep import record
from vit_jax.sweep.grid import check, expand, load_sweep, member_config
from vit_jax.sweep.launch import launch_lines
from vit_jax.sweep.report import report
from vit_jax.sweep.runner import Stop, is_finished, measure_steps_alone, run


def num_classes(members) -> dict:
  """{member label: classes of its dataset} (the benchmark's head)."""
  from vit_jax import data  # pylint: disable=import-outside-toplevel
  return {m.label: data.dataset_info(member_config(m).data).num_classes for m in members}


def main(argv) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  sweep_path, root = flags.FLAGS.sweep, flags.FLAGS.workdir
  results = flags.FLAGS.results or root
  kept = os.path.abspath(results) != os.path.abspath(root)  # a results folder of its own
  sweep = load_sweep(sweep_path)
  members = expand(sweep, root)
  command = shlex.join(['python', '-m', 'vit_jax.sweep', f'--sweep={sweep_path}',
                        f'--workdir={root}'] + ([f'--results={results}'] if kept else []))
  if flags.FLAGS.launch == 'print':
    for member in members:  # the keys, without the dataset (it is on the cluster)
      member_config(member)
    print(launch_lines(members))
    return 0
  steps = check(members)  # every member's config, before anything runs

  def log(line):
    print(line, flush=True)

  if kept:
    record.restore(members, steps, results, log)
    record.save(members, steps, results, log)  # runs that finished before --results was given
  failures = []
  if not flags.FLAGS.report:
    print(f'Sweep {sweep_path}: {len(members)} runs in {root}.', flush=True)
    alone = {}
    if flags.FLAGS.measure_alone:  # at each start: the runs to come are judged against it
      todo = [m for m in members if not is_finished(m.workdir, steps[m.label])]
      alone = measure_steps_alone(todo, results, num_classes(todo), log=log)

    def after():  # the results folder is up to date after each run
      if kept:
        record.save(members, steps, results, log)
      report(sweep, members, steps, results, command)

    try:
      failures = run(members, steps, log=log, after=after, alone=alone,
                     before=(lambda m: record.with_kept_parent(m, results)) if kept else None)
    except Stop:
      print('Stopped; the interrupted run saved its last checkpoint. Run the same command '
            'to continue.', flush=True)
      return 1
  written = report(sweep, members, steps, results, command)
  print(f'Results: {os.path.join(results, "results.md")}, '
        f'{os.path.join(results, "results.csv")}'
        + (f', {len(written["plots"])} plots' if written['plots'] else ''))
  for name, fit in written['fits'].items():
    print(f'{name}: eval loss = {fit["a"]:.3g} C^{fit["exponent"]:.3f}, R2 {fit["r2"]:.3f}')
  if failures:
    print(f'{len(failures)} run(s) failed:\n  ' + '\n  '.join(failures), file=sys.stderr)
    return 1
  return 0


def cli():
  """Console entry point (vit-jax-sweep)."""
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/NAME.py).')
  flags.DEFINE_string('workdir', None, 'Root of the members\' workdirs and the results.')
  flags.DEFINE_enum('launch', 'local', ['local', 'print'],
                    'local: run the members here, one after another; print: print SLURM '
                    'and TPU-VM commands instead.')
  flags.DEFINE_string('results', None, 'Folder for results.csv/.md, the plots, the steps '
                      'alone and a copy of each finished run\'s metrics (and of the weights '
                      'that other stages start from): commit it, and a new clone rebuilds the '
                      'report and resumes without the workdir (vit_jax/sweep/record.py). '
                      'Default: the workdir.')
  flags.DEFINE_bool('report', False, 'Only write results.csv/.md and plots from the '
                    'finished runs.')
  flags.DEFINE_bool('measure_alone', True, 'Before the runs, time each distinct training '
                    'step still to run alone (scripts/benchmark.py), so that the report marks '
                    'runs that shared the machine.')
  flags.mark_flags_as_required(['sweep', 'workdir'])

  def checked_main(argv):
    logging.set_verbosity(logging.WARNING)
    # The sweep's own process computes nothing (it reads a kept run's weights at most):
    # JAX stays on its CPU here, leaving the GPU or TPU to the runs it starts.
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_platforms', 'cpu')
    try:
      sys.exit(main(argv))
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a missing dataset
      print(f'Error: {e}', file=sys.stderr)
      sys.exit(1)

  app.run(checked_main)

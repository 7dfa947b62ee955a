r"""Sweeps: a grid of ordinary `vit_jax.main` runs, their results collected, compared, drawn.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_mask_ratio.py --workdir=runs/mask_ratio
  python -m vit_jax.sweep ... --report          # tables and plots from what has finished
  python -m vit_jax.sweep ... --results=docs/results/NAME   # the report, and each finished
                                                # run's metrics, kept apart from the workdir
  python -m vit_jax.sweep ... --launch=print    # SLURM job arrays and TPU-VM lines instead

A sweep file defines `get_sweep()` returning a `Sweep`: stages, each a base config
(`file.py:arg`) with fixed overrides and a grid of swept overrides. A stage may start
from another stage's runs (`init_from='pretrain'`): it gets one member per member of that
stage (times its own grid), with `init.path` set to the sibling's workdir. Every member
runs in `WORKDIR/STAGE/NAME`, NAME spelling its swept values (`mask_ratio=0.75,seed=1`).

Running the same command again skips finished members and resumes an interrupted one
(the loop resumes bit for bit from its last checkpoint). A member that fails is reported
with its error line and the others go on; the command exits 1 at the end if any failed.
After each finished run (or with --report) the workdir gets results.csv, results.md and
PNG plots; with --results=DIR they go to DIR instead, beside a copy of what each finished
run's report needs (its metrics, and the weights of a run that other stages start from),
so that a committed DIR rebuilds the report on a new clone and a lost workdir costs only
the run in flight.

The parts, one module each: grid.py (sweep files, stages, members and their configs),
runner.py (running and resuming members), report.py (results.csv and results.md),
fits.py (frontier and power law), verdicts.py (a paper's claim judged on the runs),
plots.py (the figures), launch.py (SLURM and TPU-VM lines), record.py (the finished runs
kept under --results), cli.py (the command line).
"""

from vit_jax.sweep.cli import cli, main
from vit_jax.sweep.fits import doubling, fit_power_law, frontier
from vit_jax.sweep.grid import (Member, Stage, Sweep, check, expand, key_labels, load_config,
                                load_sweep, member_config, member_name, product, value_label,
                                zipped)
from vit_jax.sweep.launch import launch_lines
from vit_jax.sweep.plots import plot_metric, plot_scaling
from vit_jax.sweep.report import aggregate_seeds, main_metric, markdown_table, report, summarize
from vit_jax.sweep.runner import (ALONE, RECORD, Stop, alone_for, is_finished, machine,
                                  measure_steps_alone, old_steps_alone, read_metrics,
                                  read_steps_alone, run, run_member, shared_machine, step_key)
from vit_jax.sweep.verdicts import Claim, Group, judge, welch_interval

__all__ = ['ALONE', 'Claim', 'Group', 'Member', 'RECORD', 'Stage', 'Stop', 'Sweep',
           'aggregate_seeds', 'alone_for', 'check', 'cli', 'doubling', 'expand',
           'fit_power_law', 'frontier', 'is_finished', 'judge', 'key_labels', 'launch_lines',
           'load_config', 'load_sweep', 'machine', 'main', 'main_metric', 'markdown_table',
           'measure_steps_alone', 'member_config', 'member_name', 'old_steps_alone',
           'plot_metric', 'plot_scaling', 'product', 'read_metrics', 'read_steps_alone',
           'report', 'run', 'run_member', 'shared_machine', 'step_key', 'summarize',
           'value_label', 'welch_interval', 'zipped']

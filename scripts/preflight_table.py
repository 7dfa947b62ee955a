r"""The table of docs/preflight.md: every paper variant compiled for TPU slices.

  python scripts/preflight_table.py --output=docs/preflight_table.md

Runs vit_jax.preflight (needs libtpu) for each paper variant of configs/ on its paper's
hardware and on v4, v5e, v5p and v6e slices of as many chips, in the order of ROWS, and
adds one markdown row per run to --output as it goes (a run takes minutes of CPU); the
table keeps its rows in reading order (by recipe, model and slice). Rows already in
--output are skipped: rerunning the command continues the table. XLA compiles a program
on one core, so on a machine with N cores N commands with --shard=0/N ... --shard=N-1/N
fill the same table N times faster (each takes every N-th run).
Blocks are scanned (`model.scan=True`) for all variants: the compile is several times
faster, and tests/test_preflight.py checks that the scan-corrected estimate matches an
unrolled compile. Only the train step is compiled (evaluation needs less memory).
"""

import fcntl
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from vit_jax import preflight  # noqa: E402

_OUTPUT = flags.DEFINE_string('output', 'docs/preflight_table.md', 'Markdown rows go here.')
_ONLY = flags.DEFINE_integer('limit', 0, 'Run only the first N rows (0: all).')
_SHARD = flags.DEFINE_string('shard', '0/1', 'K/N: run every N-th row, from the K-th.')

# Slices of 64 chips for the MAE recipes (the paper's 128 v3 cores are 64 chips), of 4
# chips for ViT-S/16 (the paper's TPU v3-8).
MAE_SLICES = ('v3:8x8', 'v4:4x4x4', 'v5p:4x4x4', 'v5e:8x8', 'v6e:8x8')
SMALL_SLICES = ('v3:2x2', 'v4:2x2x1', 'v5p:2x2x1', 'v5e:2x2', 'v6e:2x2')
PRETRAIN = 'configs/mae_pretrain.py'
FINETUNE, PROBE, SCRATCH = ('configs/mae_finetune.py', 'configs/linear_probe.py',
                             'configs/vit_scratch.py')


def _variants(config_file, models, topologies):
  return [(config_file, f'model={m},data=imagenet2012', t) for t in topologies for m in models]


ROWS = (  # the runs the papers timed, then those of the MFU goal (v4, v5p), then the rest
    _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[:1])
    + [(SCRATCH, 'data=imagenet2012', SMALL_SLICES[0])]
    + _variants(PRETRAIN, ('B/16',), MAE_SLICES[:1])
    + _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[1:3])
    + _variants(FINETUNE, ('B/16', 'L/16'), MAE_SLICES[1:3])
    + [(SCRATCH, 'data=imagenet2012', t) for t in SMALL_SLICES[1:]]
    + _variants(FINETUNE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[:1])
    + _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[3:])
    + _variants(FINETUNE, ('H/14',), MAE_SLICES[1:3])
    + _variants(PROBE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[:1])
    + _variants(PRETRAIN, ('B/16',), MAE_SLICES[1:])
    + _variants(FINETUNE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[3:])
    + _variants(PROBE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[1:])
)
# The table's reading order: recipe, then model, then slice.
READING_ORDER = sorted(ROWS, key=lambda run: (
    (PRETRAIN, FINETUNE, PROBE, SCRATCH).index(run[0]), ('B/', 'L/', 'H/').index(
        run[1][6:8]) if run[1].startswith('model=') else 0,
    (MAE_SLICES + SMALL_SLICES).index(run[2])))
HEADER = ('| config | slice | fits (HBM per device) | step (s) | images/s | MFU | h/epoch '
          '| h for the run | chip-hours | compile (s) |\n|---|---|---|---|---|---|---|---|---|---|\n')


def _name(config_file: str, arg: str) -> str:
  return f'`{os.path.basename(config_file)}:{arg.replace(",data=imagenet2012", "")}`'


def row_key(config_file: str, arg: str, topology: str) -> str:
  """The first two cells of a run's row: how a rerun knows it is done."""
  return f'| {_name(config_file, arg)} | {topology} |'


def row(config_file: str, arg: str, topology: str) -> str:
  config = preflight.load_config(config_file, arg)
  config.model.scan = True
  start = time.perf_counter()
  name = _name(config_file, arg)
  try:
    report = preflight.run(config, topology, eval_step=False)
  except ValueError as e:
    return f'| {name} | {topology} | error: {e} | | | | | | | |'
  seconds = time.perf_counter() - start
  print('\n'.join(report.lines()), flush=True)
  if report.oom:  # the compiler ran out of memory: there is no memory analysis
    return f'| {name} | {topology} | **no** ({report.oom}) | | | | | | | {seconds:.0f} |'
  memory = f'{report.peak_memory / preflight.GiB:.1f} of {report.chip.hbm_bytes / preflight.GiB:.0f} GiB'
  if not report.fits:
    return f'| {name} | {topology} | **no** ({memory}) | | | | | | | {seconds:.0f} |'
  return (f'| {name} | {topology} | yes ({memory}) | {report.step_seconds:.3f} | '
          f'{report.images_per_second:,.0f} | {report.mfu:.0%} | {report.epoch_hours:.3f} | '
          f'{report.run_hours:.1f} | {report.chip_hours:,.0f} | {seconds:.0f} |')


def _add_row(output: str, line: str) -> None:
  """Adds `line` to the table in reading order, under a lock: other shards write too."""
  keys = [row_key(*run) for run in READING_ORDER]
  with open(output, 'a+') as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
    f.seek(0)
    lines = [old for old in f.read().splitlines()[2:] if old.strip()] + [line]
    lines.sort(key=lambda old: _place(old, keys))
    f.seek(0)
    f.truncate()
    f.write(HEADER + ''.join(old + '\n' for old in lines))


def _place(line: str, keys) -> int:
  """Where a row goes: the index of its run in READING_ORDER (unknown rows last)."""
  for i, key in enumerate(keys):
    if line.startswith(key):
      return i
  return len(keys)


def extend_table(output: str, rows, shard: int = 0, num_shards: int = 1) -> None:
  """Adds the row of each run of `rows` that `output` does not have yet; with `num_shards`
  > 1, only of every `num_shards`-th run, from the `shard`-th (the same runs at each rerun)."""
  if not os.path.exists(output):
    with open(output, 'w') as f:
      f.write(HEADER)
  with open(output) as f:
    done = f.read()
  for run in rows[shard::num_shards]:
    if row_key(*run) not in done:  # a rerun continues where the last one stopped
      _add_row(output, row(*run))


def main(argv):
  del argv
  shard, num_shards = (int(n) for n in _SHARD.value.split('/'))
  if not 0 <= shard < num_shards:
    raise app.UsageError(f'--shard={_SHARD.value}: K/N with 0 <= K < N, for example 0/2.')
  extend_table(_OUTPUT.value, ROWS[:_ONLY.value] if _ONLY.value else ROWS, shard, num_shards)


if __name__ == '__main__':
  app.run(main)

r"""The table of docs/preflight.md: every paper variant compiled for TPU slices.

  python scripts/preflight_table.py --output=docs/preflight_table.md

Runs vit_jax.preflight (needs libtpu) for each paper variant of configs/ on its paper's
hardware and on v4, v5e, v5p and v6e slices of as many chips, in the order of ROWS, and
appends one markdown row per run to --output as it goes (a run takes minutes of CPU).
Rows already in --output are skipped: rerunning the command continues the table.
Blocks are scanned (`model.scan=True`) for all variants: the compile is several times
faster, and tests/test_preflight.py checks that the scan-corrected estimate matches an
unrolled compile. Only the train step is compiled (evaluation needs less memory).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from vit_jax import preflight  # noqa: E402

_OUTPUT = flags.DEFINE_string('output', 'docs/preflight_table.md', 'Markdown rows go here.')
_ONLY = flags.DEFINE_integer('limit', 0, 'Run only the first N rows (0: all).')

# Slices of 64 chips for the MAE recipes (the paper's 128 v3 cores are 64 chips), of 4
# chips for ViT-S/16 (the paper's TPU v3-8).
MAE_SLICES = ('v3:8x8', 'v4:4x4x4', 'v5p:4x4x4', 'v5e:8x8', 'v6e:8x8')
SMALL_SLICES = ('v3:2x2', 'v4:2x2x1', 'v5p:2x2x1', 'v5e:2x2', 'v6e:2x2')
PRETRAIN = 'configs/mae_pretrain.py'
FINETUNE, PROBE, SCRATCH = ('configs/mae_finetune.py', 'configs/linear_probe.py',
                             'configs/vit_scratch.py')


def _variants(config_file, models, topologies):
  return [(config_file, f'model={m},data=imagenet2012', t) for t in topologies for m in models]


ROWS = (  # the runs the papers timed first
    _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[:1])
    + [(SCRATCH, 'data=imagenet2012', SMALL_SLICES[0])]
    + _variants(PRETRAIN, ('B/16',), MAE_SLICES[:1])
    + _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[1:3])
    + [(SCRATCH, 'data=imagenet2012', t) for t in SMALL_SLICES[1:]]
    + _variants(PRETRAIN, ('L/16', 'H/14'), MAE_SLICES[3:])
    + _variants(FINETUNE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[:1])
    + _variants(PROBE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[:1])
    + _variants(PRETRAIN, ('B/16',), MAE_SLICES[1:])
    + _variants(FINETUNE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[1:])
    + _variants(PROBE, ('B/16', 'L/16', 'H/14'), MAE_SLICES[1:])
)
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


def extend_table(output: str, rows) -> None:
  """Appends the row of each run of `rows` that `output` does not have yet, in order."""
  if not os.path.exists(output):
    with open(output, 'w') as f:
      f.write(HEADER)
  with open(output) as f:
    done = f.read()
  for config_file, arg, topology in rows:
    if row_key(config_file, arg, topology) in done:
      continue  # a rerun continues where the last one stopped
    line = row(config_file, arg, topology)
    with open(output, 'a') as f:
      f.write(line + '\n')


def main(argv):
  del argv
  extend_table(_OUTPUT.value, ROWS[:_ONLY.value] if _ONLY.value else ROWS)


if __name__ == '__main__':
  app.run(main)

r"""Speed of the training step: images/s, step time, FLOPs, MFU, compile time, memory.

  # A model, an objective, a batch size and a resolution, on synthetic data:
  python scripts/benchmark.py --model=ViT-B/16 --batch_size=8
  python scripts/benchmark.py --model=MAE-B/16 --objective=mae --batch_size=8 --scan
  # A config file's model, objective, optimizer and mesh (overrides as in vit_jax.main):
  python scripts/benchmark.py --config=configs/mae_pretrain.py:model=B/16 \
      --config.global_batch_size=8
  # The rows of issue 7, on this repository's 2-core CPU, in one run (about 4 minutes):
  python scripts/benchmark.py --preset=cpu_issue7 --output=benchmarks.jsonl
  # What scripts/gpu_check.sh runs on one GPU:
  python scripts/benchmark.py --preset=gpu_bf16
  # The studies' recipes (configs/fashion_mnist.py): each step alone, then the real
  # training loop on the full Fashion-MNIST, and the loop's share of its step's speed:
  python scripts/benchmark.py --preset=studies --output=docs/results/loop_efficiency.jsonl

The step is the training loop's own (`vit_jax.train.build_steps`: model, objective,
optimizer from the config, donated state, sharded over every local device), fed one
synthetic batch placed as the loop places its batches. After `--warmup` steps, each of
`--steps` steps is timed to completion; the best step gives images/s (the least
disturbed by other work on the machine) and the median is reported beside it.

FLOPs per step are counted twice: by hand (`vit_jax.metrics.forward_flops`: the matmuls of patch
embedding, attention projections, attention scores and values, MLP and head; MAE: the
encoder on the visible patches and the decoder on all; training = 3x forward, a linear
probe 1x forward plus 2x its head), and by XLA's cost analysis of the compiled step
(which counts a scanned loop body once, so it is low for scan=True). MFU is the hand
count over the step time and the peak: on CPU, the best rate of a float32 2048x2048
matmul measured throughout the same run (before, between and after the rows); on GPU and
TPU, the datasheet peak of the compute dtype (vit_jax.metrics.PEAK_FLOPS).

A preset of config files (`studies`) also runs each config's real training loop
(`python -m vit_jax.main` for `loop_steps` steps in a temporary workdir, no evaluation
and no checkpoint before the last step, on the dataset the config names) right after
timing that config's step, and compares the loop's images/s, the median of its logged
intervals after the first (which holds the compile), with the step's alone run back to
back (`--steps` steps, at most two in flight, as the loop dispatches them): what the loop
pays for reading, decoding and augmenting images, moving them to the devices and the
host's work between steps. One step at a time runs faster on the 2-core CPU than the
same steps back to back (about 3%, and 7-19% after idle CPUs), which no loop reaches;
both are shown.

Memory: XLA's memory analysis of the compiled step (arguments + outputs + temporaries -
donated aliases, per device), the growth of the process's peak RSS during the row (CPU),
and the device allocator's peak (GPU, cumulative over the process).

Needs jax, flax, optax, ml_collections and numpy, and what `vit_jax.train` imports
(orbax-checkpoint, grain, tensorflow-datasets; no dataset is read).
"""

import dataclasses
import json
import os
import platform
import resource
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vit_jax import metrics, models, sharding  # noqa: E402
from vit_jax import platform as platform_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmark: a model and objective at a batch size, resolution and dtype."""
  model: str
  batch_size: int
  objective: str | None = None  # None: 'mae' for MAE-*, else 'classification'
  image_size: int = 224
  dtype: str = 'float32'
  scan: bool = False
  remat_policy: str = 'none'
  mask_ratio: float | None = None

  @property
  def name(self) -> str:
    extras = [f'{self.dtype}', f'{self.image_size}px', f'batch {self.batch_size}']
    if self.scan:
      extras.append('scan')
    if self.remat_policy != 'none':
      extras.append(f'remat {self.remat_policy}')
    if self.mask_ratio is not None:
      extras.append(f'mask {self.mask_ratio:g}')
    return f'{self.model} ({", ".join(extras)})'


STUDY_CONFIGS = [f'configs/fashion_mnist.py:{variant}'
                 for variant in ('mae', 'finetune', 'scratch', 'probe')]

# Each preset: rows (or config files), and checks over the measured rows (see run_checks).
PRESETS = {
    # Issue 7, on a 2-core CPU: float32, 224x224.
    'cpu_issue7': dict(
        rows=[Row('ViT-B/16', 8), Row('ViT-S/16', 16), Row('MAE-B/16', 8, mask_ratio=0.75),
              Row('ViT-B/16', 8, scan=True)],
        checks=[('mfu', Row('ViT-B/16', 8), 0.60), ('mfu', Row('ViT-S/16', 16), 0.50),
                ('mae_speedup', (Row('ViT-B/16', 8), Row('MAE-B/16', 8, mask_ratio=0.75)), 0.9),
                ('compile_s', Row('ViT-B/16', 8, scan=True), 20.0)],
        steps=8, warmup=2),
    # One GPU (scripts/gpu_check.sh): bfloat16 compute, batch 256, scanned blocks.
    'gpu_bf16': dict(
        rows=[Row('ViT-B/16', 256, dtype='bfloat16', scan=True),
              Row('MAE-B/16', 256, dtype='bfloat16', scan=True, mask_ratio=0.75),
              Row('ViT-B/16', 256, dtype='float32', scan=True)],
        checks=[('mfu', Row('ViT-B/16', 256, dtype='bfloat16', scan=True), 0.50),
                ('mae_speedup', (Row('ViT-B/16', 256, dtype='bfloat16', scan=True),
                                 Row('MAE-B/16', 256, dtype='bfloat16', scan=True,
                                     mask_ratio=0.75)), 0.9)],
        steps=10, warmup=3),
    # The studies' recipes at batch 256 on a 2-core CPU, step alone and in the loop.
    'studies': dict(
        configs=STUDY_CONFIGS, loop_steps=200, loop_log_every=25,
        checks=[('loop', spec, 0.9) for spec in STUDY_CONFIGS],
        steps=20, warmup=3),
}


# ----------------------------------------------------------------- machine and timing


def cpu_busy_fraction(interval: float = 0.25) -> float:
  """Fraction of the machine's CPU time spent busy over `interval` seconds (Linux)."""
  def read():
    with open('/proc/stat') as f:
      values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # total, idle + iowait
  total, idle = read()
  time.sleep(interval)
  total2, idle2 = read()
  return 1.0 - (idle2 - idle) / max(total2 - total, 1)


def wait_until_idle(timeout: float = 60.0, threshold: float = 0.15) -> None:
  """Waits until other processes leave the CPUs alone (or `timeout` seconds pass)."""
  if not os.path.exists('/proc/stat'):
    return
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and cpu_busy_fraction() > threshold:
    time.sleep(0.5)


class Peak:
  """The peak FLOP/s of the machine (all local devices together) for a compute dtype.

  On CPU it is the best float32 matmul rate measured so far in this run: call
  `measure()` between rows; noise from other work only ever lowers a measurement.
  """

  def __init__(self, wait_idle: bool):
    self.platform = jax.devices()[0].platform
    self.wait_idle = wait_idle
    self.cpu_best = 0.0

  def measure(self) -> None:
    if self.platform == 'cpu':
      if self.wait_idle:
        wait_until_idle()
      self.cpu_best = max(self.cpu_best, metrics.measured_matmul_flops(2048, repeats=5))

  def get(self, dtype: str) -> tuple[float, str]:
    if self.platform == 'cpu':
      return self.cpu_best, 'measured f32 2048^3 matmul, best in this run'
    per_device, source = metrics.peak_flops_per_device(dtype)
    return per_device * jax.device_count(), source


def memory_bytes(compiled) -> dict:
  """XLA's memory analysis of a compiled function, per device (bytes)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    analysis = None
  if analysis is None:
    return {}
  args, outputs = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
  temp, alias = analysis.temp_size_in_bytes, analysis.alias_size_in_bytes
  return {'xla_total_bytes': int(args + outputs + temp - alias), 'xla_temp_bytes': int(temp),
          'xla_argument_bytes': int(args)}


def max_rss_bytes() -> int:
  scale = 1 if sys.platform == 'darwin' else 1024  # Linux reports KiB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------------- one row


def row_config(row: Row):
  """The training config of a row: the defaults of configs/ for its objective."""
  from vit_jax import config_utils  # pylint: disable=import-outside-toplevel
  objective = row.objective or ('mae' if row.model.startswith('MAE-') else 'classification')
  config = config_utils.base_config(objective)
  config.model_name = row.model
  config.model.update(dict(image_size=row.image_size, dtype=row.dtype, scan=row.scan,
                           remat_policy=row.remat_policy))
  if row.mask_ratio is not None:
    config.model.mask_ratio = row.mask_ratio
  config.global_batch_size = row.batch_size
  return config


def describe_config(config) -> Row:
  """The Row that names a config's model (for the table)."""
  model_fields = dict(config.model)
  size = model_fields.get('image_size', 224)
  return Row(config.model_name, config.global_batch_size, objective=config.objective,
             image_size=size if isinstance(size, int) else size[0],
             dtype=str(model_fields.get('dtype', 'float32')),
             scan=bool(model_fields.get('scan', False)),
             remat_policy=str(model_fields.get('remat_policy', 'none')),
             mask_ratio=model_fields.get('mask_ratio'))


def benchmark(config, *, num_classes: int = 1000, steps: int = 5, warmup: int = 2,
              wait_idle: bool = False) -> dict:
  """Compiles and times the training step of `config`; returns the measurements.

  The peak (and so MFU) is filled in by `finish` once every row has run.
  """
  from vit_jax import objectives, optim, train  # pylint: disable=import-outside-toplevel
  objective = objectives.get_objective(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.global_batch_size, mesh, 'global_batch_size')
  model = models.from_config(config, **objective.model_overrides(num_classes))
  # Any schedule will do: the step's cost does not depend on the learning rate.
  schedule = optim.learning_rate(config.optim, config.global_batch_size, total_steps=10**6,
                                 steps_per_epoch=1.0)
  built = train.build_steps(config, model, objective, mesh, schedule)
  state = built.init()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(config.global_batch_size, *models.input_shape(model))
                               ).astype(np.float32),
           'label': rng.integers(0, max(num_classes, 1),
                                 config.global_batch_size).astype(np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  rss_before = max_rss_bytes()
  start = time.perf_counter()
  lowered = built.train.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  for _ in range(max(warmup, 1)):
    state, step_metrics = compiled(state, batch)
  jax.block_until_ready(step_metrics)
  times = []
  for _ in range(steps):
    if wait_idle:
      wait_until_idle()
    start = time.perf_counter()
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    times.append(time.perf_counter() - start)
  # Back to back, as the training loop runs it (at most two steps in flight, no waiting
  # for idle CPUs): what a loop with no host work of its own would reach.
  start = time.perf_counter()
  in_flight = None
  for _ in range(steps):
    state, step_metrics = compiled(state, batch)
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = step_metrics
  jax.block_until_ready(in_flight)
  sustained_s = (time.perf_counter() - start) / steps
  loss = float(step_metrics['train/loss'])
  del state

  device = jax.devices()[0]
  gpu_peak = None
  if device.platform == 'gpu':
    gpu_peak = (device.memory_stats() or {}).get('peak_bytes_in_use')
  batch_size = config.global_batch_size
  best, median = min(times), float(np.median(times))
  return {
      'kind': 'step',
      'row': describe_config(config).name,
      'model': config.model_name, 'objective': config.objective, 'batch_size': batch_size,
      'image_size': list(models.layers.pair(model.image_size)),
      'dtype': str(jnp.dtype(model.dtype)), 'scan': model.scan,
      'remat_policy': model.remat_policy,
      'mask_ratio': getattr(model, 'mask_ratio', None),
      # What the compiled step runs, not what was asked for: cuDNN's fused attention
      # shows as a custom call.
      'attention': 'cudnn' if '__cudnn$fmha' in compiled.as_text() else 'softmax_attention',
      'platform': device.platform, 'device_kind': device.device_kind,
      'num_devices': mesh.devices.size, 'host': platform.node(),
      'jax': jax.__version__,
      'steps': steps, 'warmup': warmup, 'step_times_s': times,
      'step_time_s': best, 'step_time_median_s': median,
      'images_per_s': batch_size / best, 'images_per_s_median': batch_size / median,
      'images_per_s_sustained': batch_size / sustained_s,
      'analytic_flops_per_step': float(metrics.train_flops(model, config.objective) * batch_size),
      'analytic_forward_flops_per_example': float(metrics.forward_flops(model)),
      'xla_flops_per_step': metrics.compiled_flops(compiled) * mesh.devices.size,
      'lower_s': lower_s, 'compile_s': compile_s,
      **memory_bytes(compiled),
      'rss_growth_bytes': max_rss_bytes() - rss_before if device.platform == 'cpu' else None,
      'gpu_peak_bytes': gpu_peak,
      'loss': loss,
      'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
  }


def finish(result: dict, peak: Peak) -> dict:
  """Adds the peak and MFU (analytic and XLA counts) to a row's result."""
  peak_flops, source = peak.get(result['dtype'])
  result = dict(result, peak_flops=peak_flops, peak_source=source)
  for key, flops in (('mfu', result['analytic_flops_per_step']),
                     ('mfu_xla', result['xla_flops_per_step'])):
    result[key] = flops / result['step_time_s'] / peak_flops if peak_flops else float('nan')
  return result


def loop(spec: str, steps: int, log_every: int, overrides: tuple = ()) -> dict:
  """Images/s of the training loop of config `spec` ('configs/FILE.py:ARG', relative to
  the repository), run by vit_jax.main for `steps` steps in a temporary workdir, with
  `overrides` ('--config.KEY=VALUE' flags)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    result = subprocess.run(
        [sys.executable, '-m', 'vit_jax.main', f'--config={os.path.join(ROOT, spec)}',
         f'--workdir={workdir}', f'--config.total_steps={steps}',
         f'--config.log_every_steps={log_every}', '--config.eval_every_steps=0',
         f'--config.checkpoint_every_steps={steps}', *overrides],
        capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode:
      raise RuntimeError(f'The loop of {spec} failed:\n{result.stderr[-2000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [row['perf/images_per_sec'] for row in map(json.loads, f)
               if 'perf/images_per_sec' in row]
  return {'kind': 'loop', 'config': spec, 'overrides': list(overrides), 'loop_steps': steps,
          'loop_log_every': log_every,
          'loop_intervals_images_per_s': rates,
          'loop_images_per_s': float(np.median(rates[1:])),
          'time': time.strftime('%Y-%m-%dT%H:%M:%S')}


# --------------------------------------------------------------------- table, checks

COLUMNS = [('row', '{}'), ('images_per_s', '{:.2f}'), ('images_per_s_median', '{:.2f}'),
           ('images_per_s_sustained', '{:.2f}'),
           ('step_time_s', '{:.3f}'),
           ('step_time_median_s', '{:.3f}'), ('analytic_flops_per_step', '{:.4g}'),
           ('xla_flops_per_step', '{:.4g}'), ('mfu', '{:.1%}'), ('mfu_xla', '{:.1%}'),
           ('compile_s', '{:.1f}'), ('xla_total_bytes', '{}'), ('rss_growth_bytes', '{}'),
           ('gpu_peak_bytes', '{}')]
HEADERS = {'row': 'row', 'images_per_s': 'img/s', 'images_per_s_median': 'img/s (median)',
           'images_per_s_sustained': 'img/s (back to back)',
           'step_time_s': 's/step (best)',
           'step_time_median_s': 's/step (median)', 'analytic_flops_per_step':
           'FLOPs/step (analytic)', 'xla_flops_per_step': 'FLOPs/step (XLA)',
           'mfu': 'MFU', 'mfu_xla': 'MFU (XLA FLOPs)', 'compile_s': 'compile s',
           'xla_total_bytes': 'memory (XLA)', 'rss_growth_bytes': 'RSS growth',
           'gpu_peak_bytes': 'GPU peak mem'}


def _cell(key, fmt, value) -> str:
  if value is None:
    return '-'
  if key.endswith('_bytes'):
    return f'{value / 2**30:.2f} GiB'
  return fmt.format(value)


def table(results: list[dict]) -> str:
  """A markdown table of the rows (columns without any value are left out)."""
  columns = [(k, f) for k, f in COLUMNS if any(r.get(k) is not None for r in results)]
  lines = ['| ' + ' | '.join(HEADERS[k] for k, _ in columns) + ' |',
           '|' + '---|' * len(columns)]
  for result in results:
    lines.append('| ' + ' | '.join(_cell(k, f, result.get(k)) for k, f in columns) + ' |')
  return '\n'.join(lines)


def run_checks(checks, results: dict[Row, dict]) -> list[dict]:
  """Evaluates a preset's checks on the measured rows -> one dict per check.

  'loop' (config spec): the loop's images/s is at least target x the images/s of the same
  config's step alone run back to back (sustained), measured just before the loop.
  'mfu': the row's MFU is at least the target. 'compile_s': the row compiled in less
  than the target. 'mae_speedup' (vit_row, mae_row): MAE images/s is at least
  target x (ViT FLOPs per example / MAE FLOPs per example) x ViT images/s, the speed-up
  that the asymmetric encoder allows, with `target` of it kept.
  """
  out = []
  for kind, rows, target in checks:
    if kind == 'loop':
      step, run = results[rows], results[('loop', rows)]
      value = run['loop_images_per_s'] / step['images_per_s_sustained']
      out.append(dict(kind='check', check=f'loop of {rows}', value=value, target=target,
                      passed=value >= target,
                      text=(f'{run["loop_images_per_s"]:.0f} img/s in the loop, '
                            f'{step["images_per_s_sustained"]:.0f} for the step alone back '
                            f'to back: {value:.1%} >= {target:.0%} (one step at a time: '
                            f'{step["images_per_s_median"]:.0f} median, '
                            f'{run["loop_images_per_s"] / step["images_per_s_median"]:.1%})')))
    elif kind == 'mfu':
      value = results[rows]['mfu']
      out.append(dict(kind='check', check=f'MFU of {rows.name}', value=value, target=target,
                      passed=value >= target, text=f'{value:.1%} >= {target:.0%}'))
    elif kind == 'compile_s':
      value = results[rows]['compile_s']
      out.append(dict(kind='check', check=f'compile time of {rows.name}', value=value,
                      target=target, passed=value < target,
                      text=f'{value:.1f} s < {target:g} s'))
    elif kind == 'mae_speedup':
      vit, mae = results[rows[0]], results[rows[1]]
      flop_ratio = (vit['analytic_flops_per_step'] / vit['batch_size']) / (
          mae['analytic_flops_per_step'] / mae['batch_size'])
      needed = target * flop_ratio * vit['images_per_s']
      value = mae['images_per_s']
      out.append(dict(kind='check', check=f'{rows[1].name} vs {rows[0].name}', value=value,
                      target=needed, flop_ratio=flop_ratio, passed=value >= needed,
                      text=(f'{value:.2f} img/s >= {target:g} x {flop_ratio:.3f} (FLOP ratio) '
                            f'x {vit["images_per_s"]:.2f} = {needed:.2f} img/s; achieved '
                            f'{value / vit["images_per_s"]:.2f}x of {flop_ratio:.2f}x')))
    else:
      raise ValueError(f'Unknown check {kind!r}.')
  return out


def append_json(path: str, rows: list[dict]) -> None:
  with open(path, 'a') as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + '\n')


# ----------------------------------------------------------------------------- main


def define_flags() -> None:
  """The command line; defined when run as a script, so that tests can import the rest."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/FILE.py:ARG); its model, objective, optimizer, '
      'mesh and global_batch_size are benchmarked. Overrides: --config.KEY=VALUE.',
      lock_config=True)
  flags.DEFINE_enum('preset', None, list(PRESETS),
                    'A fixed set of rows (see PRESETS), with its checks.')
  flags.DEFINE_string('model', 'ViT-B/16', 'Model name (vit_jax.models.get_model).')
  flags.DEFINE_enum('objective', None, ['classification', 'mae', 'linear_probe'],
                    'Default: mae for MAE-* models, else classification.')
  flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
  flags.DEFINE_integer('image_size', 224, 'Side of the input images.')
  flags.DEFINE_string('dtype', 'float32', 'Compute dtype (parameters stay float32).')
  flags.DEFINE_bool('scan', False, 'nn.scan over the blocks.')
  flags.DEFINE_string('remat_policy', 'none', "'none', 'full' or a jax policy name.")
  flags.DEFINE_float('mask_ratio', None, 'MAE mask ratio (model default 0.75).')
  flags.DEFINE_integer('num_classes', 1000, 'Classes of the classifier head.')
  flags.DEFINE_integer('steps', 5, 'Timed steps per row.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_string('output', None, 'Append one JSON object per row to this file.')
  flags.DEFINE_bool(
      'wait_idle', False, 'Before each timed step and matmul measurement, wait (up to 60 s) '
      'until the CPUs are idle: for shared CPU machines (Linux). Presets on CPU turn it '
      'on unless the flag is given.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  preset = PRESETS.get(FLAGS.preset, {})
  steps = FLAGS.steps if FLAGS['steps'].present or not preset else preset['steps']
  warmup = FLAGS.warmup if FLAGS['warmup'].present or not preset else preset['warmup']
  platform_lib.use_every_cpu_core()  # as vit_jax.main does
  on_cpu = jax.devices()[0].platform == 'cpu'
  wait_idle = FLAGS.wait_idle if FLAGS['wait_idle'].present else bool(preset) and on_cpu
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # no 'Unable to initialize backend' lines

  classes = {}  # a job's number of classes, where not --num_classes
  if FLAGS.config is not None:
    jobs = [(describe_config(FLAGS.config), FLAGS.config)]
  elif preset.get('configs'):
    from vit_jax import config_utils, data  # pylint: disable=import-outside-toplevel
    jobs = []
    for spec in preset['configs']:
      path, _, arg = spec.partition(':')
      config = config_utils.load_config_file(os.path.join(ROOT, path), arg)
      data.ensure_prepared(config.data)  # before any compile: the loop reads it
      jobs.append((spec, config))
      classes[spec] = data.dataset_info(config.data).num_classes  # the loop's head
  elif preset:
    jobs = [(row, row_config(row)) for row in preset['rows']]
  else:
    row = Row(FLAGS.model, FLAGS.batch_size, objective=FLAGS.objective,
              image_size=FLAGS.image_size, dtype=FLAGS.dtype, scan=FLAGS.scan,
              remat_policy=FLAGS.remat_policy, mask_ratio=FLAGS.mask_ratio)
    jobs = [(row, row_config(row))]

  peak = Peak(wait_idle)
  device = jax.devices()[0]
  print(f'{jax.device_count()} {device.platform} device(s) ({device.device_kind}), '
        f'jax {jax.__version__}; {steps} timed steps after {warmup} warm-up steps per row.',
        flush=True)
  peak.measure()
  measured, loops = {}, {}
  for row, config in jobs:
    print(f'{getattr(row, "name", row)}: compiling and timing...', flush=True)
    measured[row] = benchmark(config, num_classes=classes.get(row, FLAGS.num_classes),
                              steps=steps, warmup=warmup, wait_idle=wait_idle)
    if isinstance(row, str):  # a preset's config file: two may share a model
      measured[row]['row'] = f'{row}: {measured[row]["row"]}'
      measured[row]['config'] = row
    result = measured[row]
    print(f'  {result["images_per_s"]:.2f} img/s, {result["step_time_s"]:.3f} s/step (best), '
          f'{result["images_per_s_sustained"]:.2f} img/s back to back, compiled in '
          f'{result["compile_s"]:.1f} s', flush=True)
    if preset.get('loop_steps'):  # right after its step, so that both see the same machine
      print(f'{row}: the training loop, {preset["loop_steps"]} steps...', flush=True)
      loops[('loop', row)] = loop(row, preset['loop_steps'], preset['loop_log_every'])
    peak.measure()
  results = {row: finish(result, peak) for row, result in measured.items()} | loops
  peak_flops, source = peak.get(str(jobs[0][1].model.get('dtype', 'float32')))
  print(f'\nPeak: {peak_flops / 1e12:.3f} TFLOP/s ({source}).\n')
  print(table([r for r in results.values() if r['kind'] == 'step']))
  checks = run_checks(preset.get('checks', []), results)
  for check in checks:
    print(f'{"PASS" if check["passed"] else "FAIL"}  {check["check"]}: {check["text"]}')
  if FLAGS.output:
    append_json(FLAGS.output, list(results.values()) + checks)
    print(f'\nAppended {len(results) + len(checks)} rows to {FLAGS.output}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)

r"""Pre-flight: compile a run for a TPU slice on this machine, before queueing for one.

  python -m vit_jax.preflight --config=configs/mae_pretrain.py:model=L/16,data=imagenet2012 \
      --topology=v3:8x8 [--num_slices=2] [--config.KEY=VALUE ...]
  python -m vit_jax.preflight --all        # every paper variant on its paper's hardware

Needs `libtpu` (requirements-tpu.txt), no TPU: JAX describes the devices of a TPU
topology (`jax.experimental.topologies`) and compiles for them. The run's own train and
eval steps are compiled (`train.build_steps`, the same mesh, sharding rules and
donation as the training loop) on abstract inputs: no dataset is read, the split sizes
and class counts of the paper datasets are known here (others come from the prepared
dataset's metadata). It prints, per device:

  * HBM: arguments (parameters, optimizer state, batch), temporaries, generated code and
    their sum against the chip's HBM; 'fits (N% of HBM)', or 'does not fit' with what
    would help, and exit status 1 (also when the compiler itself runs out of memory);
  * XLA's cost-model step time and, from it, images/s, MFU against the chip's bfloat16
    peak (model FLOPs counted by hand, as metrics.py does for a real run), hours per
    epoch and for the run, chip-hours.

XLA's cost analysis counts the body of a loop once, so a scanned model (model.scan) or
gradient accumulation would look 10x too fast. The step time is therefore estimated
from unrolled compiles of the same model at depth 1 and 2 (encoder and, for MAE,
decoder), extrapolated linearly to the real depth; gradient accumulation is estimated
as grad_accum_steps micro-batch steps. Memory always comes from the compile of the real
configuration. tests/test_preflight.py checks the extrapolation against a full unrolled
compile.
"""

import collections
import dataclasses
import functools
import glob
import math
import os
import re
import sys
import tempfile
from typing import Any

# No TPU here: compiling for one needs only libtpu's compiler. Keep JAX's own backend on
# the CPU so that libtpu does not try to open a TPU at start-up.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu takes a machine-wide lock file for the TPU it would drive; compiling drives
# none, so several pre-flights (and tests) may run at once.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax import config_utils, data, metrics, models, objectives, optim, sharding, train  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, per JAX device (a core on v2/v3, a chip elsewhere)."""
  name: str
  hbm_bytes: float
  peak_bf16: float  # dense bfloat16 FLOP/s
  devices_per_chip: int
  topology_options: tuple = ()  # extra arguments of get_topology_desc


# Datasheet numbers. v2 and v3 expose each of a chip's two cores as a device (8 and 16
# GiB of HBM per core); v4 and v5p join the two cores of a chip into one device
# (megacore), v5e and v6e have one core per chip.
CHIPS = {
    'v2': Chip('TPU v2', 8 * GiB, 45e12 / 2, 2),
    'v3': Chip('TPU v3', 16 * GiB, 123e12 / 2, 2),
    'v4': Chip('TPU v4', 32 * GiB, 275e12, 1, (('chip_config_name', 'megacore'),)),
    'v5e': Chip('TPU v5e', 16 * GiB, 197e12, 1),
    'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 1),
    'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1),
}

# Split sizes and classes of datasets a paper config names, so that no dataset is read.
KNOWN_DATASETS = {
    'imagenet2012': (1000, {'train': 1_281_167, 'validation': 50_000}),
}

# The paper variants of configs/ (the hardware is in each file's docstring).
PAPER_VARIANTS = (
    ('configs/mae_pretrain.py', 'model=B/16,data=imagenet2012'),
    ('configs/mae_pretrain.py', 'model=L/16,data=imagenet2012'),
    ('configs/mae_pretrain.py', 'model=H/14,data=imagenet2012'),
    ('configs/mae_finetune.py', 'model=B/16,data=imagenet2012'),
    ('configs/mae_finetune.py', 'model=L/16,data=imagenet2012'),
    ('configs/mae_finetune.py', 'model=H/14,data=imagenet2012'),
    ('configs/linear_probe.py', 'model=B/16,data=imagenet2012'),
    ('configs/linear_probe.py', 'model=L/16,data=imagenet2012'),
    ('configs/linear_probe.py', 'model=H/14,data=imagenet2012'),
    ('configs/vit_scratch.py', 'data=imagenet2012'),
)

_TOPOLOGY = re.compile(r'^(?P<gen>v\d+[a-z]?):(?P<dims>\d+(x\d+){1,2})$')


@dataclasses.dataclass(frozen=True)
class Slice:
  topology: str
  chip: Chip
  num_chips: int  # over all slices
  num_slices: int
  devices: tuple


def parse_topology(topology: str) -> tuple[Chip, int]:
  """'v4:4x4x4' -> (CHIPS['v4'], 64 chips)."""
  match = _TOPOLOGY.match(topology)
  if not match or match['gen'] not in CHIPS:
    raise ValueError(f'--topology={topology!r} is not GENERATION:AxB[xC] with a generation in '
                     f'{sorted(CHIPS)}, e.g. v3:8x8 (128 cores), v4:4x4x4, v5e:16x16.')
  return CHIPS[match['gen']], int(np.prod([int(d) for d in match['dims'].split('x')]))


def tpu_slice(topology: str, num_slices: int = 1) -> Slice:
  """The JAX devices of `num_slices` slices of `topology` (needs libtpu, not a TPU)."""
  chip, chips_per_slice = parse_topology(topology)
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices} must be at least 1.')
  if not libtpu_available():
    raise ValueError('compiling for a TPU needs libtpu: pip install -r requirements-tpu.txt')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    description = topologies.get_topology_desc(
        topology_name=topology, platform='tpu', num_slices=num_slices,
        **dict(chip.topology_options))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--topology={topology}: {str(e).splitlines()[0]}') from None
  return Slice(topology, chip, chips_per_slice * num_slices, num_slices,
               tuple(description.devices))


def libtpu_available() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec('libtpu') is not None


def dataset_sizes(data_config) -> tuple[int, int, int]:
  """(num_classes, train examples, eval examples) without reading the dataset's records."""
  known = KNOWN_DATASETS.get(data_config.name)
  if known and data_config.train_split in known[1] and data_config.eval_split in known[1]:
    num_classes, splits = known
    return num_classes, splits[data_config.train_split], splits[data_config.eval_split]
  data.ensure_prepared(data_config)  # the built-in demo; any other must be prepared
  info = data.dataset_info(data_config)
  return (info.num_classes, info.split_size(data_config.train_split),
          info.split_size(data_config.eval_split))


@dataclasses.dataclass
class Memory:
  """Per-device bytes of one compiled step."""
  arguments: int
  outputs: int  # not aliased to (donated) arguments
  temporaries: int
  code: int
  parts: dict  # bytes of the arguments by part: parameters, optimizer state, batch

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.code

  @classmethod
  def of(cls, compiled, parts: dict) -> 'Memory':
    stats = compiled.memory_analysis()
    return cls(arguments=stats.argument_size_in_bytes,
               outputs=max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0),
               temporaries=stats.temp_size_in_bytes,
               code=stats.generated_code_size_in_bytes, parts=parts)

  def describe(self) -> str:
    parts = ', '.join(f'{k} {v / GiB:.2f}' for k, v in self.parts.items())
    return (f'arguments {self.arguments / GiB:.2f} GiB (by shape, before TPU tiling: '
            f'{parts}), temporaries '
            f'{self.temporaries / GiB:.2f} GiB, outputs {self.outputs / GiB:.2f} GiB, '
            f'code {self.code / GiB:.2f} GiB: {self.total / GiB:.2f} GiB')


def bytes_per_device(tree) -> int:
  """Largest per-device shard of the ShapeDtypeStructs of `tree` (with .sharding), summed."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Report:
  """What `run` found; `lines()` is what the command prints."""
  title: str
  chip: Chip
  num_devices: int
  num_chips: int
  train_memory: Memory | None
  eval_memory: Memory | None
  oom: str = ''  # the compiler's out-of-memory message, if it ran out
  step_seconds: float = float('nan')
  estimate_source: str = ''
  xla_flops_per_step: float = float('nan')  # all devices, from the estimate's compiles
  model_flops_per_step: float = float('nan')  # all devices, counted by hand
  global_batch_size: int = 0
  steps_per_epoch: float = 0.0
  total_steps: int = 0
  hints: tuple = ()
  breakdown: tuple = ()  # (operation, share of the estimated step), costliest first

  @property
  def peak_memory(self) -> int:
    return max(m.total for m in (self.train_memory, self.eval_memory) if m is not None)

  @property
  def fits(self) -> bool:
    return not self.oom and self.peak_memory <= self.chip.hbm_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.peak_memory / self.chip.hbm_bytes

  @property
  def images_per_second(self) -> float:
    return self.global_batch_size / self.step_seconds

  @property
  def mfu(self) -> float:
    return self.model_flops_per_step / self.step_seconds / (
        self.chip.peak_bf16 * self.num_devices)

  @property
  def epoch_hours(self) -> float:
    return self.steps_per_epoch * self.step_seconds / 3600

  @property
  def run_hours(self) -> float:
    return self.total_steps * self.step_seconds / 3600

  @property
  def chip_hours(self) -> float:
    return self.run_hours * self.num_chips

  def lines(self) -> list[str]:
    out = [self.title]
    hbm = f'{self.chip.hbm_bytes / GiB:.0f} GiB'
    for name, memory in (('train step', self.train_memory), ('eval step', self.eval_memory)):
      if memory is not None:
        out.append(f'  {name}, per device: {memory.describe()} of {hbm}')
    if self.oom:
      out.append(f'  does not fit: the compiler ran out of memory ({self.oom})')
    elif self.fits:
      out.append(f'  fits ({self.hbm_fraction:.0%} of HBM)')
    else:
      out.append(f'  does not fit ({self.hbm_fraction:.0%} of HBM)')
    out += [f'  would help: {hint}' for hint in self.hints]
    if math.isfinite(self.step_seconds):
      out.append(
          f'  estimated step {self.step_seconds:.3f} s ({self.estimate_source}): '
          f'{self.images_per_second:,.0f} images/s, MFU {self.mfu:.1%} of the bfloat16 peak '
          f'({self.chip.peak_bf16 / 1e12:.1f} TFLOP/s per device; model FLOPs by hand, '
          f'XLA counts {self.xla_flops_per_step / self.model_flops_per_step:.2f}x that)')
      out.append(
          f'  {self.epoch_hours:.3f} h per epoch; {self.run_hours:.1f} h for the run '
          f'({self.total_steps:,} steps of {self.global_batch_size}); '
          f'{self.chip_hours:,.0f} chip-hours on {self.num_chips} chips')
    if self.breakdown:
      out.append(f'  where the estimated step goes (the cost model\'s cycles by operation, '
                 f'the {len(self.breakdown)} costliest):')
      out += [f'    {share:6.1%} {share * self.step_seconds * 1e3:8.2f} ms  {name}'
              for name, share in self.breakdown]
    return out


def _abstract_batch(mesh, batch_size: int, model, *, eval_batch: bool) -> dict:
  shard = sharding.batch_sharding(mesh)
  size = models.layers.pair(model.image_size)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, *size, model.channels), jnp.float32,
                                         sharding=shard),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=shard)}
  if eval_batch:
    batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=shard)
  return batch


@dataclasses.dataclass
class _Setup:
  model: Any
  objective: Any
  mesh: Any
  steps: train.Steps
  total_steps: int
  steps_per_epoch: float


def _setup(config, devices, num_classes: int, train_size: int) -> _Setup:
  """What train_and_evaluate builds before its loop, on the given devices."""
  objective = objectives.get_objective(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  sharding.check_batch_size(config.global_batch_size, mesh, 'global_batch_size')
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  train.check_micro_batches(config, mesh)
  model = models.get_model(config.model_name, **{
      **objective.model_overrides(num_classes), **config.model})
  total_steps, steps_per_epoch = train.num_train_steps(config, train_size)
  schedule = optim.learning_rate(config.optim, config.global_batch_size, total_steps,
                                 steps_per_epoch)
  steps = train.build_steps(config, model, objective, mesh, schedule)
  return _Setup(model, objective, mesh, steps, total_steps, steps_per_epoch)


def _compile_train(setup: _Setup, global_batch_size: int, compiler_options=None):
  batch = _abstract_batch(setup.mesh, global_batch_size, setup.model, eval_batch=False)
  lowered = setup.steps.train.lower(setup.steps.abstract_state, batch)
  return lowered.compile(compiler_options=compiler_options), batch


def hlo_text(compiled, recompile) -> str:
  """The optimized HLO of `compiled`, as text.

  `compiled.as_text()` re-reads the program, which fails for some TPU programs (MAE's and
  the probe's on v6e: 'Async done requires its operand to be an asynchronous op'). Then
  `recompile(compiler_options)` compiles the step again with XLA's dump of the optimized
  program switched on, and the dumped text is read instead.
  """
  try:
    return compiled.as_text()
  except jax.errors.JaxRuntimeError:
    cache = jax.config.jax_enable_compilation_cache
    with tempfile.TemporaryDirectory() as folder:
      jax.config.update('jax_enable_compilation_cache', False)  # a cached program dumps nothing
      try:
        recompile({'xla_dump_to': folder, 'xla_dump_hlo_as_text': True,
                   'xla_dump_hlo_module_re': 'train_step', 'xla_dump_hlo_pass_re': '^$'})
      finally:
        jax.config.update('jax_enable_compilation_cache', cache)
      # The program as compiled, with the cost model's cycles (as as_text() has them).
      dumped = glob.glob(os.path.join(folder, '*train_step*.after_codegen.txt'))
      if len(dumped) != 1:
        raise ValueError(f'No optimized program of the train step in XLA\'s dump: {dumped}')
      with open(dumped[0]) as f:
        return f.read()


def _compile_eval(setup: _Setup, eval_batch_size: int):
  state = setup.steps.abstract_state
  batch = _abstract_batch(setup.mesh, eval_batch_size, setup.model, eval_batch=True)
  return setup.steps.eval.lower(state['params'], state['model_state'], batch).compile()


_UNCOSTED = ('ConcatBitcast', 'NopReturnToken')


def _cost(compiled, text) -> tuple[float, float]:
  """(XLA's step seconds, FLOPs per device) from the cost analysis; `text()`: `hlo_text`,
  read only when needed.

  The TPU compiler inserts custom calls that do no work and that the cost model counts
  as -1 s each (`_UNCOSTED`: 'ConcatBitcast', a relayout, and on v6e 'NopReturnToken',
  after an asynchronous slice); they are counted as 0 here.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  seconds = float(analysis['optimal_seconds'])
  if seconds < 0:
    seconds += sum(text().count(f'custom_call_target="{name}"') for name in _UNCOSTED)
  if seconds < 0:
    raise ValueError("XLA's cost model could not cost the step (optimal_seconds "
                     f"{seconds:.3f}); run with --noestimate for the memory only.")
  return seconds, float(analysis['flops'])


_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OPCODE = re.compile(r'= \S+ ([\w-]+)\(')


def operation(op_name: str) -> str:
  """A readable name for the JAX operation an HLO instruction came from, the same for
  every block of a stack: 'jit(train_step)/transpose(jvp(MAE))/Decoder/encoderblock_3/
  MlpBlock_0/Dense_1/dot_general' -> 'backward MAE/Decoder/encoderblock/MlpBlock/Dense/dot_general'."""
  name = re.sub(r'^jit\([^)]*\)/', '', op_name)
  for wrapper, label in ((r'transpose\(jvp\((\w+)\)\)', 'backward '), (r'jvp\((\w+)\)', 'forward ')):
    if re.match(wrapper, name):
      name = label + re.sub(wrapper, r'\1', name, count=1)
      break
  return re.sub(r'_\d+(?=/|$)', '', name)


def op_cycles(text: str) -> dict:
  """{operation: cycles} of a compiled TPU step (`hlo_text`): the `estimated_cycles` that
  XLA's cost model gives each top-level instruction (a fusion, a collective, a copy),
  summed by the JAX operation it came from (`operation`); instructions without one by
  their opcode."""
  start = text.find('\nENTRY')
  entry = text[start:text.index('\n}\n', start)] if start >= 0 else ''
  cycles = collections.Counter()
  for line in entry.splitlines():
    found = _CYCLES.search(line)
    if found:
      op_name, opcode = _OP_NAME.search(line), _OPCODE.search(line)
      name = operation(op_name[1]) if op_name else f'({opcode[1] if opcode else "?"})'
      cycles[name] += int(found[1])
  return dict(cycles)


def _shares(cycles: dict, top: int) -> tuple:
  total = sum(cycles.values())
  ranked = sorted(cycles.items(), key=lambda item: -item[1])[:top]
  return tuple((name, count / total) for name, count in ranked) if total > 0 else ()


def _with_model(config, **model_fields) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.update(model_fields)
  return config


def _stacks(model) -> dict:
  """{field: depth} of the block stacks a scan would hide from XLA's cost analysis."""
  stacks = {'depth': model.depth}
  if isinstance(model, models.MAE):
    stacks['decoder_depth'] = model.decoder_depth
  return stacks


def estimate_step(config, devices, num_classes: int, train_size: int, model,
                  compiled=None, *, by_operation: bool = True) -> tuple[float, float, str, dict]:
  """(seconds, XLA FLOPs on all devices, how, {operation: cycles}) of one training step,
  by XLA's cost model.

  `compiled`: the real step, used as it is when it has no loop that hides work.
  Scanned blocks and accumulated micro-batches are loops whose body XLA counts once:
  the step is compiled unrolled at depth 1 and with one more block in each stack, and
  the difference (the cost of a block) is extrapolated to the model's depths; with
  gradient accumulation, one micro-batch step is costed and multiplied. The cycles by
  operation (`op_cycles`) are extrapolated the same way; without `by_operation` they are
  not read (`{}`), which spares reading the program's text (a recompile on v6e).
  """
  accumulation = config.grad_accum_steps
  micro_batch = config.global_batch_size // accumulation
  if accumulation > 1:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.grad_accum_steps = 1
      config.global_batch_size = micro_batch

  def cost_of(variant, step=None) -> tuple[np.ndarray, collections.Counter]:
    setup = _setup(variant, devices, num_classes, train_size)
    if step is None:
      step, _ = _compile_train(setup, micro_batch)
    text = functools.cache(
        lambda: hlo_text(step, lambda options: _compile_train(setup, micro_batch, options)))
    cost = np.array(_cost(step, text))
    return cost, collections.Counter(op_cycles(text()) if by_operation else {})

  if not model.scan:
    how = 'XLA cost model of the compiled step'
    total, cycles = cost_of(config, compiled if compiled and accumulation == 1 else None)
  else:
    how = ('XLA cost model; scanned blocks estimated from unrolled compiles at depth 1 and 2, '
           'extrapolated')
    stacks = _stacks(model)
    base = {k: 1 for k in stacks}
    base_cost, base_cycles = cost_of(_with_model(config, scan=False, **base))
    total, cycles = base_cost.copy(), base_cycles.copy()
    for field, depth in stacks.items():
      cost, more_cycles = cost_of(_with_model(config, scan=False, **(base | {field: 2})))
      total += (depth - 1) * (cost - base_cost)
      for name in more_cycles.keys() | base_cycles.keys():  # a block's cycles, never < 0
        cycles[name] += (depth - 1) * max(more_cycles[name] - base_cycles[name], 0)
  if accumulation > 1:
    how += f'; {accumulation} micro-batches of {micro_batch}'
  seconds, flops = total
  return seconds * accumulation, flops * accumulation * len(devices), how, dict(cycles)


def _out_of_memory(error: Exception) -> str:
  text = str(error)
  if 'RESOURCE_EXHAUSTED' in text or 'ran out of memory' in text.lower():
    first = next((line for line in text.splitlines() if 'memory' in line.lower()),
                 text.splitlines()[0])
    return first.strip()[:300]
  return ''


def _oom_temporaries(message: str) -> float:
  """Bytes of temporaries that a compiler out-of-memory message names, else 0."""
  match = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\)', message)
  return float(match[1]) * 1024**'KMGT'.index(match[2]) * 1024 if match else 0.0


def _hints(config, model, report: Report, state_bytes: int) -> tuple[str, ...]:
  """What would make a run that does not fit fit."""
  chip, memory = report.chip, report.train_memory
  hints = []
  if all(rule == 'replicate' for _, rule in config.sharding_rules) and (
      state_bytes > 0.2 * chip.hbm_bytes):
    axis = next((name for name, size in config.mesh if size == -1), config.mesh[0][0])
    hints.append('shard parameters and optimizer state (FSDP): '
                 f'--config.sharding_rules="[(\'.*\', \'fsdp:{axis}\')]"')
  if model.remat_policy == 'none':
    hints.append('recompute activations in the backward pass: '
                 '--config.model.remat_policy=nothing_saveable')
  temporaries = memory.temporaries if memory else _oom_temporaries(report.oom)
  room = chip.hbm_bytes - (memory.total - memory.temporaries if memory else state_bytes)
  if temporaries > 0 and room > 0:
    factor = 2 ** math.ceil(math.log2(max(temporaries / room, 2)))
    hints.append(f'gradient accumulation: --config.grad_accum_steps='
                 f'{factor * config.grad_accum_steps} (same global batch, {factor}x smaller '
                 'micro-batches)')
  hints.append('a smaller per-device batch: more chips for the same '
               f'global_batch_size={config.global_batch_size}, or a smaller one')
  return tuple(hints)


def run(config, topology: str, num_slices: int = 1, *, estimate: bool = True,
        eval_step: bool = True, breakdown: int = 0) -> Report:
  """Compiles the run of `config` for `topology` and reports memory and estimated time;
  with `breakdown`, also the `breakdown` costliest operations of the estimated step."""
  train.check_loop_keys(config)
  tpu = tpu_slice(topology, num_slices)
  num_classes, train_size, _ = dataset_sizes(config.data)
  setup = _setup(config, tpu.devices, num_classes, train_size)
  model = setup.model
  slices = f' x {num_slices} slices' if num_slices > 1 else ''
  title = (f'{config.model_name} ({config.objective}), batch {config.global_batch_size}, on '
           f'{topology}{slices}: {len(tpu.devices)} devices ({tpu.num_chips} chips, '
           f'{tpu.chip.name}), mesh {dict(setup.mesh.shape)}')
  state = setup.steps.abstract_state
  parts = {'parameters': bytes_per_device(state['params']) + bytes_per_device(state['ema_params']),
           'optimizer state': bytes_per_device(state['opt_state'])}
  report = Report(title=title, chip=tpu.chip, num_devices=len(tpu.devices),
                  num_chips=tpu.num_chips, train_memory=None, eval_memory=None,
                  global_batch_size=config.global_batch_size,
                  steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
  try:
    compiled, batch = _compile_train(setup, config.global_batch_size)
    report.train_memory = Memory.of(compiled, parts | {'batch': bytes_per_device(batch)})
    if eval_step:
      compiled_eval = _compile_eval(setup, config.eval_batch_size)
      report.eval_memory = Memory.of(compiled_eval, {'parameters': parts['parameters']})
  except Exception as e:  # pylint: disable=broad-except
    report.oom = _out_of_memory(e)
    if not report.oom:
      raise
  if not report.fits:
    report.hints = _hints(config, model, report, parts['parameters'] + parts['optimizer state'])
    return report
  if estimate:
    seconds, flops, how, cycles = estimate_step(config, tpu.devices, num_classes, train_size,
                                                model, compiled, by_operation=breakdown > 0)
    report.step_seconds, report.xla_flops_per_step, report.estimate_source = seconds, flops, how
    report.breakdown = _shares(cycles, breakdown)
    report.model_flops_per_step = float(
        metrics.train_flops(model, config.objective) * config.global_batch_size)
  return report


def paper_hardware(config_file: str) -> str:
  """The --topology=... that a config file's docstring gives for its paper's hardware."""
  with open(config_file) as f:
    match = re.search(r'--topology=(\S+?)[`)\s]', f.read())
  if not match:
    raise ValueError(f'{config_file}: its docstring names no --topology=... hardware.')
  return match[1]


def load_config(config_file: str, arg: str) -> ml_collections.ConfigDict:
  return config_utils.load_config_file(config_file, arg)


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  del argv
  flag_values = flags.FLAGS
  configs = []
  if flag_values.all:
    for config_file, arg in PAPER_VARIANTS:
      configs.append((load_config(config_file, arg),
                      flag_values.topology or paper_hardware(config_file)))
  else:
    if flag_values.config is None or not flag_values.topology:
      raise app.UsageError('Give --config=FILE:ARG and --topology=GEN:AxB[xC], or --all.')
    configs.append((flag_values.config, flag_values.topology))
  status = 0
  for config, topology in configs:
    try:
      report = run(config, topology, flag_values.num_slices, estimate=flag_values.estimate,
                   breakdown=flag_values.breakdown)
    except ValueError as e:
      print(f'Error: {e}', file=sys.stderr)
      status = 1
      continue
    print('\n'.join(report.lines()), flush=True)
    status = status or int(not report.fits)
  sys.exit(status)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', None, 'Config file, with :ARG.', lock_config=True)
  flags.DEFINE_string('topology', '', 'TPU topology, GENERATION:AxB[xC], e.g. v3:8x8, v4:4x4x4.')
  flags.DEFINE_integer('num_slices', 1, 'Number of slices (multi-slice data parallelism).')
  flags.DEFINE_bool('all', False, 'Every paper variant of configs/ on its paper hardware '
                    '(or on --topology).')
  flags.DEFINE_bool('estimate', True, 'Estimate the step time (extra small compiles).')
  flags.DEFINE_integer('breakdown', 0, 'Also print the N costliest operations of the '
                       'estimated step (cycles of XLA\'s cost model by JAX operation).')


def cli():
  """Console entry point (vit-jax-preflight)."""
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  _define_flags()
  _app.run(main)


if __name__ == '__main__':
  cli()

"""Sweep files and their members: the grid of overrides, stages, names and configs."""

import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Iterable

from vit_jax.sweep.verdicts import values_equal


def product(*axes) -> list[dict]:
  """The cartesian product of grids. Each axis is a dict {key: [values]} (itself a
  product over its keys, in order) or a list of override dicts (e.g. from `zipped`).

  product({'a': [1, 2]}, {'seed': [0, 1]}) -> [{a:1,seed:0}, {a:1,seed:1}, {a:2,...}, ...]
  """
  grids = []
  for axis in axes:
    if isinstance(axis, dict):
      keys = list(axis)
      grids.append([dict(zip(keys, values))
                    for values in itertools.product(*(_as_list(axis[k], k) for k in keys))])
    else:
      grids.append([dict(member) for member in axis])
  return [dict(itertools.chain.from_iterable(m.items() for m in combo))
          for combo in itertools.product(*grids)]


def zipped(axis: dict) -> list[dict]:
  """Values taken together: zipped({'model.width': [64, 128], 'model.depth': [2, 4]}) ->
  [{width 64, depth 2}, {width 128, depth 4}]. All lists must have the same length."""
  lengths = {k: len(_as_list(v, k)) for k, v in axis.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'zipped: the value lists have different lengths {lengths}.')
  keys = list(axis)
  return [dict(zip(keys, values)) for values in zip(*(axis[k] for k in keys))]


def _as_list(values, key) -> list:
  if not isinstance(values, (list, tuple)):
    raise ValueError(f'The values of {key!r} must be a list, not {values!r}.')
  return list(values)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One kind of run in a sweep.

  Attributes:
    name: the stage's folder under the sweep's workdir ('pretrain', 'finetune', ...).
    config: the base config, 'configs/FILE.py:ARG' (relative to the repository root or
      the current directory).
    overrides: fixed `config.KEY` values of every member, {'data.name': 'fashion_mnist'}.
    grid: the swept overrides, a list of dicts (see `product` and `zipped`); [{}] is one run.
    init_from: a stage whose members each start this stage's runs (init.path is set to
      that member's workdir); '' for none.
    inherit: keys of the parent member's swept values also applied to this stage's
      config (e.g. 'seed': a fine-tuning run uses its pretraining run's seed).
    parents: with init_from, only the members of that stage whose swept values include
      these ({'model.mask_ratio': 0.75}; a list of values allows each); {}: all of them.
  """
  name: str
  config: str
  overrides: dict = dataclasses.field(default_factory=dict)
  grid: list = dataclasses.field(default_factory=lambda: [{}])
  init_from: str = ''
  inherit: tuple = ('seed',)
  parents: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Stages in dependency order, and how to report them.

  Attributes:
    stages: the stages; one named in `init_from` must come before the stage naming it.
    scaling: for compute-scaling sweeps, the swept key that names the model size (one
      curve per value), e.g. 'model.width'; '' for none.
    title: the heading of results.md.
    claims: vit_jax.sweep.verdicts.Claim's judged on the finished runs, one verdict line
      each at the top of results.md.
  """
  stages: list
  scaling: str = ''
  title: str = ''
  claims: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Member:
  """One run of a sweep."""
  stage: Stage
  name: str
  workdir: str
  values: dict  # the swept values that name it, its parents' included (for the report)
  overrides: dict  # every config.KEY override its command line gets
  parent: 'Member | None' = None

  @property
  def label(self) -> str:
    return f'{self.stage.name}/{self.name}'

  def command(self, python: str = 'python') -> list[str]:
    return ([python, '-m', 'vit_jax.main', f'--config={self.stage.config}',
             f'--workdir={self.workdir}'] +
            [f'--config.{k}={format_value(v)}' for k, v in self.overrides.items()])


def format_value(value) -> str:
  """A config value as config_flags parses it from the command line."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def load_sweep(path: str) -> Sweep:
  """Runs the sweep file's get_sweep()."""
  if not os.path.isfile(path):
    raise ValueError(f'--sweep={path!r}: no such file (sweep files are in configs/sweeps/).')
  spec = importlib.util.spec_from_file_location('_vit_jax_sweep_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path}: a sweep file defines get_sweep() returning a vit_jax.sweep.Sweep.')
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise ValueError(f'{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep.')
  return sweep


_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')


def value_label(value) -> str:
  """0.75 -> '0.75', 'ViT-S/16' -> 'ViT-S_16', (0.2, 1.0) -> '0.2_1.0': filesystem-safe."""
  if isinstance(value, (list, tuple)):
    return '_'.join(value_label(v) for v in value)
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
    value = int(value) if not isinstance(value, bool) else value
  return _UNSAFE.sub('_', str(value))


def key_labels(keys: Iterable[str]) -> dict:
  """Short, unambiguous names of swept keys: the last part of the dotted key
  ('model.mask_ratio' -> 'mask_ratio'), the full key where two keys share it."""
  keys = list(dict.fromkeys(keys))
  last = [k.split('.')[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def member_name(values: dict, labels: dict) -> str:
  if not values:
    return 'base'
  return ','.join(f'{labels[k]}={value_label(v)}' for k, v in values.items())


def expand(sweep: Sweep, root: str) -> list[Member]:
  """Every member of the sweep, parents before children, with names and overrides."""
  names = [s.name for s in sweep.stages]
  if len(set(names)) != len(names):
    raise ValueError(f'Stage names must differ: {names}.')
  labels = key_labels(k for s in sweep.stages for m in s.grid for k in m)
  members: dict[str, list[Member]] = {}
  for stage in sweep.stages:
    if not _UNSAFE.sub('', stage.name) == stage.name or not stage.name:
      raise ValueError(f'Stage name {stage.name!r}: use letters, digits, ".", "_", "-".')
    if stage.init_from and stage.init_from not in members:
      where = ('comes after it' if stage.init_from in names
               else f'is not a stage of this sweep (stages: {names})')
      raise ValueError(f"Stage {stage.name!r}: init_from={stage.init_from!r} {where}.")
    parents = members[stage.init_from] if stage.init_from else [None]
    if stage.parents:
      if not stage.init_from:
        raise ValueError(f'Stage {stage.name!r}: parents={stage.parents} needs init_from.')
      allowed = {k: v if isinstance(v, list) else [v] for k, v in stage.parents.items()}
      parents = [p for p in parents
                 if all(any(values_equal(p.values.get(k), v) for v in values)
                        for k, values in allowed.items())]
      if not parents:
        raise ValueError(f'Stage {stage.name!r}: no member of {stage.init_from!r} has '
                         f'{stage.parents}.')
    grid = stage.grid or [{}]
    stage_members = []
    for parent in parents:
      for point in grid:
        values = {**(parent.values if parent else {}), **point}
        overrides = {**stage.overrides, **point}
        if parent:
          overrides |= {k: parent.values[k] for k in stage.inherit
                        if k in parent.values and k not in point}
          overrides['init.path'] = parent.workdir
        name = member_name(values, labels)
        stage_members.append(Member(stage, name, os.path.join(root, stage.name, name),
                                    values, overrides, parent))
    seen = [m.name for m in stage_members]
    if len(set(seen)) != len(seen):
      raise ValueError(f'Stage {stage.name!r}: two members have the same values ({seen}).')
    members[stage.name] = stage_members
  for claim in sweep.claims:  # a misspelt group would wait for runs that never come
    for group in (claim.a, claim.b):
      if group.stage not in members:
        raise ValueError(f'Claim {claim.text!r}: stage {group.stage!r} is not a stage of this '
                         f'sweep (stages: {names}).')
      swept = {k for m in members[group.stage] for k in m.values}
      unknown = sorted(set(group.values) - swept)
      if unknown:
        raise ValueError(f'Claim {claim.text!r}: {unknown} are not swept in stage '
                         f'{group.stage!r} (swept: {sorted(swept)}).')
      matched = [m for m in members[group.stage] if group.matches(m.values)]
      if not matched:
        raise ValueError(f'Claim {claim.text!r}: no run of stage {group.stage!r} has '
                         f'{group.values} (its runs: {[m.name for m in members[group.stage]]}).')
      # A group pools seeds only: runs that differ in anything else are different points.
      points = {tuple(sorted((k, repr(v)) for k, v in m.values.items() if k != 'seed'))
                for m in matched}
      if len(points) > 1:
        raise ValueError(f'Claim {claim.text!r}: group {group.label()} pools runs that differ '
                         f'in more than their seed ({[m.name for m in matched]}); give the '
                         'values that tell them apart.')
  return [m for stage in sweep.stages for m in members[stage.name]]


def load_config(spec: str):
  """'configs/FILE.py:ARG' -> the locked ConfigDict that vit_jax.main would build."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config {spec!r}: no such file {path!r}.')
  from vit_jax import config_utils  # pylint: disable=import-outside-toplevel
  config = config_utils.load_config_file(path, arg)
  config.lock()
  return config


def member_config(member: Member):
  """The member's config with its overrides applied, as its command line would; a
  ValueError names a key the config does not have or a value of the wrong type."""
  config = load_config(member.stage.config)
  for key, value in member.overrides.items():
    *parents, leaf = key.split('.')
    node = config
    try:
      for part in parents:
        node = node[part]
      if leaf not in node:
        if parents != ['model']:
          raise KeyError(leaf)
        # As on the command line: config.model takes any field, get_model checks it.
        with node.unlocked():
          node[leaf] = value
        continue
      node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], tuple) else value
    except (KeyError, AttributeError):
      raise ValueError(f'Stage {member.stage.name!r}: {key!r} is not a key of '
                       f'{member.stage.config} (check the spelling in the sweep file).') from None
    except TypeError as e:
      raise ValueError(f'Stage {member.stage.name!r}: {key}={value!r} does not fit '
                       f'{member.stage.config} ({e}).') from None
  return config


def total_steps(config) -> int:
  from vit_jax import data, train  # pylint: disable=import-outside-toplevel
  size = data.dataset_info(config.data).split_size(config.data.train_split)
  return train.num_train_steps(config, size)[0]


def check(members: list[Member]) -> dict:
  """Builds every member's config (errors before anything runs); {label: total steps}."""
  from vit_jax import data  # pylint: disable=import-outside-toplevel
  steps = {}
  for member in members:
    config = member_config(member)
    data.ensure_prepared(config.data)
    steps[member.label] = total_steps(config)
  return steps

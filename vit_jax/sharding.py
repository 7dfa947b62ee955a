"""Device mesh, parameter partition rules and global batches.

The default mesh puts every device of every process on one `data` axis: plain data
parallelism, what `pmap` used to give. FSDP shards parameters and optimizer state by
rules from the config, a list of (regex, rule) pairs; the regex must match the whole
'/'-joined path of a leaf (e.g. 'params/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'
or 'opt_state/.../mu/...'), and the first rule that matches wins:

  'replicate'         a full copy on every device;
  'fsdp:AXIS'         split the largest dimension that the size of mesh axis AXIS
                      divides over that axis (several axes: 'fsdp:data+model');
                      replicated when no dimension divides.

Batches are always split over every mesh axis, so every device gets its own examples.

Several TPU slices (multi-slice): the first mesh axis that the number of slices divides
(the `data` axis by default) spans the slices, built with JAX's hybrid mesh helper, so
that each slice holds a contiguous part of it and only that axis's collectives (the
gradient all-reduce of data parallelism) cross the slower network between slices. An
axis may have the size 'slices', the number of slices the devices span (1 on one
slice): the paper recipes' mesh `[('replica', 'slices'), ('data', -1)]`
(config_utils.PAPER_MESH) keeps FSDP over `data` inside each slice, with a replica of
the state per slice, so that only the gradient all-reduce between the replicas crosses
that network, not the gathers of the parameters.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import param_tree


def make_mesh(axes: Sequence[tuple[str, int | str]] = (('data', -1),), devices=None) -> Mesh:
  """A mesh with the named axes; one size may be -1 for 'all remaining devices', and
  'slices' is the number of TPU slices the devices span.

  Devices are ordered by process so that each process owns a contiguous block of the
  batch axis, which `jax.make_array_from_process_local_data` expects.
  """
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  names = tuple(name for name, _ in axes)
  num_slices = len({getattr(d, 'slice_index', None) or 0 for d in devices})
  for name, size in axes:
    if not (size == 'slices' or isinstance(size, int)):
      raise ValueError(f"Mesh axis {name!r} has size {size!r}: use a number, -1 (all the "
                       "remaining devices) or 'slices' (one per TPU slice).")
  sizes = [num_slices if size == 'slices' else int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f'Mesh axis names must differ, got {names}.')
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {list(axes)}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f'Mesh {list(axes)}: {len(devices)} devices are not divisible by {known}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'Mesh {list(axes)} needs {int(np.prod(sizes))} devices, '
                     f'but {len(devices)} are available.')
  if num_slices > 1:
    return Mesh(_multi_slice_devices(sizes, devices, num_slices, axes), names)
  return Mesh(np.array(devices).reshape(sizes), names)


def _multi_slice_devices(sizes: list[int], devices: list, num_slices: int, axes) -> np.ndarray:
  """Devices of several slices in a mesh of `sizes`: the first axis that the number of
  slices divides goes across them (over DCN), the rest stays within each slice (ICI)."""
  axis = next((i for i, size in enumerate(sizes) if size % num_slices == 0), None)
  if axis is None:
    raise ValueError(f'Mesh {list(axes)}: no axis is divisible by the {num_slices} slices.')
  dcn_shape = [num_slices if i == axis else 1 for i in range(len(sizes))]
  ici_shape = [size // num_slices if i == axis else size for i, size in enumerate(sizes)]
  return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'batch_size') -> int:
  """Returns this process's share of the batch; refuses a size the devices do not divide."""
  num_devices = mesh.devices.size
  num_processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(f'{what}={global_batch_size} is not divisible by the {num_devices} devices '
                     f'of the mesh ({num_processes} process(es)); use a multiple of '
                     f'{num_devices}.')
  return global_batch_size // num_processes


def make_global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy arrays into global jax.Arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, axes: tuple[str, ...]) -> P:
  size = int(np.prod([mesh.shape[a] for a in axes]))
  candidates = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
  if size == 1 or not candidates:
    return P()
  largest = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[largest] = axes if len(axes) > 1 else axes[0]
  return P(*spec)


def parse_rule(rule: str, mesh: Mesh) -> tuple[str, tuple[str, ...]]:
  """'replicate' -> ('replicate', ()); 'fsdp:data+model' -> ('fsdp', ('data', 'model'))."""
  if rule == 'replicate':
    return 'replicate', ()
  kind, _, axes = rule.partition(':')
  axes = tuple(a for a in axes.split('+') if a)
  if kind != 'fsdp' or not axes:
    raise ValueError(f"Unknown sharding rule {rule!r}: use 'replicate' or 'fsdp:AXIS'.")
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'Sharding rule {rule!r} names axes {missing} that the mesh '
                     f'{dict(mesh.shape)} does not have.')
  return kind, axes


def tree_shardings(tree: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules.

  Leaves whose path matches no rule, and scalars, are replicated.
  """
  compiled = [(re.compile(pattern), parse_rule(rule, mesh)) for pattern, rule in rules]

  def sharding_for(path, leaf):
    name = param_tree.path_name(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for pattern, (kind, axes) in compiled:
      if pattern.fullmatch(name):
        if kind == 'fsdp' and shape:
          return NamedSharding(mesh, _fsdp_spec(shape, mesh, axes))
        break
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding_for, tree)


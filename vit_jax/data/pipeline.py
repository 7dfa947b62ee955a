"""grain pipelines from a TFDS data source to sharded global batches.

Host side, every pipeline is a grain.MapDataset of whole batches: batch k is a pure
function of (dataset, seed, k, process). The examples of a batch are read with one
batched call and transformed together. That makes resuming exact: the iterator state is
the number of batches consumed, and batch k is recomputed, not replayed.

  train: one global order, a permutation of the split per epoch (grain folds the epoch
         into the seed); global batch k is positions [k*G, (k+1)*G) of it and process p
         of P reads its contiguous slice of G/P; batches run across epoch boundaries, so
         nothing is dropped. Global batches do not depend on P.
  eval:  examples in order, global batch k is [k*G, (k+1)*G) split the same way, one
         pass, padded with mask 0 to the same number of full batches on every process
         (multi-host jit needs every process in every step)."""

import collections
import functools
import logging
import math
import os
import sys
from typing import Iterator, Optional, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding
from vit_jax.data import datasets
from vit_jax.data.transforms import ImageTransform

PADDING = -1  # Example index of a padding slot in an eval batch.
_ORDER_STEPS = 16  # training batches whose order is looked up together
# Global batches sent to the devices ahead of the one a step is using (device_put is
# asynchronous, so the transfer overlaps the step).
_DEVICE_AHEAD = 1


def _derived_seed(*entropy: int) -> int:
  """A 32-bit seed mixed from several integers (grain wants seeds < 2**32)."""
  return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def local_batch_size(global_batch_size: int, mesh: Mesh, process_count: int) -> int:
  """This process's share; refuses sizes that the devices or processes do not divide."""
  sharding.check_batch_size(global_batch_size, mesh, what='global_batch_size')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes; use a multiple of {process_count}.')
  return global_batch_size // process_count


class _BatchLoader:
  """Reads the examples at given indices and turns them into one host batch.

  Returns {'image': float32 (B, S, S, C), 'label': int32 (B,), 'index': int64 (B,)
  source indices (PADDING for padding), 'mask': float32 (B,)}.
  """

  def __init__(self, split_source: datasets.SplitSource, transform: ImageTransform,
               stored_channels: Optional[int]):
    self._split = split_source
    self._transform = transform
    self._stored_channels = stored_channels

  def __call__(self, indices: np.ndarray,
               rngs: Optional[Sequence[np.random.Generator]]) -> dict:
    """`rngs`: one generator per example (training), or None (evaluation)."""
    indices = np.asarray(indices, np.int64)
    is_real = indices != PADDING
    examples = self._split.source.__getitems__([int(i) for i in indices[is_real]])
    size = self._transform.image_size
    channels = self._transform.work_channels(self._stored_channels)
    images = np.zeros((len(indices), size, size, channels), np.uint8)
    labels = np.zeros(len(indices), np.int32)
    for slot, example in zip(np.flatnonzero(is_real), examples):
      images[slot] = self._transform.example(example[self._split.image_key],
                                             self._stored_channels,
                                             None if rngs is None else rngs[slot])
      labels[slot] = int(example[self._split.label_key])
    normalised = self._transform.batch(images)
    if rngs is not None:
      for slot in np.flatnonzero(is_real):
        self._transform.erase(normalised[slot], rngs[slot])
    return {'image': normalised, 'label': labels, 'index': indices,
            'mask': is_real.astype(np.float32)}


def _loader(data_config, split: str, transform: ImageTransform):
  info = datasets.read_info(data_config)
  split_source = datasets.open_split_for_reading(data_config, split, info)
  return split_source, _BatchLoader(split_source, transform, info.image_shape[-1])


def train_batches(data_config, *, local_batch_size: int, image_size: int, channels: int,
                  seed: int, process_index: int, process_count: int) -> grain.MapDataset:
  """Infinite host-local training batches of one process: batch k is `dataset[k]`.

  Returns:
    grain.MapDataset whose elements are {'image': float32 (B, S, S, channels),
    'label': int32 (B,), 'index': int64 (B,) source indices, 'mask': float32 ones}.
  """
  transform = ImageTransform.from_config(data_config, image_size=image_size,
                                         channels=channels, train=True)
  split_source, load = _loader(data_config, data_config.train_split, transform)
  num_examples = len(split_source.source)
  if num_examples < process_count:
    raise ValueError(f'Split {data_config.train_split!r} of {data_config.name!r} has '
                     f'{num_examples} examples, fewer than the {process_count} processes.')
  # One global order for all processes: epoch e is a permutation of the split seeded by
  # (seed, e); global batch k is positions [k*G, (k+1)*G) of it, and process p reads its
  # contiguous slice of b = G/P examples. Every example's augmentation is seeded by its
  # global position. So the global batches, and a run's losses, do not depend on how
  # many processes read them, and a checkpoint resumes on another process count.
  order = (grain.MapDataset.range(num_examples).shuffle(seed=_derived_seed(seed, 0))
           .repeat())
  global_batch_size = local_batch_size * process_count
  augment_seed = _derived_seed(seed, 1)

  @functools.lru_cache(maxsize=8)
  def order_block(block: int) -> np.ndarray:
    # The source indices of this process's share of _ORDER_STEPS batches, looked up from
    # grain together (5 us each, which was 7% of the host's work per 28x28 example).
    steps = block * _ORDER_STEPS + np.arange(_ORDER_STEPS)
    positions = (steps[:, None] * global_batch_size + process_index * local_batch_size
                 + np.arange(local_batch_size))
    indices = np.array([order[int(p)] for p in positions.ravel()], np.int64)
    indices = indices.reshape(positions.shape)
    indices.flags.writeable = False
    return indices

  def load_batch(step: int) -> dict:
    positions = (step * global_batch_size + process_index * local_batch_size
                 + np.arange(local_batch_size))
    indices = order_block(step // _ORDER_STEPS)[step % _ORDER_STEPS]
    rngs = [np.random.default_rng([augment_seed, int(p)]) for p in positions]
    return load(indices, rngs)

  return grain.MapDataset.range(sys.maxsize // global_batch_size).map(load_batch)


def eval_batch_count(num_examples: int, local_batch_size: int, process_count: int) -> int:
  """Batches every process yields for one pass: global batches to cover the split."""
  return math.ceil(num_examples / (local_batch_size * process_count))


def eval_batches(data_config, *, local_batch_size: int, image_size: int, channels: int,
                 split: str, process_index: int, process_count: int) -> grain.MapDataset:
  """One pass over this process's part of `split`, padded to full batches.

  Global batch k holds examples [k*G, (k+1)*G) in order and process p reads its
  contiguous slice of it, as in training: the global batches are the same for any
  number of processes; positions past the end are padding.

  Returns:
    grain.MapDataset of eval_batch_count(...) batches {'image', 'label', 'index',
    'mask'}; padding slots have index PADDING, mask 0, label 0 and a constant image.
  """
  transform = ImageTransform.from_config(data_config, image_size=image_size,
                                         channels=channels, train=False)
  split_source, load = _loader(data_config, split, transform)
  num_examples = len(split_source.source)
  num_batches = eval_batch_count(num_examples, local_batch_size, process_count)
  global_batch_size = local_batch_size * process_count

  def source_indices(step: int) -> np.ndarray:
    positions = (step * global_batch_size + process_index * local_batch_size
                 + np.arange(local_batch_size))
    return np.where(positions < num_examples, positions, PADDING)

  return (grain.MapDataset.range(num_batches).map(source_indices)
          .map(functools.partial(load, rngs=None)))


def read_options(data_config) -> grain.ReadOptions:
  """grain threads and buffer: data.num_threads (0: one per core, at most 16) threads
  each prepare whole batches; data.prefetch batches (at least one per thread) wait ready."""
  num_threads = data_config.num_threads
  if not num_threads:
    num_threads = min(16, os.cpu_count() or 1)
  return grain.ReadOptions(num_threads=int(num_threads),
                           prefetch_buffer_size=max(int(data_config.prefetch), int(num_threads)))


def _to_global(local_batch: dict, mesh: Mesh, keys: tuple[str, ...]) -> dict:
  return sharding.make_global_batch({k: local_batch[k] for k in keys}, mesh)


class TrainIterator:
  """Infinite iterator of global training batches, with an exact, resumable state.

  `next()` gives {'image': float32 (B, H, W, C), 'label': int32 (B,)} as jax.Arrays of
  the global batch B, split over the mesh by sharding.batch_sharding. grain threads
  prepare host batches in the background (data.num_threads, data.prefetch) and the
  next batch is already on its way to the devices while the current step runs.

  `get_state()` is the same on every process and JSON-serialisable; `set_state` after k
  batches makes the following batches identical to those of an uninterrupted run.
  """

  KEYS = ('image', 'label')

  def __init__(self, host_batches: grain.MapDataset, *, mesh: Mesh,
               read_options: grain.ReadOptions, layout: dict):
    self.host_batches = host_batches  # Batch k of this process is host_batches[k].
    self._mesh = mesh
    self._read_options = read_options
    self._layout = layout  # What must match for an exact resume.
    self._step = 0  # Batches handed out.
    self._host_iter: Optional[Iterator[dict]] = None
    self._on_device = collections.deque()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._host_iter is None:
      self._host_iter = iter(self.host_batches[self._step:].to_iter_dataset(self._read_options))
    while len(self._on_device) < 1 + _DEVICE_AHEAD:
      self._on_device.append(_to_global(next(self._host_iter), self._mesh, self.KEYS))
    self._step += 1
    return self._on_device.popleft()

  def get_state(self) -> dict:
    return {'step': self._step, **self._layout}

  def set_state(self, state: dict) -> None:
    """Continues after the batches counted in `state`, exactly, also on another number of
    processes. With another global batch size, seed or dataset it continues at the same
    number of examples seen, which is not an exact resume (and says so)."""
    step = int(state['step'])
    # The process count may change: global batches do not depend on it.
    changed = {k: (state.get(k), v) for k, v in self._layout.items()
               if state.get(k) != v and k != 'process_count'}
    if changed:
      old_batch = int(state.get('global_batch_size') or self._layout['global_batch_size'])
      step = step * old_batch // self._layout['global_batch_size']
      logging.warning('Input pipeline state from another setting %s (saved, now): resuming '
                      'at batch %d by examples seen; the batch order is not the one of an '
                      'uninterrupted run.', changed, step)
    self.close()
    self._step = step

  def close(self) -> None:
    """Stops the background threads; the next `next()` starts them again."""
    if self._host_iter is not None and hasattr(self._host_iter, 'close'):
      self._host_iter.close()
    self._host_iter = None
    self._on_device.clear()


class EvalIterable:
  """One exact pass over an evaluation split, each `iter()` a fresh pass.

  Yields {'image': float32 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)}
  global jax.Arrays; mask is 1 for real examples and 0 for padding. Every example of
  the split is real exactly once across all processes, and every process yields
  `len(self)` batches.
  """

  KEYS = ('image', 'label', 'mask')

  def __init__(self, host_batches: grain.MapDataset, *, mesh: Mesh,
               read_options: grain.ReadOptions, num_examples: int):
    self.host_batches = host_batches
    self.num_examples = num_examples
    self._mesh = mesh
    self._read_options = read_options

  def __len__(self) -> int:
    return len(self.host_batches)

  def __iter__(self) -> Iterator[dict]:
    host_iter = iter(self.host_batches.to_iter_dataset(self._read_options))
    on_device = collections.deque()
    for local_batch in host_iter:
      on_device.append(_to_global(local_batch, self._mesh, self.KEYS))
      if len(on_device) == 1 + _DEVICE_AHEAD:
        yield on_device.popleft()
    yield from on_device


def _processes(process_index, process_count) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


def train_iterator(data_config, *, global_batch_size: int, mesh: Mesh, image_size: int,
                   channels: int, seed: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> TrainIterator:
  """Infinite, shuffled, augmented global training batches of `data_config.train_split`.

  Args:
    data_config: the `data` section of a config (default_data_config() lists the keys).
    global_batch_size: examples per step over all processes; must be divisible by the
      mesh's devices and by the processes (ValueError naming both numbers otherwise).
    mesh: batches are split over all its axes (sharding.batch_sharding).
    image_size, channels: what the model takes, (image_size, image_size, channels).
    seed: shuffling and augmentation seed.
    process_index, process_count: default jax.process_index()/process_count(). Tests
      pass others to simulate hosts; the arrays then hold this process's share only.
  Returns:
    TrainIterator: next() -> {'image': float32 (B, S, S, C), 'label': int32 (B,)};
    get_state()/set_state() for exact resume.
  """
  process_index, process_count = _processes(process_index, process_count)
  batch = local_batch_size(global_batch_size, mesh, process_count)
  host_batches = train_batches(data_config, local_batch_size=batch, image_size=image_size,
                               channels=channels, seed=seed, process_index=process_index,
                               process_count=process_count)
  layout = {'global_batch_size': int(global_batch_size), 'process_count': process_count,
            'seed': int(seed), 'dataset': data_config.name, 'split': data_config.train_split}
  return TrainIterator(host_batches, mesh=mesh, read_options=read_options(data_config),
                       layout=layout)


def eval_iterator(data_config, *, global_batch_size: int, mesh: Mesh, image_size: int,
                  channels: int, split: Optional[str] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> EvalIterable:
  """One exact pass over `split` (default `data_config.eval_split`), padded with a mask.

  Arguments as for train_iterator. Returns an EvalIterable: each iter() is a fresh pass
  of len(...) batches {'image': float32 (B, S, S, C), 'label': int32 (B,), 'mask':
  float32 (B,) 1 for real examples}, the same number on every process.
  """
  process_index, process_count = _processes(process_index, process_count)
  split = split or data_config.eval_split
  batch = local_batch_size(global_batch_size, mesh, process_count)
  host_batches = eval_batches(data_config, local_batch_size=batch, image_size=image_size,
                              channels=channels, split=split, process_index=process_index,
                              process_count=process_count)
  num_examples = len(datasets.open_split(data_config, split).source)
  return EvalIterable(host_batches, mesh=mesh, read_options=read_options(data_config),
                      num_examples=num_examples)

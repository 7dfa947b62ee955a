"""The optax chain from `config.optim`.

  clip by global norm -> AdamW | SGD (momentum) | LARS, with decoupled weight decay on the
  parameters that no `no_decay` regex matches -> layer-wise learning-rate decay -> frozen
  parameters set to zero.

Learning rate: `base_lr * global_batch_size / lr_batch_base` (MAE's rule with
lr_batch_base=256; lr_batch_base=0 uses base_lr as is), linear warmup from 0, then
cosine or linear decay to `min_lr`, or constant.

Regexes match the whole '/'-joined parameter path, e.g.
'Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query/kernel'.
"""

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import param_tree

# No weight decay on biases, norms, position embeddings, class and mask tokens and the
# attention-pool probe: the parameter groups of the MAE and timm recipes.
DEFAULT_NO_DECAY = ('.*/bias', '.*/scale', '.*pos_embedding', 'cls', 'mask_token', '.*/probe')


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw',  # 'adamw', 'sgd' or 'lars'
      base_lr=1.5e-4,
      lr_batch_base=256,  # lr = base_lr * global_batch_size / lr_batch_base; 0: lr = base_lr
      min_lr=0.0,
      schedule='cosine',  # 'cosine', 'linear' or 'constant' after the warmup
      warmup_epochs=0.0,
      b1=0.9,
      b2=0.95,
      momentum=0.9,  # sgd and lars
      weight_decay=0.05,
      no_decay=DEFAULT_NO_DECAY,
      grad_clip_norm=0.0,  # 0: no clipping
      layer_decay=1.0,  # < 1: layer-wise lr decay for fine-tuning (MAE uses 0.65 to 0.75)
      trainable='.*',  # regex of the parameters that train; the others are frozen
      ema_decay=0.0,  # > 0: keep an exponential moving average of the parameters
  ))


def learning_rate(optim: ml_collections.ConfigDict, global_batch_size: int,
                  total_steps: int, steps_per_epoch: float) -> optax.Schedule:
  """The schedule of the config, in optimizer steps."""
  peak = optim.base_lr * (global_batch_size / optim.lr_batch_base if optim.lr_batch_base else 1.0)
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and total_steps > 0 and optim.warmup_epochs > 0:
    raise ValueError(f'optim.warmup_epochs={optim.warmup_epochs} gives {warmup} warmup steps, '
                     f'not fewer than the {total_steps} steps of the run.')
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.min_lr / peak if peak else 0)
  elif optim.schedule == 'linear':
    after = optax.linear_schedule(peak, optim.min_lr, decay_steps)
  elif optim.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine', 'linear' or 'constant'.")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def regex_mask(tree, patterns: Sequence[str] | str) -> Any:
  """True for the leaves whose path fully matches one of the regexes."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda name: any(p.fullmatch(name) for p in compiled),
                      param_tree.path_names(tree))


def layer_decay_scales(params, decay: float) -> Any:
  """Per-parameter lr multipliers decay**(depth + 1 - layer_id), as BEiT and MAE fine-tuning.

  layer_id is 0 for the patch embedding, class token and position embedding, i + 1 for
  `Transformer/encoderblock_i` and depth + 1 for everything after the trunk. In the
  scanned layout the multipliers of `Transformer/encoderblock` are an array over its
  leading (layer) axis.
  """
  trunk = params.get('Transformer', {})
  scanned = 'encoderblock' in trunk
  if scanned:
    depth = jax.tree.leaves(trunk['encoderblock'])[0].shape[0]
  else:
    depth = sum(1 for k in trunk if re.fullmatch(r'encoderblock_\d+', k))

  def scale(name, leaf):
    parts = name.split('/')
    if parts[0] in ('embedding', 'cls') or 'posembed_input' in parts:
      return decay**(depth + 1)
    if parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      return decay**(depth - int(parts[1].split('_')[1]))
    if parts[0] == 'Transformer' and parts[1] == 'encoderblock':
      per_layer = decay**(depth - jnp.arange(depth, dtype=jnp.float32))
      return per_layer.reshape((depth,) + (1,) * (len(leaf.shape) - 1))
    return 1.0

  return jax.tree.map(scale, param_tree.path_names(params), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by the matching leaf of `scales` (scalars or broadcastable)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# Keys that only some optimizers read.
OPTIMIZER_KEYS = {'b1': ('adamw',), 'b2': ('adamw',), 'momentum': ('sgd', 'lars')}


def check_optimizer_keys(optim: ml_collections.ConfigDict) -> None:
  """Refuses a key set away from its default for an optimizer that does not read it
  (`optim.momentum=0.5` with adamw would change nothing, silently)."""
  defaults = default_optim_config()
  for key, readers in OPTIMIZER_KEYS.items():
    if optim.name not in readers and optim[key] != defaults[key]:
      raise ValueError(f'optim.{key}={optim[key]} has no effect with optim.name='
                       f'{optim.name!r} (only {", ".join(readers)} read it); leave it at '
                       f'{defaults[key]} or choose another optimizer.')


def make_optimizer(optim: ml_collections.ConfigDict, params, schedule: optax.Schedule, *,
                   trainable: str = '.*') -> optax.GradientTransformation:
  """The optax chain for `params` (a tree of arrays or ShapeDtypeStructs).

  Parameters whose path does not match the `trainable` regex get zero updates.
  """
  check_optimizer_keys(optim)
  decay_mask = jax.tree.map(lambda no: not no, regex_mask(params, optim.no_decay))
  if optim.name == 'adamw':
    core = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                       mask=decay_mask)
  elif optim.name == 'sgd':
    core = optax.chain(optax.add_decayed_weights(optim.weight_decay, decay_mask),
                       optax.sgd(schedule, momentum=optim.momentum or None))
  elif optim.name == 'lars':
    # MAE's util/lars.py, in its order: weight decay and the trust ratio (both skipped for
    # biases and norms), then momentum, then the learning rate. (optax.lars applies the
    # learning rate before the momentum, which differs while the rate changes.)
    core = optax.chain(
        optax.add_decayed_weights(optim.weight_decay, decay_mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), decay_mask),
        optax.trace(decay=optim.momentum),
        optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"optim.name={optim.name!r}: use 'adamw', 'sgd' or 'lars'.")
  if optim.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), core)
  trainable_mask = regex_mask(params, trainable)
  if not any(jax.tree.leaves(trainable_mask)):
    raise ValueError(f'optim.trainable={trainable!r} matches no parameter.')
  if not all(jax.tree.leaves(trainable_mask)):
    labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable_mask)
    core = optax.multi_transform({'train': core, 'freeze': optax.set_to_zero()}, labels)
  if optim.layer_decay != 1.0:
    core = optax.chain(core, scale_by_tree(layer_decay_scales(params, optim.layer_decay)))
  return core

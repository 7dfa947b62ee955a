"""Parameter trees as the rest of the code names them: '/'-joined paths, scanned or not.

Regexes of the config (optimizer masks, sharding rules, checkpoint loading) match the
'/'-joined path of a leaf, e.g. 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'.
A model with `scan=True` stacks its blocks under one `encoderblock` (depth first);
`scan_params`/`unscan_params` convert between the two layouts.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def path_name(path) -> str:
  """A jax key path (DictKey, GetAttrKey, SequenceKey, ...) -> 'a/b/0'."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return '/'.join(name(k) for k in path)


def path_names(tree) -> Any:
  """A tree like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), tree)


def _is_block_key(key: str, prefix: str) -> bool:
  return key.startswith(prefix + '_') and key[len(prefix) + 1:].isdigit()


def scan_params(params, prefix: str = 'encoderblock'):
  """Unscanned -> scanned layout: stacks every `{prefix}_{i}` subtree into `{prefix}`.

  Works at any depth of the tree (the ViT trunk, the MAE decoder, ...).
  """
  if not isinstance(params, dict):
    return params
  blocks = sorted((k for k in params if _is_block_key(k, prefix)),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  out = {k: scan_params(v, prefix) for k, v in params.items() if k not in blocks}
  if blocks:
    out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in blocks])
  return out


def unscan_params(params, prefix: str = 'encoderblock'):
  """Scanned -> unscanned layout: splits `{prefix}` along axis 0 into `{prefix}_{i}`."""
  if not isinstance(params, dict):
    return params
  out = {}
  for k, v in params.items():
    if k == prefix and isinstance(v, dict):
      depth = jax.tree.leaves(v)[0].shape[0]
      for i in range(depth):
        out[f'{prefix}_{i}'] = jax.tree.map(lambda x, i=i: x[i], v)
    else:
      out[k] = unscan_params(v, prefix)
  return out


def is_scanned(tree) -> bool:
  """Whether a nested tree holds stacked blocks (`.../encoderblock/...`)."""
  return any('encoderblock' in path for path in traverse_util.flatten_dict(tree))


def flat_numpy(tree) -> dict[str, np.ndarray]:
  """Nested or already flat ('/' keys) dict -> flat '/' keys, unscanned, numpy arrays."""
  tree = jax.device_get(tree)
  if any('/' in key for key in tree):
    tree = traverse_util.unflatten_dict(tree, sep='/')
  tree = unscan_params(tree)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}

"""Writing our parameters as vit_jax `.npz` and timm `.safetensors` files."""

import json
import os

import numpy as np

from vit_jax import param_tree
from vit_jax.interop import torch_names
from vit_jax.interop.common import POSEMB
from vit_jax.interop.fitting import ATTENTION, sincos_posemb

def _merge_heads(key: str, value: np.ndarray) -> np.ndarray:
  """(D, H, D/H) query/key/value kernels, (H, D/H, D) out kernels, (H, D/H) biases -> 2D/1D."""
  match = ATTENTION.fullmatch(key)
  if not match:
    return value
  if match[3] == 'bias':
    return value.reshape(-1)
  if match[2] == 'out':
    return value.reshape(-1, value.shape[-1])
  return value.reshape(value.shape[0], -1)


def export_npz(params, path) -> None:
  """Writes params (scanned or not) as a vit_jax .npz: flat '/' keys, unscanned blocks."""
  with open(path, 'wb') as f:  # a file object: np.savez would otherwise append '.npz'
    np.savez(f, **param_tree.flat_numpy(params))


_TIMM_POOLS = {'tok': 'token', 'gap': 'avg', 'map': 'map'}


def timm_kwargs(model) -> dict:
  """Arguments of timm's VisionTransformer that build the same function as our `model`.

  Raises ValueError for the options timm's VisionTransformer does not have.
  """
  from vit_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  if not isinstance(model, ViT):
    raise ValueError(f'timm export takes a ViT, got {type(model).__name__}; for an MAE, '
                     f'fit its encoder into get_model("ViT-...", posemb="sincos2d") first.')
  unsupported = {'representation_size': model.representation_size,
                 'head_batchnorm': model.head_batchnorm,
                 'layernorm_epsilon != 1e-6': model.layernorm_epsilon != 1e-6}
  unsupported = [name for name, value in unsupported.items() if value]
  mlp_ratio = model.mlp_dim / model.width
  if int(model.width * mlp_ratio) != model.mlp_dim:
    unsupported.append(f'mlp_dim {model.mlp_dim} (timm computes int(width * mlp_ratio))')
  if unsupported:
    raise ValueError(f'timm\'s VisionTransformer has no equivalent of {unsupported}; '
                     f'export to .npz instead.')
  image_size = model.image_size
  return dict(
      img_size=tuple(image_size) if isinstance(image_size, (tuple, list)) else image_size,
      patch_size=model.patch_size, in_chans=model.channels, num_classes=model.num_classes,
      global_pool=_TIMM_POOLS[model.pool], embed_dim=model.width, depth=model.depth,
      num_heads=model.num_heads, mlp_ratio=mlp_ratio, class_token=model.class_token,
      fc_norm=model.use_fc_norm,
      # Our MAP head attends to every token, the class token included.
      pool_include_prefix=model.pool == 'map' and model.class_token)


def to_timm_state_dict(params, model) -> dict[str, np.ndarray]:
  """Our ViT params -> {timm name: float32 array in PyTorch layout}."""
  timm_kwargs(model)  # raises for models timm cannot express
  flat = {k: _merge_heads(k, v.astype(np.float32))
          for k, v in param_tree.flat_numpy(params).items()}
  if model.posemb == 'sincos2d':  # timm learns it; the fixed table is its starting value
    shape = (1, int(np.prod(model.grid)) + model.num_prefix_tokens, model.width)
    flat[POSEMB] = sincos_posemb(shape, model.grid, 'model')
  return torch_names.to_torch_names(flat)


def export_timm_safetensors(params, model, path) -> dict:
  """Writes our ViT as a timm state dict in .safetensors; returns timm_kwargs(model).

  timm loads it with VisionTransformer(**kwargs).load_state_dict(...) or
  timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path,
  custom_load=False, num_classes=kwargs['num_classes']), **kwargs) (custom_load=False:
  the file is a state dict, not timm's vit_jax .npz; num_classes: else timm drops a head
  whose size differs from the named model's). The kwargs are also in the file's
  metadata under 'vit_jax.timm_kwargs'.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  kwargs = timm_kwargs(model)
  save_file(to_timm_state_dict(params, model), os.fspath(path),
            metadata={'format': 'pt', 'vit_jax.timm_kwargs': json.dumps(kwargs)})
  return kwargs

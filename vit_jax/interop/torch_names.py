"""PyTorch names (timm, official MAE) <-> ours. One table serves import and export."""

import dataclasses
import math
import re

import ml_dtypes
import numpy as np
from flax import traverse_util

from vit_jax.interop.common import POSEMB, CheckpointError, short_names
from vit_jax.models import layers


@dataclasses.dataclass(frozen=True)
class _Rule:
  """A PyTorch module (or tensor) and the module(s) of ours it holds; '{i}' is a block index.

  layout: 'dense' (weight (out, in) <-> kernel (in, out); several modules of ours are
  stacked along `out`, as query/key/value in qkv), 'conv' (weight (D, C, p, p) <->
  kernel (p, p, C, D)), 'norm' (weight <-> scale) or 'tensor' (the parameter itself).
  """
  torch: str
  ours: tuple[str, ...]
  layout: str


_LEAVES = {'dense': {'weight': 'kernel', 'bias': 'bias'},
           'conv': {'weight': 'kernel', 'bias': 'bias'},
           'norm': {'weight': 'scale', 'bias': 'bias'},
           'tensor': {'': ''}}


def _block_rules(torch_blocks: str, our_trunk: str) -> list[_Rule]:
  t, o = f'{torch_blocks}.{{i}}', f'{our_trunk}/encoderblock_{{i}}'
  attn = f'{o}/MultiHeadDotProductAttention_1'
  return [
      _Rule(f'{t}.norm1', (f'{o}/LayerNorm_0',), 'norm'),
      _Rule(f'{t}.attn.qkv', (f'{attn}/query', f'{attn}/key', f'{attn}/value'), 'dense'),
      _Rule(f'{t}.attn.proj', (f'{attn}/out',), 'dense'),
      _Rule(f'{t}.norm2', (f'{o}/LayerNorm_2',), 'norm'),
      _Rule(f'{t}.mlp.fc1', (f'{o}/MlpBlock_3/Dense_0',), 'dense'),
      _Rule(f'{t}.mlp.fc2', (f'{o}/MlpBlock_3/Dense_1',), 'dense'),
  ]


_MAP = 'MAPHead_0/MultiHeadDotProductAttention_0'
_RULES = [
    _Rule('patch_embed.proj', ('embedding',), 'conv'),
    _Rule('cls_token', ('cls',), 'tensor'),
    _Rule('pos_embed', (POSEMB,), 'tensor'),
    *_block_rules('blocks', 'Transformer'),
    _Rule('norm', ('Transformer/encoder_norm',), 'norm'),
    _Rule('fc_norm', ('fc_norm',), 'norm'),
    _Rule('attn_pool.latent', ('MAPHead_0/probe',), 'tensor'),
    _Rule('attn_pool.q', (f'{_MAP}/query',), 'dense'),
    _Rule('attn_pool.kv', (f'{_MAP}/key', f'{_MAP}/value'), 'dense'),
    _Rule('attn_pool.proj', (f'{_MAP}/out',), 'dense'),
    _Rule('attn_pool.norm', ('MAPHead_0/LayerNorm_0',), 'norm'),
    _Rule('attn_pool.mlp.fc1', ('MAPHead_0/MlpBlock_0/Dense_0',), 'dense'),
    _Rule('attn_pool.mlp.fc2', ('MAPHead_0/MlpBlock_0/Dense_1',), 'dense'),
    _Rule('pre_logits.fc', ('pre_logits',), 'dense'),
    _Rule('head', ('head',), 'dense'),
    # The MAE decoder.
    _Rule('decoder_embed', ('decoder_embed',), 'dense'),
    _Rule('mask_token', ('mask_token',), 'tensor'),
    *_block_rules('decoder_blocks', 'Decoder'),
    _Rule('decoder_norm', ('Decoder/encoder_norm',), 'norm'),
    _Rule('decoder_pred', ('decoder_pred',), 'dense'),
]


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)'))


def _join(module: str, leaf: str, sep: str) -> str:
  return f'{module}{sep}{leaf}' if leaf else module


# (rule, torch leaf, our leaf, regex of the torch key, regex of the first key of ours)
_ENTRIES = [(rule, t_leaf, o_leaf, _template_regex(_join(rule.torch, t_leaf, '.')),
             _template_regex(_join(rule.ours[0], o_leaf, '/')))
            for rule in _RULES for t_leaf, o_leaf in _LEAVES[rule.layout].items()]


def _torch_to_ours(layout: str, leaf: str, value: np.ndarray, parts: int) -> list[np.ndarray]:
  if layout == 'conv' and leaf == 'weight':
    return [value.transpose(2, 3, 1, 0)]
  if layout == 'dense':
    return [x.T if leaf == 'weight' else x for x in np.split(value, parts, axis=0)]
  return [value]


def _ours_to_torch(layout: str, leaf: str, values: list[np.ndarray]) -> np.ndarray:
  if layout == 'conv' and leaf == 'weight':
    return values[0].transpose(3, 2, 0, 1)
  if layout == 'dense':
    return np.concatenate([x.T if leaf == 'weight' else x for x in values], axis=0)
  return values[0]


def _is_fixed_table(value: np.ndarray) -> tuple[bool, float]:
  """(equal to MAE's (1, 1 + side*side, D) sincos2d table with a zero class row, max difference)."""
  tokens = value.shape[1] - 1 if value.ndim == 3 and value.shape[0] == 1 else -1
  side = math.isqrt(max(tokens, 0))
  if tokens < 1 or side * side != tokens or value.shape[2] % 4:
    return False, math.inf
  table = np.pad(layers.sincos2d_table((side, side), value.shape[2]), ((1, 0), (0, 0)))[None]
  difference = float(np.max(np.abs(np.asarray(value, np.float64) - table)))
  # A table stored in float32 (or half precision) differs from ours by its rounding only.
  return difference <= 10 * ml_dtypes.finfo(value.dtype).eps, difference


def _drop_fixed_posembs(state: dict, path: str) -> bool:
  """Removes MAE's fixed position embeddings from `state` after checking them; True if MAE.

  A state dict with a decoder is MAE: its tables must be the fixed ones. One without a
  decoder or head is MAE's encoder release when its pos_embed is still the fixed table; a
  trained pos_embed, or a head, makes it a timm ViT (an MAE fine-tuned model, say).
  """
  has_decoder = any(k in state for k in ('mask_token', 'decoder_embed.weight',
                                         'decoder_pos_embed'))
  if not has_decoder:
    if 'head.weight' in state or 'pos_embed' not in state:
      return False
    is_fixed, _ = _is_fixed_table(state['pos_embed'])
    if is_fixed:
      del state['pos_embed']
    return is_fixed
  for key in ('pos_embed', 'decoder_pos_embed'):
    if key in state:
      is_fixed, difference = _is_fixed_table(state[key])
      if not is_fixed:
        raise CheckpointError(f'{path}: {key} {state[key].shape} is not the fixed sincos2d '
                              f'table of MAE (max difference {difference:.3g}).')
      del state[key]
  return True


def from_torch_names(state: dict, path: str) -> tuple[str, dict]:
  """A PyTorch state dict -> ('timm' or 'mae', nested params in our names, heads merged)."""
  state = dict(state)
  is_mae = _drop_fixed_posembs(state, path)
  flat, unknown = {}, []
  for key, value in state.items():
    for rule, t_leaf, o_leaf, torch_regex, _ in _ENTRIES:
      match = torch_regex.fullmatch(key)
      if match:
        names = [_join(o.format(**match.groupdict()), o_leaf, '/') for o in rule.ours]
        flat.update(zip(names, _torch_to_ours(rule.layout, t_leaf, value, len(names))))
        break
    else:
      unknown.append(key)
  if unknown:
    raise CheckpointError(f'{path}: keys with no equivalent in vit_jax models: '
                          f'{short_names(sorted(unknown))}.')
  if 'embedding/kernel' not in flat:
    raise CheckpointError(f'{path}: not a ViT state dict: no patch_embed.proj.weight among its '
                          f'keys ({short_names(state)}).')
  return ('mae' if is_mae else 'timm'), traverse_util.unflatten_dict(flat, sep='/')


def to_torch_names(flat: dict) -> dict[str, np.ndarray]:
  """{our '/' name: array} (heads merged) -> {PyTorch name: array in PyTorch layout}."""
  state, used = {}, set()
  for rule, t_leaf, o_leaf, _, ours_regex in _ENTRIES:
    for key in flat:
      match = ours_regex.fullmatch(key)
      if match:
        names = [_join(o.format(**match.groupdict()), o_leaf, '/') for o in rule.ours]
        used.update(names)
        torch_key = _join(rule.torch.format(**match.groupdict()), t_leaf, '.')
        state[torch_key] = np.ascontiguousarray(
            _ours_to_torch(rule.layout, t_leaf, [flat[n] for n in names]))
  if set(flat) - used:
    raise ValueError(f'no timm name for {short_names(sorted(set(flat) - used))}.')
  return state

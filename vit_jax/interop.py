"""Public checkpoints in and out: vit_jax/AugReg/big_vision `.npz`, timm, official MAE.

Three steps, each usable alone:

  fmt, arrays = load_checkpoint_file('ViT-B_16.npz')    # any supported file -> our names
  params, report = fit_params(arrays, init_params)       # -> a model of any size/head/layout
  export_timm_safetensors(params, model, 'model.safetensors')   # and export_npz(...)

The training loop's `config.init.path` reads these files (and Orbax checkpoints) through
vit_jax.checkpoint.load_params and adapts them with fit_params; scripts/convert_checkpoint.py
converts between all of them.

Formats read, told apart by file type and content:
  'vit_jax'     .npz of google-research/vision_transformer and AugReg: flat '/' keys
                ('Transformer/encoderblock_0/...'), optionally under 'opt/target/'.
  'big_vision'  .npz of big_vision: keys under 'params/' (or 'params/img/', the image
                tower of a two-tower model), linen block names (MultiHeadDotProductAttention_0,
                LayerNorm_1, MlpBlock_0), 'pos_embedding' without a class-token row,
                blocks possibly stacked under 'encoderblock' (scan).
  'timm'        timm ViT state dicts (.safetensors, .pth/.bin/.pt), also inside a 'model'
                or 'state_dict' entry: patch_embed.proj, cls_token, pos_embed,
                blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm or fc_norm,
                pre_logits.fc (timm < 0.9), head, attn_pool (MAP head).
  'mae'         official facebookresearch/mae checkpoints (the 'model' entry of the .pth):
                the encoder-only release and the full encoder+decoder one. Their fixed
                position embeddings are checked against layers.sincos2d_table and dropped.

State dicts do not record the number of heads, so query/key/value/out arrays read from
PyTorch files come with merged heads ((D, D) kernels, (D,) biases); fit_params splits
them into the model's (D, heads, D/heads) layout.

Security: loading never runs code from a file. .npz is read with allow_pickle=False,
PyTorch files with torch.load(weights_only=True) (argparse.Namespace allowed, which the
official MAE and timm training scripts store as 'args'), safetensors by its own parser.
Anything else is a one-line CheckpointError naming the file.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import warnings

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from vit_jax.models import layers

POSEMB = 'Transformer/posembed_input/pos_embedding'
HEAD = r'head/.*'

# fit_params options that fine-tune or linearly probe a ViT from an MAE encoder in one
# call, as the official main_finetune.py/main_linprobe.py do: the decoder is dropped,
# the head is new, and a model with fc_norm (global pooling) starts it fresh and drops
# the encoder's final norm, while a class-token model keeps that norm.
MAE_TO_VIT = dict(
    reinit=(HEAD,),
    allow_missing=(r'fc_norm/.*',),
    ignore_unexpected=(r'decoder_.*', r'Decoder/.*', r'mask_token',
                       r'Transformer/encoder_norm/.*'),
)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit; the message is one line."""


# ---------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------

_READERS = {'.npz': 'npz', '.safetensors': 'safetensors', '.pth': 'torch', '.pt': 'torch',
            '.bin': 'torch'}


def _looks_like(kind: str, head: bytes, size: int) -> bool:
  """Checks the first bytes of a file against the format its extension promises."""
  is_zip = head.startswith((b'PK\x03\x04', b'PK\x05\x06'))
  if kind == 'npz':
    return is_zip
  if kind == 'torch':  # a zip archive since PyTorch 1.6, a bare pickle before
    return is_zip or head.startswith(b'\x80')
  header_size = int.from_bytes(head[:8], 'little')  # safetensors: u64 size, JSON header
  return len(head) > 8 and head[8:9] == b'{' and 8 + header_size <= size


def load_checkpoint_file(path) -> tuple[str, dict]:
  """Reads a public checkpoint file into our parameter names.

  Args:
    path: a .npz, .safetensors, .pth, .pt or .bin file.
  Returns:
    (format, params): format is 'vit_jax', 'big_vision', 'timm' or 'mae'; params is a
    nested dict of numpy arrays in our naming, in the layout of the file (scanned
    big_vision blocks stay stacked; attention arrays from PyTorch files have merged
    heads). Give it to fit_params.
  Raises:
    CheckpointError (one line, naming the file): unknown type, content that is not
    what the extension says, arrays that would need unpickling, keys with no vit_jax
    equivalent, fixed MAE position embeddings that are not the sincos2d table.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  kind = _READERS.get(ext)
  if kind is None:
    raise CheckpointError(f'{path}: unknown checkpoint type {ext or "(no extension)"!r}; '
                          f'expected one of {sorted(_READERS)} (Orbax folders are read by '
                          f'vit_jax.checkpoint.load_params).')
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file.')
  with open(path, 'rb') as f:
    head = f.read(16)
  if not _looks_like(kind, head, os.path.getsize(path)):
    raise CheckpointError(f'{path}: not a {ext} checkpoint (the file starts with {head[:8]!r}).')
  if kind == 'npz':
    return _from_flax_names(_read_npz(path), path)
  arrays = _read_safetensors(path) if kind == 'safetensors' else _read_torch(path)
  if any('/' in key for key in arrays):  # flax names saved as safetensors
    return _from_flax_names(arrays, path)
  return _from_torch_names(arrays, path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  arrays = {}
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:
        try:
          value = npz[key]
        except ValueError:
          raise CheckpointError(f'{path}: refused {key!r}: it holds Python objects, which '
                                f'would need unpickling.') from None
        if not isinstance(value, np.ndarray):
          raise CheckpointError(f'{path}: {key!r} is not an array; not a numpy .npz file.')
        arrays[key] = value
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: not a readable .npz file ({_one_line(e)}).') from None
  return arrays


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  arrays, bfloat16 = {}, []
  try:
    with safe_open(path, framework='np') as f:
      for key in f.keys():
        dtype = f.get_slice(key).get_dtype()
        if dtype == 'BF16':  # numpy has no bfloat16; safetensors' numpy reader refuses it
          bfloat16.append(key)
        elif dtype in ('F64', 'F32', 'F16'):
          arrays[key] = f.get_tensor(key)
        else:
          raise CheckpointError(f'{path}: {key!r} has dtype {dtype}; expected floats.')
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: not a readable .safetensors file ({_one_line(e)}).') from None
  if bfloat16:  # the library validated the header above; read those arrays by its offsets
    with open(path, 'rb') as f:
      header_size = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(header_size))
      for key in bfloat16:
        begin, end = header[key]['data_offsets']
        f.seek(8 + header_size + begin)
        arrays[key] = np.frombuffer(f.read(end - begin), ml_dtypes.bfloat16).reshape(
            header[key]['shape'])
  return arrays


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path}: reading PyTorch files needs torch (pip install -r '
                          f'requirements-interop.txt); or save the state dict as '
                          f'.safetensors.') from None
  try:
    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
      warnings.simplefilter('ignore')  # pickle protocol notes of the restricted unpickler
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    culprit = re.search(r'GLOBAL ([\w.]+)', str(e))
    reason = f'it calls {culprit[1]}' if culprit else _one_line(e)
    raise CheckpointError(f'{path}: refused: not a weights-only PyTorch file, loading it '
                          f'could run code from it ({reason}).') from None
  if isinstance(obj, dict):
    for entry in ('model', 'state_dict'):  # official MAE / timm training checkpoints
      if isinstance(obj.get(entry), dict):
        obj = obj[entry]
        break
  if not isinstance(obj, dict) or not obj:
    raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state dict.')
  arrays = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f'{path}: {key!r} is a {type(value).__name__}, not a tensor; '
                            f'not a state dict.')
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # torch cannot hand numpy a bfloat16 array
      array = value.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      array = value.numpy()
    # DistributedDataParallel saves its module's names under 'module.'.
    arrays[key.removeprefix('module.')] = array
  return arrays


def _one_line(error: Exception) -> str:
  text = ' '.join(str(error).split())
  return text[:200] + ('...' if len(text) > 200 else '')


# ---------------------------------------------------------------------------------------
# Flax names: vision_transformer (pre-linen block names, ours) and big_vision (linen).
# ---------------------------------------------------------------------------------------

_FLAX_PREFIXES = ('', 'opt/target/', 'params/', 'params/img/')
# big_vision (and linen-era vision_transformer) names of the block children -> ours.
_LINEN_BLOCK = re.compile(
    r'^(Transformer/encoderblock(?:_\d+)?/)(MultiHeadDotProductAttention_0|LayerNorm_1|'
    r'MlpBlock_0)/')
_LINEN_TO_OURS = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                  'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}


def _from_flax_names(arrays: dict, path: str) -> tuple[str, dict]:
  prefix = next((p for p in _FLAX_PREFIXES if f'{p}embedding/kernel' in arrays), None)
  if prefix is None:
    raise CheckpointError(f'{path}: not a ViT checkpoint: no embedding/kernel among its keys '
                          f'({_names(arrays)}).')
  big_vision = prefix.startswith('params/')
  flat = {}
  for key, value in arrays.items():
    if not key.startswith(prefix):
      continue  # optimizer state, the text tower of a two-tower model
    name = key[len(prefix):]
    if name == 'pos_embedding':  # big_vision keeps it at the top, without a class-token row
      name, big_vision = POSEMB, True
    renamed = _LINEN_BLOCK.sub(lambda m: m[1] + _LINEN_TO_OURS[m[2]] + '/', name)
    big_vision |= renamed != name
    flat[renamed] = value
  return ('big_vision' if big_vision else 'vit_jax'), traverse_util.unflatten_dict(flat, sep='/')


# ---------------------------------------------------------------------------------------
# PyTorch names (timm, MAE). One table serves import and export.
# ---------------------------------------------------------------------------------------


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


def _from_torch_names(state: dict, path: str) -> tuple[str, dict]:
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
    raise CheckpointError(f'{path}: keys with no equivalent in vit_jax models: {_names(unknown)}.')
  if 'embedding/kernel' not in flat:
    raise CheckpointError(f'{path}: not a ViT state dict: no patch_embed.proj.weight among its '
                          f'keys ({_names(state)}).')
  return ('mae' if is_mae else 'timm'), traverse_util.unflatten_dict(flat, sep='/')


# ---------------------------------------------------------------------------------------
# Fitting loaded arrays into a model.
# ---------------------------------------------------------------------------------------

_ATTENTION = re.compile(r'(.*/)?MultiHeadDotProductAttention_\d+/(query|key|value|out)/'
                        r'(kernel|bias)')


def _merge_heads(key: str, value: np.ndarray) -> np.ndarray:
  """(D, H, D/H) query/key/value kernels, (H, D/H, D) out kernels, (H, D/H) biases -> 2D/1D."""
  match = _ATTENTION.fullmatch(key)
  if not match:
    return value
  if match[3] == 'bias':
    return value.reshape(-1)
  if match[2] == 'out':
    return value.reshape(-1, value.shape[-1])
  return value.reshape(value.shape[0], -1)


@dataclasses.dataclass
class FitReport:
  """What fit_params did with each parameter; str() is one log line."""
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  reinitialised: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why
  adapted: dict[str, str] = dataclasses.field(default_factory=dict)  # posemb: resampled, ...
  missing: list[str] = dataclasses.field(default_factory=list)  # allowed; fresh init kept
  ignored: list[str] = dataclasses.field(default_factory=list)  # in the file, not used

  def __str__(self) -> str:
    parts = [f'{self.source}: loaded {len(self.loaded)} arrays']
    if self.reinitialised:
      reasons = sorted(set(self.reinitialised.values()))
      parts.append(f're-initialised {_names(self.reinitialised)} ({"; ".join(reasons)})')
    parts += [f'{key}: {note}' for key, note in self.adapted.items()]
    if self.missing:
      parts.append(f'not in the file, fresh init: {_names(self.missing)}')
    if self.ignored:
      parts.append(f'ignored: {_names(self.ignored)}')
    return '; '.join(parts)


_BLOCK_INDEX = re.compile(r'(encoderblock_|blocks\.)(\d+)')


def _names(keys, limit: int = 8) -> str:
  """Keys, short: 'Transformer/encoderblock_12..23 (192 arrays), head (2 arrays), cls'.

  Our names are cut to their first two levels; block indices are gathered into ranges.
  """
  groups = {}  # name with '#' for the block index -> (number of keys, block indices)
  for key in keys:
    name = '/'.join(key.split('/')[:2]) if key.count('/') >= 2 else key.split('/')[0]
    match = _BLOCK_INDEX.search(name)
    if match:
      name = name[:match.start(2)] + '#' + name[match.end(2):]
    count, indices = groups.get(name, (0, set()))
    groups[name] = (count + 1, indices | ({int(match[2])} if match else set()))
  shown = []
  for name, (count, indices) in list(groups.items())[:limit]:
    if indices:
      low, high = min(indices), max(indices)
      span = str(low) if low == high else (f'{low}..{high}' if len(indices) == high - low + 1
                                           else ','.join(map(str, sorted(indices))))
      name = name.replace('#', span)
    shown.append(f'{name} ({count} arrays)' if count > 1 else name)
  more = len(groups) - limit
  return ', '.join(shown) + (f' and {more} more' if more > 0 else '')


def _grid_and_prefix(tokens: int, grid, what: str, source: str) -> tuple[tuple[int, int], int]:
  """(rows, cols) and number of class-token rows of a (1, tokens, D) position embedding."""
  if grid is not None:
    prefix = tokens - grid[0] * grid[1]
    if prefix in (0, 1):
      return tuple(grid), prefix
    raise CheckpointError(f'{source}: {POSEMB} of the {what} has {tokens} tokens, which the '
                          f'grid {tuple(grid)} does not hold.')
  for prefix in (0, 1):
    side = math.isqrt(tokens - prefix)
    if side * side == tokens - prefix:
      return (side, side), prefix
  raise CheckpointError(f'{source}: cannot infer the patch grid of {POSEMB} of the {what} '
                        f'({tokens} tokens); pass old_grid/new_grid=(rows, cols).')


def _fit_posemb(value, shape, old_grid, new_grid, source) -> tuple[np.ndarray, str]:
  """A (1, tokens, D) position embedding of the file onto the model's grid and prefix."""
  old_grid, old_prefix = _grid_and_prefix(value.shape[1], old_grid, 'file', source)
  new_grid, new_prefix = _grid_and_prefix(shape[1], new_grid, 'model', source)
  grid = layers.resample_posemb(value[:, old_prefix:], new_grid, old_grid=old_grid)
  notes = []
  if old_grid != new_grid:
    notes.append(f'resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}')
  if old_prefix == new_prefix:
    prefix = value[:, :old_prefix]
  else:
    # A file without a class-token row (big_vision, timm no_embed_class) added nothing to
    # that token: zero is the same function. A model without a class token drops the row.
    prefix = np.zeros((1, new_prefix, shape[2]), value.dtype)
    notes.append('class-token row zero' if new_prefix else 'class-token row dropped')
  return np.concatenate([prefix, grid], axis=1), ', '.join(notes)


def _sincos_posemb(shape, new_grid, source) -> np.ndarray:
  grid, prefix = _grid_and_prefix(shape[1], new_grid, 'model', source)
  return np.pad(layers.sincos2d_table(grid, shape[2]), ((prefix, 0), (0, 0)))[None]


def _flat(tree) -> dict[str, np.ndarray]:
  """Nested or already flat ('/' keys) dict -> flat, unscanned, numpy."""
  tree = jax.device_get(tree)
  if any('/' in key for key in tree):
    tree = traverse_util.unflatten_dict(tree, sep='/')
  tree = layers.unscan_params(tree)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _is_scanned(tree) -> bool:
  return any('encoderblock' in path for path in traverse_util.flatten_dict(tree))


def fit_params(loaded, init_params, *, reinit=(), allow_missing=(), ignore_unexpected=(),
               old_grid=None, new_grid=None, source: str = 'checkpoint'
               ) -> tuple[dict, FitReport]:
  """Puts loaded arrays into freshly initialised parameters of the target model.

  Every leaf of `init_params` is taken from `loaded` by name, except:
    - names matching a regex of `reinit` keep their fresh init;
    - the head keeps its fresh init when the file has none or one of another shape
      (another number of classes);
    - Transformer/posembed_input/pos_embedding is resampled (bilinear, layers.resample_posemb)
      to the model's grid, its class-token row kept (zero when the file has no such row,
      dropped when the model has no class token); when the file has none (an MAE encoder,
      a sincos2d ViT), it starts from the fixed sincos2d table with a zero class-token
      row, as MAE fine-tuning does;
    - attention arrays with merged heads (from PyTorch files) are split into the model's
      heads;
    - names matching `allow_missing` may be absent from the file (fresh init kept).
  Names in the file that the model lacks are an error unless they match
  `ignore_unexpected`. Pass **MAE_TO_VIT to fine-tune or linearly probe from an MAE.

  Args:
    loaded: nested dict or flat dict with '/' keys of arrays in our naming, scanned or
      not (load_checkpoint_file, an Orbax restore).
    init_params: the target model's freshly initialised params (nested; numpy or
      host-addressable jax arrays), scanned (nn.scan) or not.
    reinit, allow_missing, ignore_unexpected: regexes, fully matched against the
      unscanned '/' names ('Transformer/encoderblock_3/...').
    old_grid, new_grid: (rows, cols) of the file's and the model's patch grid, needed
      only when they are not square (pass new_grid=model.grid to be safe).
    source: names the file in the report and in errors.
  Returns:
    (params, report): params has the structure, shapes and dtypes of `init_params`
    (numpy arrays); str(report) is one line for the log.
  Raises:
    CheckpointError: one line naming `source` and the keys that are missing, unexpected
      or of another shape (a checkpoint of another model size).
  """
  matches = lambda patterns, key: any(re.fullmatch(p, key) for p in patterns)  # noqa: E731
  target, src = _flat(init_params), _flat(loaded)
  report = FitReport(source)
  head_keys = [k for k in target if re.fullmatch(HEAD, k)]
  head_is_new = any(k not in src or src[k].shape != target[k].shape for k in head_keys)
  out, missing, mismatched = {}, [], []
  for key, fresh in target.items():
    out[key] = fresh
    value = src.get(key)
    if matches(reinit, key):
      report.reinitialised[key] = 'asked'
    elif key in head_keys and head_is_new:
      shapes = {k: src[k].shape for k in head_keys if k in src}
      report.reinitialised[key] = (
          'no head in the file' if not shapes else
          f'head {shapes.get("head/kernel")} in the file, {target.get("head/kernel").shape} '
          f'in the model')
    elif value is None and key == POSEMB:
      out[key] = _sincos_posemb(fresh.shape, new_grid, source).astype(fresh.dtype)
      report.adapted[key] = 'from the sincos2d table (none in the file)'
    elif value is None:
      (report.missing if matches(allow_missing, key) else missing).append(key)
    else:
      if key == POSEMB and value.shape != fresh.shape and value.shape[2:] == fresh.shape[2:]:
        value, note = _fit_posemb(value, fresh.shape, old_grid, new_grid, source)
        report.adapted[key] = note
      elif (_ATTENTION.fullmatch(key) and value.ndim < fresh.ndim
            and value.size == fresh.size):
        value = value.reshape(fresh.shape)  # merged heads: the split is a plain reshape
      if value.shape != fresh.shape:
        mismatched.append((key, f'{key} {tuple(value.shape)} in the file vs '
                                f'{tuple(fresh.shape)} in the model'))
        continue
      out[key] = value.astype(fresh.dtype)
      report.loaded.append(key)
  unexpected = []
  for key in src:
    if key not in target:
      (report.ignored if matches(ignore_unexpected, key) else unexpected).append(key)

  problems = []
  if mismatched:
    mismatched.sort(key=lambda item: len(item[0]))  # cls, embedding, ... before the blocks
    more = f' and {len(mismatched) - 3} more' if len(mismatched) > 3 else ''
    shown = '; '.join(text for _, text in mismatched[:3])
    problems.append(f'shapes differ: {shown}{more} (a checkpoint of another model size?)')
  if missing:
    problems.append(f'missing from the file: {_names(missing)}')
  if unexpected:
    problems.append(f'unexpected in the file: {_names(unexpected)}')
  if problems:
    hint = (' Allow them with allow_missing=/ignore_unexpected= regexes (interop.MAE_TO_VIT '
            'for an MAE encoder).' if (missing or unexpected) and not mismatched else '')
    raise CheckpointError(f'{source}: does not fit the model: {"; ".join(problems)}.{hint}')

  params = traverse_util.unflatten_dict(out, sep='/')
  if _is_scanned(init_params):
    params = jax.tree.map(np.asarray, layers.scan_params(params))
  return params, report


# ---------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------


def export_npz(params, path) -> None:
  """Writes params (scanned or not) as a vit_jax .npz: flat '/' keys, unscanned blocks."""
  with open(path, 'wb') as f:  # a file object: np.savez would otherwise append '.npz'
    np.savez(f, **_flat(params))


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
  flat = {k: _merge_heads(k, v.astype(np.float32)) for k, v in _flat(params).items()}
  if model.posemb == 'sincos2d':  # timm learns it; the fixed table is its starting value
    shape = (1, int(np.prod(model.grid)) + model.num_prefix_tokens, model.width)
    flat[POSEMB] = _sincos_posemb(shape, model.grid, 'model')
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
    raise ValueError(f'no timm name for {_names(set(flat) - used)}.')
  return state


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

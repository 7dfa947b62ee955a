"""Reading checkpoint files into our parameter names: `.npz` (vit_jax, AugReg, big_vision),
`.safetensors` and PyTorch files (timm, official MAE; names by torch_names.py).

Loading never runs code from a file: .npz with allow_pickle=False, PyTorch files with
torch.load(weights_only=True), safetensors by its own parser.
"""

import argparse
import io
import os
import re
import warnings

import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

from vit_jax.interop.common import POSEMB, CheckpointError, one_line, short_names
from vit_jax.interop.torch_names import from_torch_names

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
    path: a .npz, .safetensors, .pth, .pt or .bin file, local or gs:// (read whole into
      memory, then parsed).
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
  file = epath.Path(path)  # a local file or gs://
  if not file.is_file():
    raise CheckpointError(f'{path}: no such file.')
  # One read, parsed from memory: the same for a local file and a bucket.
  data = file.read_bytes()
  if not _looks_like(kind, data[:16], len(data)):
    raise CheckpointError(f'{path}: not a {ext} checkpoint (the file starts with {data[:8]!r}).')
  if kind == 'npz':
    return from_flax_names(_read_npz(data, path), path)
  arrays = _read_safetensors(data, path) if kind == 'safetensors' else _read_torch(data, path)
  if any('/' in key for key in arrays):  # flax names saved as safetensors
    return from_flax_names(arrays, path)
  return from_torch_names(arrays, path)


def _read_npz(data: bytes, path: str) -> dict[str, np.ndarray]:
  arrays = {}
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
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
    raise CheckpointError(f'{path}: not a readable .npz file ({one_line(e)}).') from None
  return arrays


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                      # numpy has no bfloat16; safetensors' numpy reader refuses it
                      'BF16': ml_dtypes.bfloat16}


def _read_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  try:
    tensors = safetensors.deserialize(data)  # checks the header and the offsets
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: not a readable .safetensors file ({one_line(e)}).') from None
  arrays = {}
  for key, tensor in tensors:
    dtype = _SAFETENSORS_DTYPES.get(tensor['dtype'])
    if dtype is None:
      raise CheckpointError(f'{path}: {key!r} has dtype {tensor["dtype"]}; '
                            'expected floats.')
    arrays[key] = np.frombuffer(tensor['data'], dtype).reshape(tensor['shape'])
  return arrays


def _read_torch(data: bytes, path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path}: reading PyTorch files needs torch (pip install -r '
                          f'requirements-interop.txt); or save the state dict as '
                          f'.safetensors.') from None
  try:
    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
      warnings.simplefilter('ignore')  # pickle protocol notes of the restricted unpickler
      obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    culprit = re.search(r'GLOBAL ([\w.]+)', str(e))
    reason = f'it calls {culprit[1]}' if culprit else one_line(e)
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


def from_flax_names(arrays: dict, path: str) -> tuple[str, dict]:
  """Flat '/' keys of a vit_jax or big_vision file -> (format, nested params in our names)."""
  prefix = next((p for p in _FLAX_PREFIXES if f'{p}embedding/kernel' in arrays), None)
  if prefix is None:
    raise CheckpointError(f'{path}: not a ViT checkpoint: no embedding/kernel among its keys '
                          f'({short_names(arrays)}).')
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


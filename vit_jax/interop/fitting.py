"""Fitting loaded arrays to a model: names, heads, position embeddings, the report."""

import dataclasses
import math
import re

import jax
import numpy as np
from flax import traverse_util

from vit_jax import param_tree
from vit_jax.interop.common import POSEMB, CheckpointError, short_names
from vit_jax.models import layers

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


# Attention arrays; PyTorch files hold them with merged heads.
ATTENTION = re.compile(r'(.*/)?MultiHeadDotProductAttention_\d+/(query|key|value|out)/'
                       r'(kernel|bias)')


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
      parts.append(f're-initialised {short_names(self.reinitialised)} ({"; ".join(reasons)})')
    parts += [f'{key}: {note}' for key, note in self.adapted.items()]
    if self.missing:
      parts.append(f'not in the file, fresh init: {short_names(self.missing)}')
    if self.ignored:
      parts.append(f'ignored: {short_names(self.ignored)}')
    return '; '.join(parts)


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


def fit_posemb(value, shape, old_grid, new_grid, source) -> tuple[np.ndarray, str]:
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


def sincos_posemb(shape, new_grid, source) -> np.ndarray:
  grid, prefix = _grid_and_prefix(shape[1], new_grid, 'model', source)
  return np.pad(layers.sincos2d_table(grid, shape[2]), ((prefix, 0), (0, 0)))[None]


def fit_params(loaded, init_params, *, reinit=(), allow_missing=(), ignore_unexpected=(),
               old_grid=None, new_grid=None, source: str = 'checkpoint'
               ) -> tuple[dict, FitReport]:
  """Puts loaded arrays into freshly initialised parameters of the target model.

  Every leaf of `init_params` is taken from `loaded` by name, except:
    - names matching a regex of `reinit` keep their fresh init;
    - the head keeps its fresh init when the file has none or one of another shape
      (another number of classes): `head_is_new`;
    - Transformer/posembed_input/pos_embedding is resampled (bilinear, layers.resample_posemb)
      to the model's grid, its class-token row kept (zero when the file has no such row,
      dropped when the model has no class token); when the file has none (an MAE encoder,
      a sincos2d ViT), it starts from the fixed sincos2d table with a zero class-token
      row, as MAE fine-tuning does: `fit_posemb`, `sincos_posemb`;
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
      or of another shape (a checkpoint of another model size): `check_fit`.
  """
  matches = lambda patterns, key: any(re.fullmatch(p, key) for p in patterns)  # noqa: E731
  target, src = param_tree.flat_numpy(init_params), param_tree.flat_numpy(loaded)
  report = FitReport(source)
  new_head = head_is_new(src, target)
  out, missing, mismatched = {}, [], []
  for key, fresh in target.items():
    out[key] = fresh
    value = src.get(key)
    if matches(reinit, key):
      report.reinitialised[key] = 'asked'
    elif new_head and re.fullmatch(HEAD, key):
      report.reinitialised[key] = new_head
    elif value is None and key == POSEMB:
      out[key] = sincos_posemb(fresh.shape, new_grid, source).astype(fresh.dtype)
      report.adapted[key] = 'from the sincos2d table (none in the file)'
    elif value is None:
      (report.missing if matches(allow_missing, key) else missing).append(key)
    else:
      if key == POSEMB and value.shape != fresh.shape and value.shape[2:] == fresh.shape[2:]:
        value, report.adapted[key] = fit_posemb(value, fresh.shape, old_grid, new_grid, source)
      elif ATTENTION.fullmatch(key) and value.ndim < fresh.ndim and value.size == fresh.size:
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
  check_fit(source, mismatched=mismatched, missing=missing, unexpected=unexpected)

  params = traverse_util.unflatten_dict(out, sep='/')
  if param_tree.is_scanned(init_params):
    params = jax.tree.map(np.asarray, param_tree.scan_params(params))
  return params, report


def head_is_new(loaded: dict, target: dict) -> str:
  """Why the model's head keeps its fresh init ('' when it loads): the file has no head,
  or one of another shape (another number of classes). Both dicts are flat ('/' keys)."""
  head_keys = [k for k in target if re.fullmatch(HEAD, k)]
  if not any(k not in loaded or loaded[k].shape != target[k].shape for k in head_keys):
    return ''
  shapes = {k: loaded[k].shape for k in head_keys if k in loaded}
  if not shapes:
    return 'no head in the file'
  return (f'head {shapes.get("head/kernel")} in the file, {target["head/kernel"].shape} '
          f'in the model')


def check_fit(source: str, *, mismatched, missing, unexpected) -> None:
  """Raises one CheckpointError line for everything that does not fit, if anything.

  mismatched: (key, description) pairs of arrays of another shape; missing, unexpected:
  keys the file lacks or has beyond the model (after the allow/ignore regexes).
  """
  problems = []
  if mismatched:
    mismatched = sorted(mismatched, key=lambda item: len(item[0]))  # cls, embedding first
    more = f' and {len(mismatched) - 3} more' if len(mismatched) > 3 else ''
    shown = '; '.join(text for _, text in mismatched[:3])
    problems.append(f'shapes differ: {shown}{more} (a checkpoint of another model size?)')
  if missing:
    problems.append(f'missing from the file: {short_names(missing)}')
  if unexpected:
    problems.append(f'unexpected in the file: {short_names(unexpected)}')
  if problems:
    hint = (' Allow them with allow_missing=/ignore_unexpected= regexes (interop.MAE_TO_VIT '
            'for an MAE encoder).' if (missing or unexpected) and not mismatched else '')
    raise CheckpointError(f'{source}: does not fit the model: {"; ".join(problems)}.{hint}')


def model_fields(flat: dict) -> dict:
  """The ViT fields a checkpoint's arrays show (all but the number of heads).

  Args:
    flat: flat '/' keys, unscanned (param_tree.flat_numpy of any loaded tree).
  Returns:
    patch_size, channels, width, depth, mlp_dim, class_token, fc_norm,
    representation_size, pool, posemb, num_classes (0 without a head) and image_size
    (when a learned position table is square).
  """
  if 'embedding/kernel' not in flat:
    raise CheckpointError(f'the checkpoint has no embedding/kernel (keys: {sorted(flat)[:6]} '
                          '...); it is not a ViT or MAE encoder.')
  patch, _, channels, width = flat['embedding/kernel'].shape
  blocks = {key.split('/')[1] for key in flat if key.startswith('Transformer/encoderblock_')}
  fields = dict(patch_size=patch, channels=channels, width=width, depth=len(blocks),
                mlp_dim=flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape[1],
                class_token='cls' in flat, fc_norm='fc_norm/scale' in flat,
                representation_size=(flat['pre_logits/kernel'].shape[1]
                                     if 'pre_logits/kernel' in flat else None),
                num_classes=flat['head/kernel'].shape[-1] if 'head/kernel' in flat else 0)
  fields['pool'] = ('map' if any(k.startswith('MAPHead_0/') for k in flat) else
                    'gap' if fields['fc_norm'] or not fields['class_token'] else 'tok')
  if POSEMB in flat:
    fields['posemb'] = 'learn'
    side = math.isqrt(flat[POSEMB].shape[1] - int(fields['class_token']))
    if side * side == flat[POSEMB].shape[1] - int(fields['class_token']):
      fields['image_size'] = side * patch
  else:
    fields['posemb'] = 'sincos2d'  # MAE encoders: the fixed table is not stored
  return fields

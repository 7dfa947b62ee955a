"""Named model variants: `get_model('ViT-B/16')`, `get_model('MAE-L/16', mask_ratio=0.9)`.

Sizes are those of the ViT paper (Ti and S from DeiT/AugReg, mu and M from big_vision),
and H/g/G of the scaling papers. Any patch size is accepted after the slash.

The one way to build the model of a config and its fresh variables:

  model = from_config(config, num_classes=10)     # get_model(config.model_name, ...)
  variables = init_variables(model, jax.random.key(0))
"""

import dataclasses
import re

import jax
import jax.numpy as jnp

from vit_jax.models import layers, ops
from vit_jax.models.mae import MAE
from vit_jax.models.vit import ViT

# name: (width, depth, mlp_dim, num_heads)
VARIANTS = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
}
# MAE decoders of the small variants, for tests and demos; from B up the paper's
# decoder (width 512, depth 8, 16 heads, MLP 2048) is the MAE default.
# name: (decoder_width, decoder_depth, decoder_mlp_dim, decoder_num_heads)
SMALL_MAE_DECODERS = {
    'mu': (32, 1, 128, 2),
    'Ti': (128, 4, 512, 4),
    'S': (256, 4, 1024, 8),
}
FAMILIES = {'ViT': ViT, 'MAE': MAE}
_NAME = re.compile(r'^(?P<family>[A-Za-z]+)-(?P<variant>[A-Za-z]+)/(?P<patch>\d+)$')


def known_names() -> str:
  return (f"{{{','.join(FAMILIES)}}}-{{{','.join(VARIANTS)}}}/<patch size>, "
          f"e.g. ViT-B/16, ViT-H/14, MAE-L/16")


def parse_name(name: str) -> tuple[type, dict]:
  """'ViT-B/16' -> (ViT, dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16))."""
  match = _NAME.match(name)
  if not match or match['family'] not in FAMILIES or match['variant'] not in VARIANTS:
    raise ValueError(f'Unknown model name {name!r}. Known names: {known_names()}.')
  width, depth, mlp_dim, num_heads = VARIANTS[match['variant']]
  fields = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                patch_size=int(match['patch']))
  if match['family'] == 'MAE' and match['variant'] in SMALL_MAE_DECODERS:
    width, depth, mlp_dim, num_heads = SMALL_MAE_DECODERS[match['variant']]
    fields.update(decoder_width=width, decoder_depth=depth, decoder_mlp_dim=mlp_dim,
                  decoder_num_heads=num_heads)
  return FAMILIES[match['family']], fields


def get_model(name: str, **overrides):
  """Returns the linen Module for `name`, with any field overridden.

  Raises ValueError for an unknown name (listing the known ones), an unknown field
  (listing the valid ones) or fields that do not make a model.
  """
  cls, fields = parse_name(name)
  valid = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise ValueError(f'{name}: unknown model field(s) {unknown}. Valid fields: {sorted(valid)}.')
  fields.update(overrides)
  return cls(**fields)


def from_config(config, **overrides):
  """The model of a config: `config.model_name` with the fields of `config.model`.

  `overrides` are what the objective sets (num_classes, ...); `config.model` wins over
  them, so that a config can say anything.
  """
  return get_model(config.model_name, **{**overrides, **config.model})


def input_shape(model) -> tuple[int, int, int]:
  """(height, width, channels) of the images `model` takes."""
  return (*layers.pair(model.image_size), model.channels)


def init_variables(model, key: jax.Array) -> dict:
  """Fresh variables of `model` (params, and batch_stats where it has BatchNorm).

  `key` is split into the 'params', 'masking' and 'dropout' streams the models draw from;
  the same key gives the same parameters on any device count and in any script.
  """
  params_key, masking_key, dropout_key = jax.random.split(key, 3)
  return model.init({'params': params_key, 'masking': masking_key, 'dropout': dropout_key},
                    jnp.zeros((1, *input_shape(model)), jnp.float32), train=False)


__all__ = ['ViT', 'MAE', 'get_model', 'from_config', 'init_variables', 'input_shape',
           'known_names', 'layers', 'ops', 'VARIANTS']

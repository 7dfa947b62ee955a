r"""Converts a checkpoint for a named model: public files -> Orbax, and ours -> timm/npz.

A public file (vit_jax/AugReg/big_vision .npz, timm .safetensors/.pth, official MAE
.pth) to an Orbax checkpoint {'params': ...} that config.init.path reads:

  python scripts/convert_checkpoint.py --input=ViT-B_16.npz --model=ViT-B/16 \
      --num_classes=10 --image_size=384 --output=/tmp/vit_b16_384

The parameters are fitted to the model as the training loop does (vit_jax.interop.fit_params):
position embeddings resampled to the new resolution, a head of another size
re-initialised; an MAE checkpoint going into a ViT gets interop.MAE_TO_VIT (decoder
dropped, posemb from the sincos2d table). One line reports what was loaded.

Any checkpoint we read (a file, a training workdir, an Orbax folder) to timm or vit_jax:

  python scripts/convert_checkpoint.py --input=runs/ft_b16 --model=ViT-B/16 \
      --num_classes=1000 --model_overrides=pool=gap --to=timm --output=vit_b16.safetensors
"""

import ast
import os
import sys

from absl import app, flags
import jax
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import checkpoint, interop, models  # noqa: E402

_INPUT = flags.DEFINE_string('input', None, 'Checkpoint file, workdir or Orbax folder.',
                             required=True)
_MODEL = flags.DEFINE_string('model', None, 'Target model name, e.g. ViT-B/16.', required=True)
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Classes of the target head.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Target resolution.')
_OVERRIDES = flags.DEFINE_list('model_overrides', [],
                               'More get_model fields as key=value (Python literals).')
_REINIT = flags.DEFINE_multi_string('reinit', [], 'Regex of parameters to re-initialise.')
_ALLOW_MISSING = flags.DEFINE_multi_string('allow_missing', [],
                                           'Regex of parameters that may be absent.')
_IGNORE = flags.DEFINE_multi_string('ignore_unexpected', [],
                                    'Regex of entries of the input to leave out.')
_TO = flags.DEFINE_enum('to', 'orbax', ['orbax', 'npz', 'timm'], 'Output format.')
_OUTPUT = flags.DEFINE_string('output', None, 'Orbax folder (must not exist) or file.',
                              required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the fresh parameters (new head, ...).')


def parse_overrides(items) -> dict:
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--model_overrides entry {item!r} is not key=value.')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a bare string such as pool=gap
  return overrides


def convert(input_path, model, *, reinit=(), allow_missing=(), ignore_unexpected=(), seed=0):
  """Reads `input_path` and fits it to `model`; returns (params, report line)."""
  source, loaded = checkpoint.load_params(input_path)
  options = dict(reinit=tuple(reinit), allow_missing=tuple(allow_missing),
                 ignore_unexpected=tuple(ignore_unexpected))
  is_mae_source = source == 'mae' or 'mask_token' in loaded
  if isinstance(model, models.ViT) and is_mae_source:
    options = {k: v + interop.MAE_TO_VIT[k] for k, v in options.items()}
  init = jax.jit(lambda key: models.init_variables(model, key)['params'])
  fresh = jax.device_get(init(jax.random.key(seed)))
  params, report = interop.fit_params(loaded, fresh, new_grid=model.grid,
                                      source=f'{input_path} ({source})', **options)
  return params, str(report)


def main(argv):
  del argv
  overrides = parse_overrides(_OVERRIDES.value)
  if _NUM_CLASSES.value is not None:
    overrides['num_classes'] = _NUM_CLASSES.value
  if _IMAGE_SIZE.value is not None:
    overrides['image_size'] = _IMAGE_SIZE.value
  model = models.get_model(_MODEL.value, **overrides)
  params, report = convert(_INPUT.value, model, reinit=_REINIT.value,
                           allow_missing=_ALLOW_MISSING.value, ignore_unexpected=_IGNORE.value,
                           seed=_SEED.value)
  print(report)
  output = os.path.abspath(_OUTPUT.value)
  if _TO.value == 'orbax':
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(output, {'params': params})
  elif _TO.value == 'npz':
    interop.export_npz(params, output)
  else:
    kwargs = interop.export_timm_safetensors(params, model, output)
    print(f'timm: VisionTransformer(**{kwargs})')
  print(f'Wrote {output}')


if __name__ == '__main__':
  app.run(main)

r"""The four-panel MAE figure (original, masked, reconstruction, reconstruction + visible).

From a training workdir (its config.json and latest checkpoint), on its eval images:

  python scripts/visualize_mae.py --workdir=runs/mae_demo --output=recon.png

From fresh weights of a named model, on image files or the demo data:

  python scripts/visualize_mae.py --model=MAE-B/16 --images=a.jpg,b.png --output=recon.png

From an official facebookresearch/mae checkpoint (the full encoder+decoder release):

  python scripts/visualize_mae.py --model=MAE-L/16 --checkpoint=mae_visualize_vit_large.pth \
      --norm_pix_loss --images=a.jpg
"""

import os
import sys

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import checkpoint, data, interop, models, sharding, train, visualize  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir of an MAE run.')
_MODEL = flags.DEFINE_string('model', None, 'Model name when there is no workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights file or Orbax folder.')
_NORM_PIX = flags.DEFINE_bool('norm_pix_loss', False, 'The model predicts normalised patches.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files; default: the eval split of the data.')
_NUM = flags.DEFINE_integer('num_images', 8, 'How many images.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the masks (and of fresh weights).')
_OUTPUT = flags.DEFINE_string('output', 'reconstructions.png', 'PNG to write.')



def main(argv):
  del argv
  if _WORKDIR.value:
    config = train.load_config_json(_WORKDIR.value)
    model = models.from_config(config)
    mean, std = config.data.mean, config.data.std
    _, params = checkpoint.load_params(_CHECKPOINT.value or _WORKDIR.value)
  elif _MODEL.value:
    model = models.get_model(_MODEL.value, norm_pix_loss=_NORM_PIX.value)
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    config = None
    params = jax.device_get(models.init_variables(model, jax.random.key(_SEED.value))['params'])
    if _CHECKPOINT.value:
      _, loaded = checkpoint.load_params(_CHECKPOINT.value)
      params, report = interop.fit_params(loaded, params)
      print(report)
  else:
    raise app.UsageError('Give --workdir or --model.')
  if model.__class__.__name__ != 'MAE':
    raise app.UsageError(f'{model.__class__.__name__} is not an MAE model.')

  if _IMAGES.value:
    images = visualize.load_image_files(_IMAGES.value, model, mean, std)
  elif config is not None:
    mesh = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
    batch = next(iter(data.eval_iterator(config.data, global_batch_size=_NUM.value, mesh=mesh,
                                         image_size=model.image_size, channels=model.channels)))
    images = np.asarray(batch['image'])
  else:
    raise app.UsageError('Give --images (fresh weights have no dataset).')
  path = visualize.save_reconstructions(model, params, images[:_NUM.value], _OUTPUT.value,
                                        mean=mean, std=std, seed=_SEED.value)
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)

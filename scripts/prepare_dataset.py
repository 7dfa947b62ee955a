r"""Prepares a dataset once, as TFDS ArrayRecord files that training reads without TensorFlow.

  # The full Fashion-MNIST from its IDX files (apt-get install dataset-fashion-mnist):
  python scripts/prepare_dataset.py --dataset=fashion_mnist
  # Your own images, in ROOT/CLASS/*.jpg (or ROOT/{train,val}/CLASS/*.jpg):
  python scripts/prepare_dataset.py --dataset=image_folder --source_dir=/data/flowers
  # A TFDS dataset; manual_dir holds files downloaded by hand where a dataset needs them:
  python scripts/prepare_dataset.py --dataset=imagenet2012 --manual_dir=/data/imagenet
  # The demo (done automatically by training when missing):
  python scripts/prepare_dataset.py --dataset=fashion_mnist_t10k

--data_dir defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets, as in training. Some
TFDS builders (imagenet2012, cifar10, mnist, ...) use TensorFlow to prepare; install it
for this command only. Prints the dataset's directory and split sizes.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import data  # noqa: E402
from vit_jax.data import datasets  # noqa: E402

_DATASET = flags.DEFINE_string('dataset', data.DEMO_DATASET,
                               "'fashion_mnist_t10k', 'fashion_mnist', 'image_folder' or a "
                               'TFDS name (with optional /config and :version).')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'Where to write; default $TFDS_DATA_DIR or ~/tensorflow_datasets.')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None,
                                  'fashion_mnist: directory of the IDX files (default '
                                  '/usr/share/datasets/fashion-mnist); image_folder: the folder.')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'TFDS builders that need a manual download read it here.')


def main(argv):
  del argv
  config = data.default_data_config()
  config.name = _DATASET.value
  config.data_dir, config.source_dir = _DATA_DIR.value, _SOURCE_DIR.value
  try:
    path = datasets.prepare(config.name, datasets.data_dir_of(config),
                            source_dir=_SOURCE_DIR.value, manual_dir=_MANUAL_DIR.value)
  except (FileNotFoundError, ModuleNotFoundError, ValueError, AssertionError) as e:
    # TFDS says what is missing (a manual download, TensorFlow, a folder): say only that.
    sys.exit(f'Error: prepare_dataset.py --dataset={config.name}: {" ".join(str(e).split())}')
  info = data.dataset_info(config)
  print(f'{config.name}: prepared in {path}')
  print(f'  splits {info.num_examples}, {info.num_classes} classes, image shape {info.image_shape}')
  flags_to_train = [f'--config.data.name={config.name}',
                    f'--config.data.data_dir={datasets.data_dir_of(config)}']
  if config.source_dir:
    flags_to_train.append(f'--config.data.source_dir={config.source_dir}')
  print('  train with ' + ' '.join(flags_to_train))


if __name__ == '__main__':
  app.run(main)

"""Input pipeline: TFDS datasets in ArrayRecord, read without TensorFlow, fed by grain.

The training loop uses five functions:

  cfg = default_data_config()          # start a config's `data` from here
  ensure_prepared(cfg)                 # once, in main(), before building anything
  info = dataset_info(cfg)             # num_classes, split sizes, image shape, names
  batches = train_iterator(cfg, global_batch_size=..., mesh=..., image_size=...,
                           channels=..., seed=...)        # infinite, resumable
  for batch in eval_iterator(cfg, global_batch_size=..., mesh=..., image_size=...,
                             channels=...):               # one exact, padded pass
    ...

and, inside the jitted step, `mixup.mix`. Datasets are
prepared once with `python scripts/prepare_dataset.py --dataset=NAME ...`; the built-in
demo ('fashion_mnist_t10k', shipped in the package) is prepared automatically.

Host-local pieces for tests and tools: `pipeline.train_batches` / `pipeline.eval_batches`
give one process's numpy batches as a grain.MapDataset (batch k is `dataset[k]`), with the
source index of every example under 'index'.
"""

import ml_collections

from vit_jax.data import datasets, pipeline
from vit_jax.data.datasets import DEMO_DATASET, DatasetInfo, MissingDatasetError
from vit_jax.data.pipeline import EvalIterable, TrainIterator

__all__ = ['DEMO_DATASET', 'DatasetInfo', 'EvalIterable', 'MissingDatasetError',
           'TrainIterator', 'check_dataset', 'dataset_info', 'default_data_config',
           'ensure_prepared', 'eval_iterator', 'train_iterator']


# Channel means and standard deviations of ImageNet's pixels in [0, 1] (torchvision's).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def default_data_config() -> ml_collections.ConfigDict:
  """Every key the input pipeline reads, with its default."""
  return ml_collections.ConfigDict(dict(
      # 'fashion_mnist_t10k' (demo, ships in the package), 'fashion_mnist',
      # 'image_folder', or any TFDS name prepared as ArrayRecord ('imagenet2012', ...).
      name=DEMO_DATASET,
      # Where prepared datasets live; '': $TFDS_DATA_DIR, else ~/tensorflow_datasets.
      # (Defaults are '' and 0 rather than None so that --config.data.KEY=... overrides.)
      data_dir='',
      # Raw files: the IDX directory for fashion_mnist ('': Debian's
      # /usr/share/datasets/fashion-mnist), the class-folder root for image_folder.
      source_dir='',
      # TFDS split strings; slices allowed ('train[:90%]').
      train_split='train',
      eval_split='test',
      # Random resized crop: area fraction and aspect ratio ranges (MAE: (0.2, 1.0)).
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip=True,
      # RandAugment: layers per image (0 = off) and magnitude in [0, 10].
      randaugment_layers=0,
      randaugment_magnitude=9.0,
      # Random erasing: probability that a rectangle of a training image becomes noise
      # (after normalisation; 0 = off; the MAE fine-tuning recipe: 0.25).
      random_erasing=0.0,
      # Evaluation keeps the central crop_fraction of the shorter side, i.e. resizes to
      # image_size / fraction and cuts the centre: 0.875 ImageNet style, 1.0 whole image.
      eval_crop_fraction=0.875,
      # Resampling of every resize: 'bilinear' or 'bicubic'.
      interpolation='bilinear',
      # Normalisation of pixel values in [0, 1]: one value or one per channel.
      # (0.5,)/(0.5,) maps to [-1, 1]; ImageNet statistics are IMAGENET_MEAN/IMAGENET_STD.
      mean=(0.5,),
      std=(0.5,),
      # What transparent pixels (images with alpha, kept by the image_folder builder) are
      # composited onto: 'contrast' (black under a light glyph, white under a dark one),
      # 'white', 'gray' or 'black'. A fixed colour makes glyphs of that colour vanish;
      # measured in docs/data.md ("Transparent images").
      transparent_background='contrast',
      # Host threads preparing whole batches (0: one per CPU core, at most 16; JPEG
      # decoding scales with them, while tiny images run fastest with 1 on 2 cores), and
      # host batches kept ready ahead (at least one per thread).
      num_threads=0,
      prefetch=4,
      # A split whose decoded images take at most this many megabytes (Fashion-MNIST's
      # 60,000: 45) is decoded once into memory and read from there; 0: always from files.
      cache_mb=1024,
  ))


def ensure_prepared(data_config) -> None:
  """Prepares the demo dataset if missing (under a file lock, so concurrent processes on
  one machine are safe); any other missing dataset raises MissingDatasetError naming the
  dataset, the data_dir and the exact `python scripts/prepare_dataset.py ...` command."""
  datasets.ensure_prepared(data_config)


def dataset_info(data_config) -> DatasetInfo:
  """num_classes, num_examples per split (split_size(s) for slices), image shape, names."""
  return datasets.read_info(data_config)


check_dataset = datasets.check_dataset
train_iterator = pipeline.train_iterator
eval_iterator = pipeline.eval_iterator

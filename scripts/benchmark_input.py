r"""Images per second of the training input pipeline, measured after a warm-up.

  # The demo at the demo model's size:
  python scripts/benchmark_input.py --dataset=fashion_mnist_t10k --batch_size=256 \
      --image_size=28 --channels=3
  # The data section of a config (flags still set batch size and image size):
  python scripts/benchmark_input.py --config=configs/mae_pretrain.py:demo
  # ImageNet-like: N synthetic 500x375 JPEG photos, prepared as an image_folder in a
  # temporary directory (removed afterwards), at 224:
  python scripts/benchmark_input.py --synthetic_jpegs=2000 --image_size=224 --batch_size=128

Prints one markdown table row per run: 'host' is the grain pipeline alone (numpy batches
of this process); 'device' adds the transfer into global jax.Arrays on the local mesh,
what the training loop sees. A pipeline keeps up when its rate exceeds what the train
step consumes (global_batch_size / step time).
"""

import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import data, sharding  # noqa: E402
from vit_jax.data import datasets, pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file whose `data` to use.')
_DATASET = flags.DEFINE_string('dataset', None, 'Dataset name (overrides the config).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Data directory (overrides the config).')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None, 'Source folder (image_folder).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 28, 'Side of the model input.')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Channels of the model input.')
_RANDAUGMENT = flags.DEFINE_integer('randaugment_layers', None, 'Overrides the config.')
_NUM_THREADS = flags.DEFINE_integer('num_threads', None, 'Overrides data.num_threads.')
_STEPS = flags.DEFINE_integer('steps', 40, 'Batches timed.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Batches before timing starts.')
_SYNTHETIC_JPEGS = flags.DEFINE_integer(
    'synthetic_jpegs', 0, 'If > 0: write this many synthetic 500x375 JPEGs in 10 classes '
    'to a temporary folder, prepare it as image_folder there and benchmark that.')


def write_synthetic_jpegs(root: str, count: int, seed: int = 0) -> None:
  """Smooth random 500x375 photos (about ImageNet's median size, JPEG quality 90): they
  decode at a cost close to real photos, which noise images would exaggerate."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for i in range(count):
    class_dir = os.path.join(root, f'class_{i % 10}')
    os.makedirs(class_dir, exist_ok=True)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
    detail = rng.normal(0, 12, (375, 500, 3))
    pixels = np.clip(np.asarray(image, np.float32) + detail, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(class_dir, f'{i:06d}.jpg'), quality=90)


def images_per_second(next_batch, batch_size: int, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    next_batch()
  start = time.perf_counter()
  for _ in range(steps):
    batch = next_batch()
  if hasattr(batch['image'], 'block_until_ready'):
    batch['image'].block_until_ready()
  return steps * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  config = _CONFIG.value.data if _CONFIG.value is not None else data.default_data_config()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, flag in (('name', _DATASET), ('data_dir', _DATA_DIR), ('source_dir', _SOURCE_DIR),
                      ('randaugment_layers', _RANDAUGMENT), ('num_threads', _NUM_THREADS)):
      if flag.value is not None:
        config[key] = flag.value
  if not _SYNTHETIC_JPEGS.value:
    benchmark(config)
    return
  with tempfile.TemporaryDirectory(prefix='vit_jax_bench_') as workspace:
    with config.unlocked():
      config.name, config.source_dir = 'image_folder', os.path.join(workspace, 'images')
      config.data_dir = os.path.join(workspace, 'data')  # Removed with the images.
    write_synthetic_jpegs(config.source_dir, _SYNTHETIC_JPEGS.value)
    datasets.prepare('image_folder', datasets.data_dir_of(config), source_dir=config.source_dir)
    benchmark(config)


def benchmark(config) -> None:
  data.ensure_prepared(config)
  mesh = sharding.make_mesh()
  kwargs = dict(global_batch_size=_BATCH_SIZE.value, mesh=mesh, image_size=_IMAGE_SIZE.value,
                channels=_CHANNELS.value, seed=0)
  train = data.train_iterator(config, **kwargs)
  host_iter = iter(train.host_batches.to_iter_dataset(pipeline.read_options(config)))
  host = images_per_second(lambda: next(host_iter), _BATCH_SIZE.value, _STEPS.value, _WARMUP.value)
  host_iter.close()  # Its threads would compete with the next measurement.
  device = images_per_second(lambda: next(train), _BATCH_SIZE.value, _STEPS.value, _WARMUP.value)
  train.close()

  print('| dataset | batch | image | randaugment | threads | host img/s | device img/s |')
  print('|---|---|---|---|---|---|---|')
  print(f'| {config.name} | {_BATCH_SIZE.value} | {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}x'
        f'{_CHANNELS.value} | {config.randaugment_layers} | '
        f'{pipeline.read_options(config).num_threads} | '
        f'{host:,.0f} | {device:,.0f} |')


if __name__ == '__main__':
  app.run(main)

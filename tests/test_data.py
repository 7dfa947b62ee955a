"""Datasets and pipelines: preparation, errors, process shards, exact eval, exact resume."""

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import warnings

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import data, sharding
from vit_jax.data import builders, datasets, pipeline

IMAGE_SIZE = 16


def write_image_folder(root, *, classes=('ant', 'bee', 'cat'), per_class=7, grayscale=False,
                       corrupt=(), seed=0):
  """Small images of varied sizes, JPEG and PNG (some grayscale unless all are)."""
  rng = np.random.default_rng(seed)
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      height, width = rng.integers(12, 40, size=2)
      pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      pixels[..., 0] = 30 * c  # Class-dependent colour.
      image = Image.fromarray(pixels)
      if grayscale or i == 2:
        image = image.convert('L')
      image.save(os.path.join(root, name, f'{i}.{"png" if i % 2 else "jpg"}'))
  for relative_path in corrupt:
    with open(os.path.join(root, relative_path), 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 this is not a whole JPEG')


def config_for(name, data_dir, **overrides):
  config = data.default_data_config()
  config.name, config.data_dir = name, str(data_dir)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def demo_config(tmp_path_factory):
  """The demo prepared in a fresh data_dir with every network connection refused."""
  def refuse(*args, **kwargs):
    raise OSError('network access attempted while preparing the demo')
  original_connect = socket.socket.connect
  socket.socket.connect = refuse
  try:
    config = config_for(data.DEMO_DATASET, tmp_path_factory.mktemp('tfds'))
    data.ensure_prepared(config)
  finally:
    socket.socket.connect = original_connect
  return config


@pytest.fixture(scope='module')
def prepared_folder(tmp_path_factory):
  """21 readable images in 3 classes plus 2 corrupt files, prepared once.

  Returns (config, messages of the warnings raised while preparing)."""
  root = tmp_path_factory.mktemp('folder') / 'pets'
  write_image_folder(str(root), corrupt=('ant/broken.jpg', 'cat/empty.png'))
  open(root / 'cat' / 'empty.png', 'wb').close()
  data_dir = tmp_path_factory.mktemp('tfds')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    datasets.prepare('image_folder', str(data_dir), source_dir=str(root))
  config = config_for('image_folder', data_dir, source_dir=str(root), eval_split='train')
  return config, [str(w.message) for w in caught if 'skipped' in str(w.message)]


@pytest.fixture
def folder_config(prepared_folder):
  return prepared_folder[0]


def host_train(config, *, batch, seed=0, process_index=0, process_count=1, channels=3):
  return pipeline.train_batches(config, local_batch_size=batch, image_size=IMAGE_SIZE,
                                channels=channels, seed=seed, process_index=process_index,
                                process_count=process_count)


def host_eval(config, *, batch, process_index=0, process_count=1, split=None):
  return pipeline.eval_batches(config, local_batch_size=batch, image_size=IMAGE_SIZE,
                               channels=3, split=split or config.eval_split,
                               process_index=process_index, process_count=process_count)


# ---------------------------------------------------------------------------------------
# Datasets.

def test_demo_prepares_offline_with_class_balanced_splits(demo_config):
  info = data.dataset_info(demo_config)
  assert info.num_examples == {'train': 8000, 'test': 2000}
  assert info.num_classes == 10 and info.class_names[0] == 'T-shirt/top'
  assert info.image_shape == (28, 28, 1)
  assert info.split_size('train[:25%]') == 2000
  labels = {split: np.array([ex['label'] for ex in datasets.open_split(demo_config, split)
                             .source.__getitems__(list(range(n)))])
            for split, n in info.num_examples.items()}
  assert np.bincount(labels['test']).tolist() == [200] * 10
  assert np.bincount(labels['train']).tolist() == [800] * 10


def test_demo_prepared_concurrently_by_two_processes_on_one_machine(tmp_path):
  config = config_for(data.DEMO_DATASET, tmp_path)
  errors = []

  def start():
    try:
      data.ensure_prepared(config)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=start) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert os.listdir(tmp_path / data.DEMO_DATASET) == ['1.0.0']
  assert data.dataset_info(config).num_examples['train'] == 8000


@pytest.mark.parametrize('name, expected_command', [
    ('fashion_mnist', 'python scripts/prepare_dataset.py --dataset=fashion_mnist '
                      '--data_dir={data_dir} --source_dir=/usr/share/datasets/fashion-mnist'),
    ('cifar10', 'python scripts/prepare_dataset.py --dataset=cifar10 --data_dir={data_dir}'),
])
def test_missing_dataset_names_dataset_dir_and_command_and_prepares_nothing(
    tmp_path, name, expected_command):
  config = config_for(name, tmp_path)
  with pytest.raises(data.MissingDatasetError) as error:
    data.ensure_prepared(config)
  message = str(error.value)
  assert f"'{name}'" in message and str(tmp_path) in message
  assert expected_command.format(data_dir=tmp_path) in message
  assert not (tmp_path / name).exists()
  with pytest.raises(data.MissingDatasetError):
    pipeline.train_batches(config, local_batch_size=8, image_size=8, channels=1, seed=0,
                           process_index=0, process_count=1)


def test_missing_image_folder_command_names_the_folder(tmp_path):
  config = config_for('image_folder', tmp_path / 'tfds', source_dir=str(tmp_path / 'my images'))
  with pytest.raises(data.MissingDatasetError) as error:
    data.ensure_prepared(config)
  assert shlex.quote(f'--source_dir={tmp_path / "my images"}') in str(error.value)


def test_unknown_dataset_name_is_refused(tmp_path):
  with pytest.raises(ValueError, match='no_such_dataset_xyz'):
    data.ensure_prepared(config_for('no_such_dataset_xyz', tmp_path))


def test_image_folder_skips_corrupt_files_with_count_and_names(prepared_folder):
  folder_config, messages = prepared_folder
  assert len(messages) == 1
  message = messages[0]
  assert 'skipped 2 ' in message
  assert 'ant/broken.jpg' in message and 'cat/empty.png' in message
  info = data.dataset_info(folder_config)
  assert info.num_examples == {'train': 21}
  assert info.class_names == ('ant', 'bee', 'cat')
  assert info.image_shape == (None, None, 3)  # Colour and grayscale files -> RGB.


def test_image_folder_grayscale_split_folders_and_no_collisions(tmp_path):
  # Two folders with the same name in different places, one with train/val splits.
  first, second = tmp_path / 'a' / 'photos', tmp_path / 'b' / 'photos'
  write_image_folder(str(first), per_class=2, grayscale=True)
  write_image_folder(str(second / 'train'), classes=('x', 'y'), per_class=3)
  write_image_folder(str(second / 'val'), classes=('x', 'y'), per_class=1)
  data_dir = tmp_path / 'tfds'
  paths = {datasets.prepare('image_folder', str(data_dir), source_dir=str(f))
           for f in (first, second)}
  assert len(paths) == 2
  gray = data.dataset_info(config_for('image_folder', data_dir, source_dir=str(first)))
  split = data.dataset_info(config_for('image_folder', data_dir, source_dir=str(second)))
  assert gray.image_shape == (None, None, 1) and gray.num_examples == {'train': 6}
  assert split.num_examples == {'train': 6, 'val': 2} and split.class_names == ('x', 'y')


@pytest.mark.skipif(not os.path.exists(builders.DEBIAN_FASHION_MNIST_DIR),
                    reason='needs apt-get install dataset-fashion-mnist')
def test_full_fashion_mnist_from_idx_files(tmp_path):
  path = datasets.prepare('fashion_mnist', str(tmp_path))
  config = config_for('fashion_mnist', tmp_path)
  data.ensure_prepared(config)
  info = data.dataset_info(config)
  assert path == info.path and info.num_examples == {'train': 60000, 'test': 10000}
  _, labels = builders.read_fashion_mnist_part(builders.DEBIAN_FASHION_MNIST_DIR, 't10k')
  test = datasets.open_split(config, 'test').source
  stored = [ex['label'] for ex in test.__getitems__(list(range(10000)))]
  assert np.bincount(stored).tolist() == np.bincount(labels).tolist()


def test_read_idx_refuses_other_files(tmp_path):
  bad = tmp_path / 'x.gz'
  bad.write_bytes(b'not idx')
  with pytest.raises(ValueError, match='not an IDX file'):
    builders.read_idx(str(bad))


def test_tfds_mock_data_reads_through_the_tfds_path(monkeypatch):
  # tfds 4.9.10's mock installs __getitems__ as an unbound function; bind it.
  from tensorflow_datasets.testing import mocking  # pylint: disable=import-outside-toplevel
  original = mocking._getitems  # pylint: disable=protected-access
  monkeypatch.setattr(mocking, '_getitems', lambda keys, generator, serialized=False:
                      original(None, keys, generator, serialized))
  config = config_for('mnist', '/nonexistent', eval_split='test')
  with tfds.testing.mock_data(num_examples=13):
    assert data.dataset_info(config).num_classes == 10
    batch = host_train(config, batch=4)[0]
    evaluation = host_eval(config, batch=4)
    masks = np.concatenate([evaluation[i]['mask'] for i in range(len(evaluation))])
  assert batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert np.all((batch['label'] >= 0) & (batch['label'] < 10))
  assert len(evaluation) == 4 and masks.sum() == 13


# ---------------------------------------------------------------------------------------
# Training pipeline.

def test_train_shards_are_disjoint_cover_the_split_and_reshuffle_every_epoch(folder_config):
  num_examples, process_count, batch = 21, 3, 4
  hosts = [host_train(folder_config, batch=batch, process_index=p, process_count=process_count)
           for p in range(process_count)]
  single = host_train(folder_config, batch=batch * process_count)
  stream = []
  for step in range(4):
    parts = [hosts[p][step] for p in range(process_count)]
    indices = [part['index'] for part in parts]
    if step == 0:  # inside one epoch, each process reads its own examples of the batch
      assert len(set(np.concatenate(indices).tolist())) == batch * process_count
    # Together the processes read exactly the one-process global batch, augmentations
    # included: the run does not depend on the number of processes.
    whole = single[step]
    np.testing.assert_array_equal(np.concatenate(indices), whole['index'])
    np.testing.assert_array_equal(np.concatenate([part['image'] for part in parts]),
                                  whole['image'])
    stream.extend(np.concatenate(indices).tolist())
  first, second = stream[:num_examples], stream[num_examples:2 * num_examples]
  assert sorted(first) == list(range(num_examples))  # every example once per epoch
  assert sorted(second) == sorted(first) and second != first  # reshuffled


def test_train_batches_values(folder_config):
  batch = host_train(folder_config, batch=8)[0]
  assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0  # mean 0.5, std 0.5
  # Every stored example's label agrees with the source.
  source = datasets.open_split(folder_config, 'train').source
  assert batch['label'].tolist() == [source[int(i)]['label'] for i in batch['index']]
  gray = host_train(folder_config, batch=8, channels=1)[0]
  assert gray['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 1)


def test_grayscale_becomes_three_equal_channels(demo_config):
  batch = host_train(demo_config, batch=8)[0]
  assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_a_small_split_is_decoded_once_into_memory_with_the_same_batches(demo_config,
                                                                         folder_config):
  info = datasets.read_info(demo_config)
  files = datasets.open_split(demo_config, 'train').source
  cached = datasets.open_split_for_reading(demo_config, 'train', info).source
  assert isinstance(cached, datasets.DecodedSplit) and len(cached) == len(files)
  # Decoded once per process: the pipelines rebuilt at each evaluation share it.
  assert datasets.open_split_for_reading(demo_config, 'train', info).source is cached
  assert not cached.images.flags.writeable
  for a, b in zip(files.__getitems__([0, 5, 777]), cached.__getitems__([0, 5, 777])):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['label'] == b['label']
  uncached = demo_config.copy_and_resolve_references()
  uncached.cache_mb = 0
  assert not isinstance(datasets.open_split_for_reading(uncached, 'train', info).source,
                        datasets.DecodedSplit)
  # Images of varied sizes stay in their files.
  assert not isinstance(datasets.open_split_for_reading(
      folder_config, 'train', datasets.read_info(folder_config)).source, datasets.DecodedSplit)
  # The batches, the one across the first epoch's end included, bit for bit; their
  # examples in grain's shuffled order, also for the second of two processes and across
  # the blocks of batches whose order is looked up together.
  order = grain.MapDataset.range(len(files)).shuffle(
      seed=pipeline._derived_seed(0, 0)).repeat()  # pylint: disable=protected-access
  for k in (0, len(files) // 384, len(files) // 384 + 1, 15, 16, 33):
    a = host_train(demo_config, batch=192, process_index=1, process_count=2)[k]
    b = host_train(uncached, batch=192, process_index=1, process_count=2)[k]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['index'], [order[k * 384 + 192 + i] for i in range(192)])


def test_same_seed_same_batches_other_seed_other_batches(folder_config):
  first = [host_train(folder_config, batch=4, seed=7)[k] for k in range(3)]
  again = [host_train(folder_config, batch=4, seed=7)[k] for k in range(3)]
  other = [host_train(folder_config, batch=4, seed=8)[k] for k in range(3)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['index'], b['index'])
  assert any(not np.array_equal(a['index'], b['index']) for a, b in zip(first, other))
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, other))


def test_resume_after_k_batches_is_bitwise_identical(folder_config):
  mesh = sharding.make_mesh()
  global_batch = 2 * jax.device_count()
  make = lambda: data.train_iterator(folder_config, global_batch_size=global_batch, mesh=mesh,
                                     image_size=IMAGE_SIZE, channels=3, seed=3)
  uninterrupted = make()
  reference = [jax.device_get(next(uninterrupted)) for _ in range(6)]
  uninterrupted.close()

  interrupted = make()
  for _ in range(3):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # What a checkpoint stores.
  interrupted.close()
  assert state['step'] == 3

  resumed = make()
  resumed.set_state(state)
  for expected in reference[3:]:
    batch = next(resumed)
    assert batch['image'].sharding == sharding.batch_sharding(mesh)
    assert batch['image'].shape == (global_batch, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(jax.device_get(batch['image']), expected['image'])
    np.testing.assert_array_equal(jax.device_get(batch['label']), expected['label'])
  resumed.close()


def test_resume_with_another_batch_size_continues_at_examples_seen(folder_config, caplog):
  mesh = sharding.make_mesh()
  iterator = data.train_iterator(folder_config, global_batch_size=16, mesh=mesh,
                                 image_size=IMAGE_SIZE, channels=3, seed=0)
  iterator.set_state({'step': 10, 'global_batch_size': 8, 'process_count': 1, 'seed': 0,
                      'dataset': 'image_folder', 'split': 'train'})
  assert iterator.get_state()['step'] == 5
  assert 'not the one of an uninterrupted run' in caplog.text


@pytest.mark.parametrize('global_batch, process_count, numbers', [
    (12, 1, ('12', str(8))),   # Not divisible by the 8 devices.
    (16, 3, ('16', '3')),      # Not divisible by the processes.
])
def test_batch_size_not_divisible_is_refused_with_both_numbers(
    folder_config, global_batch, process_count, numbers):
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  with pytest.raises(ValueError) as error:
    data.train_iterator(folder_config, global_batch_size=global_batch, mesh=mesh,
                        image_size=IMAGE_SIZE, channels=3, seed=0, process_index=0,
                        process_count=process_count)
  assert all(n in str(error.value) for n in numbers)


# ---------------------------------------------------------------------------------------
# Evaluation pipeline.

@pytest.mark.parametrize('batch, process_count', [(7, 1), (3, 1), (4, 1), (5, 2), (2, 3), (8, 4)])
def test_eval_counts_every_example_exactly_once(folder_config, batch, process_count):
  num_examples = 21
  seen, lengths = [], []
  for p in range(process_count):
    batches = host_eval(folder_config, batch=batch, process_index=p, process_count=process_count)
    lengths.append(len(batches))
    for k in range(len(batches)):
      b = batches[k]
      assert b['image'].shape[0] == batch
      np.testing.assert_array_equal(b['mask'], (b['index'] != pipeline.PADDING).astype(np.float32))
      seen += b['index'][b['mask'] == 1].tolist()
  assert sorted(seen) == list(range(num_examples))
  assert len(set(lengths)) == 1  # Every process runs the same number of steps.
  assert lengths[0] == pipeline.eval_batch_count(num_examples, batch, process_count)


def test_eval_is_deterministic_and_uses_centre_crop(folder_config):
  first, again = host_eval(folder_config, batch=5)[0], host_eval(folder_config, batch=5)[0]
  np.testing.assert_array_equal(first['image'], again['image'])


def test_eval_iterator_global_arrays_with_two_simulated_processes(demo_config):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  masks, lengths = 0.0, []
  for p in range(2):
    evaluation = data.eval_iterator(demo_config, global_batch_size=384, mesh=mesh,
                                    image_size=28, channels=1, process_index=p, process_count=2)
    batches = list(evaluation)
    lengths.append(len(batches))
    assert len(batches) == len(evaluation) == 6  # ceil(1000 / 192)
    assert batches[0]['image'].shape == (192, 28, 28, 1)  # This process's part.
    masks += sum(float(b['mask'].sum()) for b in batches)
  assert masks == 2000 and evaluation.num_examples == 2000


def test_eval_iterator_on_all_devices(demo_config):
  mesh = sharding.make_mesh()
  batches = list(data.eval_iterator(demo_config, global_batch_size=256, mesh=mesh,
                                    image_size=28, channels=3))
  assert len(batches) == 8  # 2,000 examples do not fill 8 batches of 256: padded.
  assert sum(float(b['mask'].sum()) for b in batches) == 2000
  assert batches[-1]['mask'].sharding == sharding.batch_sharding(mesh)
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask']) == 1] for b in batches])
  assert np.bincount(labels).tolist() == [200] * 10


# ---------------------------------------------------------------------------------------
# Scripts, as docs/data.md runs them.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_prepare_script_prepares_an_image_folder_and_warns_about_corrupt_files(tmp_path):
  write_image_folder(str(tmp_path / 'shapes'), per_class=2, corrupt=('bee/bad.jpg',))
  result = run_script('scripts/prepare_dataset.py', '--dataset=image_folder',
                      f'--source_dir={tmp_path / "shapes"}', f'--data_dir={tmp_path / "tfds"}')
  assert "splits {'train': 6}, 3 classes" in result.stdout
  assert 'skipped 1 unreadable or corrupt image(s)' in result.stderr
  assert 'bee/bad.jpg' in result.stderr


def test_prepare_script_says_what_is_missing(tmp_path):
  result = subprocess.run(
      [sys.executable, 'scripts/prepare_dataset.py', '--dataset=fashion_mnist',
       f'--source_dir={tmp_path / "nowhere"}', f'--data_dir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert 'train-images-idx3-ubyte.gz' in result.stderr


def test_benchmark_script_prints_a_table_row():
  result = run_script('scripts/benchmark_input.py', '--synthetic_jpegs=24', '--image_size=32',
                      '--batch_size=8', '--steps=2', '--warmup=1')
  row = result.stdout.strip().splitlines()[-1].split('|')
  assert row[1].strip() == 'image_folder' and row[3].strip() == '32x32x3'
  host, device = (float(cell.replace(',', '')) for cell in row[6:8])
  assert host > 0 and device > 0

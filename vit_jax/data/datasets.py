"""Where datasets live, how to prepare them, and how to open one split for reading.

A dataset is named by `data_config.name`:
  - one of our builders (vit_jax.data.builders): 'fashion_mnist_t10k' (the demo),
    'fashion_mnist', 'image_folder' (with `source_dir` naming the folder);
  - anything else is a TFDS name ('imagenet2012', 'cifar10', 'food101:2.1.0', ...).
Every dataset is read as ArrayRecord through `tfds ... as_data_source`, without
TensorFlow, from `data_config.data_dir` ('': $TFDS_DATA_DIR, else ~/tensorflow_datasets).

The data_dir may be a bucket (gs://): TFDS reads the metadata through etils.epath, and
array_record's reader (0.8.6, pinned) opens gs:// shards itself, with google-cloud-cpp
(Application Default Credentials; CLOUD_STORAGE_EMULATOR_ENDPOINT points it at an
emulator). Every example read there is a request, so local disk is faster.
Datasets are prepared on local disk only, then copied into the bucket.
"""

import collections
import contextlib
import dataclasses
import fcntl
import os
import re
import shlex
import threading
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath

from vit_jax.data import builders

DEMO_DATASET = 'fashion_mnist_t10k'
PREPARE_SCRIPT = 'scripts/prepare_dataset.py'
_LOCAL_DATA_DIR = '~/tensorflow_datasets'


class MissingDatasetError(FileNotFoundError):
  """A dataset is not prepared in the data directory; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a prepared dataset.

  Attributes:
    name: the dataset's name in the config.
    path: directory of the prepared ArrayRecord files.
    num_classes: number of labels (0 if the dataset has no class label).
    num_examples: {split: size} of the full splits.
    image_shape: (height, width, channels) stored; height/width are None when they vary.
    class_names: label names when the dataset has them, else None.
  """
  name: str
  path: str
  num_classes: int
  num_examples: dict[str, int]
  image_shape: tuple[Optional[int], Optional[int], Optional[int]]
  class_names: Optional[tuple[str, ...]]
  _splits: Any = dataclasses.field(default=None, repr=False, compare=False)

  def split_size(self, split: str) -> int:
    """Number of examples of a TFDS split string, slices included ('train[:90%]')."""
    return int(self._splits[split].num_examples)


def data_dir_of(data_config) -> str:
  """The data directory: the config's, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  data_dir = data_config.data_dir or os.environ.get('TFDS_DATA_DIR') or _LOCAL_DATA_DIR
  return data_dir if _in_bucket(data_dir) else os.path.abspath(os.path.expanduser(data_dir))


def _in_bucket(data_dir: str) -> bool:
  return '://' in data_dir


def _source_dir_of(data_config) -> Optional[str]:
  if data_config.source_dir:
    return os.path.abspath(os.path.expanduser(data_config.source_dir))
  if data_config.name == 'fashion_mnist':
    return builders.DEBIAN_FASHION_MNIST_DIR
  if data_config.name == 'image_folder':
    raise ValueError("data.name='image_folder' needs data.source_dir: the folder whose "
                     'subfolders are the classes.')
  return None


_OUR_BUILDERS = {b.name: b for b in (builders.FashionMnistT10k, builders.FashionMnist,
                                     builders.ImageFolder)}


def _our_builder_path(name: str, data_dir: str, source_dir: Optional[str]) -> str:
  """Directory our builder `name` writes to, computed without scanning any folder."""
  if name == 'image_folder':
    return os.path.join(data_dir, name, builders.image_folder_config_name(source_dir),
                        str(builders.ImageFolder.VERSION))
  return os.path.join(data_dir, name, str(_OUR_BUILDERS[name].VERSION))


def prepare_command(data_config) -> str:
  """The shell command that prepares the dataset of `data_config` (for a bucket: on local
  disk, then copied there)."""
  data_dir = data_dir_of(data_config)
  local_dir = os.path.expanduser(_LOCAL_DATA_DIR) if _in_bucket(data_dir) else data_dir
  args = ['python', PREPARE_SCRIPT, f'--dataset={data_config.name}', f'--data_dir={local_dir}']
  if data_config.name in ('fashion_mnist', 'image_folder'):
    args.append(f'--source_dir={_source_dir_of(data_config)}')
  command = ' '.join(shlex.quote(a) for a in args)
  if _in_bucket(data_dir):
    command += f' && {_copy_command(data_config.name, local_dir, data_dir)}'
  return command


def _copy_command(name: str, local_dir: str, bucket_dir: str) -> str:
  folder = re.split('[:/]', name)[0]  # 'food101:2.1.0' lives in food101/
  return f'gcloud storage cp -r {shlex.quote(os.path.join(local_dir, folder))} {bucket_dir}/'


def _missing(data_config, looked_in: str, why: str = 'is not prepared') -> MissingDatasetError:
  note = ('' if data_config.name in _OUR_BUILDERS else
          '\n(add --manual_dir=DIR for TFDS datasets that need files downloaded by hand, '
          'such as imagenet2012; some TFDS builders need TensorFlow to prepare, never to '
          'train: see docs/data.md)')
  return MissingDatasetError(
      f"Dataset {data_config.name!r} {why} in data_dir {data_dir_of(data_config)} "
      f'(looked in {looked_in}). Prepare it once with:\n  {prepare_command(data_config)}'
      + note)


def _is_array_record_dir(path: str) -> bool:
  folder = epath.Path(path)  # also gs://
  return ((folder / 'dataset_info.json').exists()
          and any('.array_record' in f.name for f in folder.iterdir()))


@dataclasses.dataclass
class _Resolved:
  builder: Any  # Reads as_data_source and info.
  path: str


def _resolve(data_config) -> _Resolved:
  """The builder that reads the dataset. One of ours must be prepared (else
  MissingDatasetError); a TFDS name resolves to its builder even before preparation, which
  lets tfds.testing.mock_data stand in for the files."""
  # TFDS logs a warning for each half-prepared folder it meets; our error names the folder.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return _resolve_builder(data_config)
  finally:
    absl_logging.set_verbosity(verbosity)


def _resolve_builder(data_config) -> _Resolved:
  name, data_dir = data_config.name, data_dir_of(data_config)
  if name in _OUR_BUILDERS:
    path = _our_builder_path(name, data_dir, _source_dir_of(data_config))
    if not _is_array_record_dir(path):
      raise _missing(data_config, path)
    return _Resolved(tfds.builder_from_directory(path), path)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    # TFDS's message lists every dataset it knows; keep only its suggestion.
    suggestion = re.search(r'Did you mean: \S+ -> (\S+)', str(e))
    hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ''
    raise ValueError(f'Unknown dataset {name!r}{hint}: neither one of ours '
                     f'{sorted(_OUR_BUILDERS)} nor a TFDS dataset, and nothing named so is '
                     f'prepared in {data_dir}. A TFDS dataset is prepared with: python '
                     f'scripts/prepare_dataset.py --dataset=NAME --data_dir={data_dir}') from None
  path = os.fspath(builder.data_path)
  if builder.is_prepared() and not _is_array_record_dir(path):
    raise _missing(data_config, path, why='is prepared in another file format than '
                   'ArrayRecord (tfds.load writes TFRecord, which needs TensorFlow to read)')
  return _Resolved(builder, path)


def _image_and_label_keys(builder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys[0], keys[1]
  return 'image', 'label'


@dataclasses.dataclass
class SplitSource:
  """Random access to one split.

  Attributes:
    source: sequence of example dicts; `source[i][image_key]` is a uint8 (H, W, C)
      array (TFDS decodes encoded images with PIL); `source.__getitems__(indices)`
      reads several at once (ArrayRecord reads them in parallel).
    image_key, label_key: keys of the image and the integer label in an example.
  """
  source: Sequence[dict]
  image_key: str
  label_key: str


def open_split(data_config, split: str) -> SplitSource:
  """Opens split `split` (TFDS split string, slices allowed) of the config's dataset."""
  resolved = _resolve(data_config)
  builder = resolved.builder
  image_key, label_key = _image_and_label_keys(builder)
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:
    # What TFDS raises for a TFDS name that is not prepared (or prepared as TFRecord).
    if not builder.is_prepared():
      raise _missing(data_config, resolved.path) from None
    raise
  return SplitSource(source, image_key, label_key)


class DecodedSplit:
  """A split's examples decoded once into memory: the same {image, label} examples as the
  ArrayRecord source, then read without a file read or a PNG/JPEG decode each (28 of the
  77 us of host work per 28x28 training image here, on the cores the step uses). The
  arrays are read-only: examples are views into them."""

  def __init__(self, split: SplitSource, chunk: int = 4096):
    n = len(split.source)
    self.image_key, self.label_key = split.image_key, split.label_key
    first = np.asarray(split.source[0][self.image_key])
    self.images = np.empty((n, *first.shape), first.dtype)
    self.labels = np.empty(n, np.int64)
    for start in range(0, n, chunk):
      indices = list(range(start, min(n, start + chunk)))
      for i, example in zip(indices, split.source.__getitems__(indices)):
        self.images[i] = example[self.image_key]
        self.labels[i] = example[self.label_key]
    self.images.flags.writeable = self.labels.flags.writeable = False

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {self.image_key: self.images[index], self.label_key: self.labels[index]}

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [self[i] for i in indices]


# Splits decoded in this process, kept for the pipelines rebuilt at each evaluation (and
# the few-shot probe's training split, the training pipeline's own).
_DECODED: collections.OrderedDict = collections.OrderedDict()
_DECODED_LOCK = threading.Lock()
_DECODED_KEPT = 4


def open_split_for_reading(data_config, split: str, info: 'DatasetInfo') -> SplitSource:
  """open_split, decoded into memory once per process (DecodedSplit) when the split's
  decoded images take at most data.cache_mb megabytes (images of one fixed shape only);
  else read from the files."""
  key = (data_dir_of(data_config), data_config.name, data_config.source_dir, split)
  limit = float(data_config.cache_mb) * 2 ** 20
  with _DECODED_LOCK:  # a split decoded already is not opened again
    if key in _DECODED and _DECODED[key].images.nbytes <= limit:
      _DECODED.move_to_end(key)
      decoded = _DECODED[key]
      return SplitSource(decoded, decoded.image_key, decoded.label_key)
  source = open_split(data_config, split)  # names a missing dataset and its command
  fixed_shape = None not in info.image_shape
  size = len(source.source) * int(np.prod(info.image_shape)) if fixed_shape else 0
  if not size or size > limit:
    return source
  with _DECODED_LOCK:
    if key not in _DECODED:
      _DECODED[key] = DecodedSplit(source)
      while len(_DECODED) > _DECODED_KEPT:
        _DECODED.popitem(last=False)
    _DECODED.move_to_end(key)
    decoded = _DECODED[key]
  return SplitSource(decoded, decoded.image_key, decoded.label_key)


def read_info(data_config) -> DatasetInfo:
  resolved = _resolve(data_config)
  info = resolved.builder.info
  image_key, label_key = _image_and_label_keys(resolved.builder)
  label = info.features[label_key] if label_key in info.features else None
  num_classes = int(getattr(label, 'num_classes', 0) or 0)
  class_names = tuple(label.names) if num_classes and label.names else None
  image_shape = tuple(info.features[image_key].shape)
  return DatasetInfo(
      name=data_config.name, path=resolved.path, num_classes=num_classes,
      num_examples={name: int(split.num_examples) for name, split in info.splits.items()},
      image_shape=image_shape, class_names=class_names, _splits=info.splits)


def check_dataset(data_config, info: DatasetInfo, *, image_size: int, channels: int) -> None:
  """Refuses splits the dataset lacks and colour images fed to a grayscale model, with
  the fix in the message; notes a stored image size that the model resizes."""
  for key in ('train_split', 'eval_split'):
    split = data_config[key]
    try:
      info.split_size(split)
    except (KeyError, ValueError) as e:
      fix = ''
      if set(info.num_examples) == {'train'}:
        fix = (" It has one split, 'train' (an image folder without train/ and test/ "
               "subfolders): hold out a fraction with --config.data.train_split='train[:90%]' "
               "--config.data.eval_split='train[90%:]' (examples are stored in a shuffled "
               'order, so both slices hold every class), or make ROOT/train/CLASS/ and '
               'ROOT/test/CLASS/ folders and prepare again.')
      raise ValueError(f'data.{key}={split!r} is not a split of {data_config.name!r} '
                       f'({" ".join(str(e).split())}).{fix}') from None
  height, width, stored_channels = info.image_shape
  if stored_channels in (3, 4) and channels == 1:
    raise ValueError(f'{data_config.name!r} holds colour images (3 channels) but the model '
                     'takes channels=1, which would train on them as grayscale; pass '
                     '--config.model.channels=3 (and data.mean/data.std with one value or '
                     'three).')
  if height and width and (height, width) != (image_size, image_size):
    print(f'Note: {data_config.name!r} stores {height}x{width} images and the model takes '
          f'{image_size}x{image_size}: they are resized (--config.model.image_size='
          f'{height} trains at the stored size).')


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive lock between the processes of one machine (and of machines sharing a
  file system that supports flock)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, data_dir: str, *, source_dir: Optional[str] = None,
            manual_dir: Optional[str] = None) -> str:
  """Prepares dataset `name` as ArrayRecord in `data_dir`; returns its directory.

  Our builders read `source_dir` (fashion_mnist: the IDX directory; image_folder: the
  class folder root). TFDS builders may download (network) and read `manual_dir` for
  datasets that need a manual download (imagenet2012). Nothing happens if it exists.
  """
  if _in_bucket(data_dir):  # TFDS's writers and our file lock need a local file system
    raise ValueError(f'Datasets are prepared on local disk, not in {data_dir}: prepare with '
                     f'a local --data_dir, then copy the folder into the bucket: '
                     f'{_copy_command(name, "LOCAL_DATA_DIR", data_dir)}')
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if name == 'image_folder':
    if not source_dir:
      raise ValueError('image_folder needs source_dir, the folder of class subfolders.')
    builder = builders.ImageFolder(source_dir=source_dir, data_dir=data_dir)
  elif name in _OUR_BUILDERS:
    if name == 'fashion_mnist':  # Reads its IDX files from TFDS's manual_dir.
      manual_dir = source_dir or builders.DEBIAN_FASHION_MNIST_DIR
    builder = _OUR_BUILDERS[name](data_dir=data_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  # Offline first: never fetch prepared data from Google Cloud Storage behind the user's back.
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  with _file_lock(os.path.join(data_dir, '.locks', f'{name}.lock')):
    try:
      builder.download_and_prepare(file_format='array_record', download_config=download_config)
    except ModuleNotFoundError as e:
      if e.name and e.name.split('.')[0] == 'tensorflow':
        raise ModuleNotFoundError(
            f'The TFDS builder {name!r} uses TensorFlow to prepare its data. Install it '
            '(`pip install tensorflow-cpu`) just for this preparation; training reads the '
            'ArrayRecord files without it.', name=e.name) from e
      raise
  return os.fspath(builder.data_dir)


def ensure_prepared(data_config) -> None:
  """Prepares the demo dataset if missing; for any other dataset raises MissingDatasetError
  naming the dataset, the data_dir and the command that prepares it.

  Safe when several processes on one machine start at once: they take a file lock, the
  first prepares and the others then find the data.
  """
  try:
    path = _resolve(data_config).path
    if not _is_array_record_dir(path):  # TFDS names resolve to a builder even when absent.
      raise _missing(data_config, path)
  except MissingDatasetError:
    if data_config.name != DEMO_DATASET or _in_bucket(data_dir_of(data_config)):
      raise
    print(f'Preparing the built-in {DEMO_DATASET} in {data_dir_of(data_config)} (once).')
    tfds.disable_progress_bar()  # a second of work does not need progress bars
    prepare(DEMO_DATASET, data_dir_of(data_config))

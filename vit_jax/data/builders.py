"""TFDS builders for the datasets we prepare from local files, with no TensorFlow.

  fashion_mnist_t10k  Fashion-MNIST's official 10,000-image test set, shipped in
                      vit_jax/data/demo, split by class into 'train' (8,000) and
                      'test' (2,000). The demo: it needs no download and no apt.
  fashion_mnist       the full Fashion-MNIST, 'train' (60,000) and 'test' (10,000),
                      from a directory holding its four IDX files.
  image_folder        any folder of images in class subfolders.

Each writes ArrayRecord files that `tfds.builder_from_directory(path).as_data_source`
reads. They are not registered with TFDS (TFDS's own `fashion_mnist` downloads from the
internet and stores PNGs); vit_jax.data.datasets finds them by name. Preparing without
TensorFlow works because images are handed to TFDS as raw bytes or encoded files, never
as numpy arrays for an `Image` feature (which TFDS encodes with TensorFlow).
"""

import dataclasses
import gzip
import hashlib
import io
import os
import re
import warnings

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

DEMO_SOURCE_DIR = os.path.join(os.path.dirname(__file__), 'demo')
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FASHION_MNIST_CITATION = """@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}}"""


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (gzipped or not), the format of (Fashion-)MNIST.

  Returns:
    uint8 array of the shape in the file's header, e.g. (10000, 28, 28) for images.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except gzip.BadGzipFile as e:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes: {e}.') from e
  # Header: two zero bytes, type code 0x08 (unsigned byte), number of dimensions, then
  # one big-endian uint32 per dimension.
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':
    raise ValueError(f'{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)):
    raise ValueError(f'{path}: header says shape {shape} but the file holds '
                     f'{len(data) - offset} bytes of data; is it truncated?')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_fashion_mnist_part(source_dir: str, part: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 28, 28) uint8, labels (N,) uint8) of part 'train' or 't10k'."""
  paths = [os.path.join(source_dir, f'{part}-{kind}-ubyte.gz')
           for kind in ('images-idx3', 'labels-idx1')]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST files not found: {missing}. Install them with '
        f'`apt-get install dataset-fashion-mnist` (they go to {DEBIAN_FASHION_MNIST_DIR}) '
        'or pass --source_dir=DIR holding the four IDX .gz files of '
        'https://github.com/zalandoresearch/fashion-mnist.')
  images, labels = (read_idx(p) for p in paths)
  if images.shape[1:] != (28, 28) or len(images) != len(labels):
    raise ValueError(f'{paths}: expected N 28x28 images and N labels, got images '
                     f'{images.shape} and labels {labels.shape}.')
  return images, labels


def stratified_split(labels: np.ndarray, held_out_per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out) example indices: the last `held_out_per_class` of each class, in
  file order, are held out, so the held-out split is balanced and the split never moves."""
  held_out = np.concatenate([np.flatnonzero(labels == c)[-held_out_per_class:]
                             for c in np.unique(labels)])
  is_held_out = np.zeros(len(labels), bool)
  is_held_out[held_out] = True
  return np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that reads local files: TFDS's 'Downloading and preparing dataset Unknown
  size' and 'downloaded' lines would be false, so they are not printed (vit_jax says
  what it prepares)."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class _FashionMnistBuilder(_LocalBuilder, skip_registration=True):
  """Fashion-MNIST as raw uint8 pixels, which read 2-3x faster than PNG."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Raw uint8 pixels from the IDX files.'}
  DESCRIPTION = ''

  def _info(self):
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        citation=FASHION_MNIST_CITATION,
        license='MIT',
    )

  def _split_arrays(self, dl_manager) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, labels)}; what differs between the full set and the demo."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(images, labels)
            for split, (images, labels) in self._split_arrays(dl_manager).items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[:, :, None], 'label': int(label)}


class FashionMnist(_FashionMnistBuilder, skip_registration=True):
  """The full Fashion-MNIST from the IDX files in `manual_dir`."""

  name = 'fashion_mnist'
  DESCRIPTION = ('Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grayscale images of '
                 'Zalando articles in 10 classes; train 60,000, test 10,000.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'manual_dir holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
      't10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (apt-get install '
      f'dataset-fashion-mnist puts them in {DEBIAN_FASHION_MNIST_DIR}).')

  def _split_arrays(self, dl_manager):
    source_dir = os.fspath(dl_manager.manual_dir)
    return {'train': read_fashion_mnist_part(source_dir, 'train'),
            'test': read_fashion_mnist_part(source_dir, 't10k')}


class FashionMnistT10k(_FashionMnistBuilder, skip_registration=True):
  """The demo: Fashion-MNIST's 10,000 test images, split 8,000 / 2,000 by class."""

  name = 'fashion_mnist_t10k'
  TEST_PER_CLASS = 200
  DESCRIPTION = (
      "A demo made of Fashion-MNIST's official 10,000-image test set (t10k), shipped in "
      "vit_jax/data/demo: 'test' holds the last 200 images of each class in file order "
      "(2,000), 'train' the other 8,000. For real results use fashion_mnist.")

  def _split_arrays(self, dl_manager):
    del dl_manager  # The files ship inside the package.
    images, labels = read_fashion_mnist_part(DEMO_SOURCE_DIR, 't10k')
    train, test = stratified_split(labels, self.TEST_PER_CLASS)
    return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}


# ---------------------------------------------------------------------------------------
# Image folders.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# Top-level folders with these names hold splits, each with its own class subfolders.
SPLIT_FOLDER_NAMES = ('train', 'val', 'validation', 'test')
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
# The PIL mode an image is stored in, by the dataset's channels: transparency is kept as
# an alpha channel and composited onto data.transparent_background when an image is read
# (vit_jax/data/transforms.py), so the background is a training choice, not a preparation one.
STORED_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}


def has_alpha(image: Image.Image) -> bool:
  """Whether an image has transparency (an alpha channel or a transparent palette colour)."""
  return image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info


def to_stored_mode(image: Image.Image, channels: int) -> Image.Image:
  """Any PIL image in the mode of a dataset of `channels` (STORED_MODES): grayscale becomes
  RGB and colour becomes luminance as the dataset needs; with 2 or 4 channels, an image
  without transparency gets an opaque alpha channel, and transparency is never lost."""
  mode = STORED_MODES[channels]
  if image.mode == mode:
    return image
  if has_alpha(image):
    image = image.convert('RGBA')  # palette transparency becomes alpha here
  return image.convert(mode)


def image_folder_config_name(source_dir: str) -> str:
  """Folder name plus a hash of its absolute path, so that two folders called 'images'
  in different places do not share a prepared dataset."""
  path = os.path.abspath(os.path.expanduser(source_dir)).rstrip(os.sep)
  stem = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path).lower()).strip('_') or 'root'
  return f'{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}'


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """What a folder of images holds.

  Attributes:
    class_names: sorted class folder names; a label is an index into them.
    files: {split: [(path, label), ...]} in sorted path order.
    channels: 1 if every readable image is grayscale, else 3 (grayscale ones are
      converted to RGB at preparation); one more (alpha) if any image has transparency.
    image_size: (height, width) when every readable image has it, else None.
  """
  class_names: tuple[str, ...]
  files: dict[str, list[tuple[str, int]]]
  channels: int
  image_size: tuple[int, int] | None = None


def image_files(directory: str) -> list[str]:
  found = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    found += [os.path.join(root, n) for n in sorted(names)
              if n.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def _subdirs(directory: str) -> list[str]:
  return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))


def scan_image_folder(source_dir: str) -> FolderLayout:
  """Lists the images of `source_dir`: ROOT/CLASS/*.jpg gives one split 'train';
  ROOT/{train,val,test}/CLASS/*.jpg gives those splits. A class folder without any image
  file is refused (it would be a label that no example has)."""
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f'image_folder: {source_dir!r} is not a directory.')
  top = _subdirs(source_dir)
  if top and all(name in SPLIT_FOLDER_NAMES for name in top):
    split_dirs = {name: os.path.join(source_dir, name) for name in top}
  else:
    split_dirs = {'train': source_dir}
  class_names = sorted({c for d in split_dirs.values() for c in _subdirs(d)})
  if not class_names:
    raise ValueError(f'image_folder: {source_dir!r} has no class subfolders; expected '
                     f'{source_dir}/CLASS_NAME/IMAGE.jpg.')
  files, modes, sizes, transparent = {}, set(), set(), False
  for split, split_dir in split_dirs.items():
    files[split] = []
    for label, class_name in enumerate(class_names):
      class_dir = os.path.join(split_dir, class_name)
      for path in image_files(class_dir) if os.path.isdir(class_dir) else []:
        try:
          with Image.open(path) as image:  # Reads the header only.
            modes.add(image.mode)
            sizes.add((image.height, image.width))
            transparent = transparent or has_alpha(image)
        except Exception:  # pylint: disable=broad-except
          pass  # Unreadable: skipped, counted and named at generation.
        files[split].append((path, label))
  empty = [name for label, name in enumerate(class_names)
           if not any(lab == label for split_files in files.values() for _, lab in split_files)]
  if empty:
    raise ValueError(f'image_folder: class folder(s) {empty} of {source_dir!r} hold no image '
                     f'file ({", ".join(IMAGE_EXTENSIONS)}); add images to them or remove '
                     'them.')
  channels = (1 if modes and modes <= set(_GRAYSCALE_MODES) else 3) + int(transparent)
  return FolderLayout(tuple(class_names), files, channels,
                      sizes.pop() if len(sizes) == 1 else None)


def encode_for_dataset(path: str, channels: int) -> bytes:
  """The bytes to store for one image file: the file itself when it is a JPEG or PNG of
  the dataset's mode, else the image converted (`to_stored_mode`) and re-encoded, as PNG
  when it has alpha. Decodes the whole image, so a truncated or corrupt file raises here,
  at preparation, not in training."""
  with Image.open(path) as image:
    image.load()
    if image.format in ('JPEG', 'PNG') and image.mode == STORED_MODES[channels]:
      with open(path, 'rb') as f:
        return f.read()
    fmt = 'JPEG' if image.format == 'JPEG' and channels in (1, 3) else 'PNG'
    converted = to_stored_mode(image, channels)
  buffer = io.BytesIO()
  converted.save(buffer, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  source_dir: str = ''


class ImageFolder(_LocalBuilder, skip_registration=True):
  """A folder of images in class subfolders (JPEG, PNG, ...; colour or grayscale).

  Files are stored as they are (JPEG/PNG of the dataset's mode) so nothing is lost;
  transparency is kept as an alpha channel (the dataset then has 2 or 4 channels, and
  training composites it onto data.transparent_background); unreadable or corrupt files are skipped
  with a warning that counts and names them. When all images share one size, the image
  feature records it, and training can compare it with the model's.
  """

  name = 'image_folder'
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Encoded images, class labels and file names.',
                   '1.1.0': 'Alpha composited onto white; a common image size is recorded.',
                   '1.2.0': 'Alpha kept as a channel; the background is chosen at training.'}

  def __init__(self, *, source_dir: str, **kwargs):
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    config = ImageFolderConfig(name=image_folder_config_name(source_dir), source_dir=source_dir,
                               description=f'Images in class subfolders of {source_dir}.')
    self._layout = scan_image_folder(source_dir)
    super().__init__(config=config, **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(*(self._layout.image_size or (None, None)),
                                                self._layout.channels)),
            'label': tfds.features.ClassLabel(names=self._layout.class_names),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Reads the folder named in the config.
    return {split: self._generate_examples(split, files)
            for split, files in self._layout.files.items()}

  def _generate_examples(self, split, files):
    root = self.builder_config.source_dir
    skipped = []
    for path, label in files:
      try:
        encoded = encode_for_dataset(path, self._layout.channels)
      except Exception:  # pylint: disable=broad-except
        skipped.append(os.path.relpath(path, root))
        continue
      file_name = os.path.relpath(path, root)
      yield file_name, {'image': encoded, 'label': label, 'file_name': file_name}
    if skipped:
      shown = ', '.join(skipped[:20])
      if len(skipped) > 20:
        shown += f' and {len(skipped) - 20} more'
      warnings.warn(f'image_folder {root}: skipped {len(skipped)} unreadable or corrupt '
                    f'image(s) of split {split!r}: {shown}', stacklevel=1)

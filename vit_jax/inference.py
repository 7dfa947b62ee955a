"""A trained classifier from Python: load it, preprocess images as its evaluation did, predict.

  import vit_jax
  classifier = vit_jax.load('runs/finetune_demo')        # a workdir, Orbax folder or file
  logits = vit_jax.predict(classifier, ['shoe.png', pil_image, uint8_array])

`load` takes whatever `config.init.path` takes. A training workdir brings its model
(config.json), its weights (latest checkpoint; BatchNorm statistics of a linear probe
included) and its evaluation preprocessing; a file (.npz, .safetensors, .pth) or a bare
Orbax folder needs the model's name (`model='ViT-B/16'`; the other sizes are read off
the arrays) and is preprocessed ImageNet-style: the central 87.5%, ImageNet's mean and
std for RGB. An image goes exactly the way a stored image of the run's evaluation split
went: converted to the stored mode (what preparing an image folder does), transparent
pixels composited onto the run's data.transparent_background, the eval crop and resize,
normalisation. So a prediction equals what the evaluation saw for the same pixels.

`python -m vit_jax.predict` is the command line over this module.
"""

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from vit_jax import checkpoint, data, interop, models, objectives, param_tree, sharding, train
from vit_jax.data import builders
from vit_jax.data.transforms import ImageTransform

# What a single image may be: a path, a PIL image, or uint8 pixels (H, W), (H, W, 1|3|4).
ImageLike = Any


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """One image -> float32 (S, S, C) as the model takes it; see the module docstring.

  Attributes:
    transform: the run's evaluation transform (crop, resize, normalisation).
    stored_channels: channels the dataset stored (1 or 3, plus alpha: 2 or 4): images are
      converted to them first, as preparation did; transparency is composited onto the
      run's data.transparent_background.
  """
  transform: ImageTransform
  stored_channels: int

  def pixels(self, image: ImageLike) -> np.ndarray:
    """The uint8 (H, W, stored_channels) pixels a prepared dataset would hold."""
    if isinstance(image, (str, os.PathLike)):
      with Image.open(image) as opened:
        opened.load()
        return self.pixels(opened)
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f'An image array must be uint8 pixels (H, W[, C]), got {image.dtype}; '
                         'convert with (x * 255).round().astype(np.uint8) from [0, 1].')
      image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[-1] == 1
                              else image)
    if not isinstance(image, Image.Image):
      raise TypeError(f'Cannot read an image from a {type(image).__name__}: give a path, a '
                      'PIL image or a uint8 array.')
    channels = self.stored_channels
    if channels in (1, 3) and builders.has_alpha(image):
      channels += 1  # composited onto data.transparent_background, as a stored one would be
    array = np.asarray(builders.to_stored_mode(image, channels), np.uint8)
    return array[:, :, None] if array.ndim == 2 else array

  def __call__(self, image: ImageLike) -> np.ndarray:
    pixels = self.pixels(image)
    example = self.transform.example(pixels, pixels.shape[-1], None)
    return self.transform.batch(example[None])[0]


@dataclasses.dataclass
class Classifier:
  """What inference needs; `vit_jax.load` returns one.

  Attributes:
    model: the Flax module (`model.apply(variables, images, train=False)` -> logits).
    variables: {'params': ..., and 'batch_stats' for a linear probe}, numpy arrays.
    preprocess: one image (path, PIL image, uint8 array) -> float32 (S, S, C).
    class_names: the dataset's label names, or None when unknown (indices are used).
    source: where the weights came from.
    config: the training config (from a workdir), else None.
  """
  model: Any
  variables: dict
  preprocess: Preprocess
  class_names: Optional[tuple[str, ...]]
  source: str
  config: Optional[ml_collections.ConfigDict] = None

  @property
  def num_classes(self) -> int:
    return int(self.model.num_classes)

  def label(self, index: int) -> str:
    return self.class_names[index] if self.class_names else str(index)

  @functools.cached_property
  def _forward(self) -> tuple[Callable, Any, int]:
    """(jitted apply over every local device, replicated variables, device count)."""
    mesh = sharding.make_mesh((('data', -1),), devices=jax.local_devices())
    replicated = sharding.replicated(mesh)
    apply = jax.jit(lambda variables, images: self.model.apply(variables, images, train=False),
                    in_shardings=(replicated, sharding.batch_sharding(mesh)),
                    out_shardings=replicated)
    return apply, jax.device_put(self.variables, replicated), mesh.devices.size

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32 (N, S, S, C) preprocessed images -> float32 (N, num_classes) logits.

    Split over every local device; padded to a multiple of the device count."""
    apply, variables, num_devices = self._forward
    count = len(images)
    padded = -count % num_devices
    if padded:
      images = np.concatenate([images, np.zeros((padded, *images.shape[1:]), images.dtype)])
    return np.asarray(apply(variables, images), np.float32)[:count]


def predict(classifier: Classifier, images, *, batch_size: int = 256) -> np.ndarray:
  """Logits of `images` (one image, a list of them, or a uint8 batch (N, H, W[, C])).

  Returns:
    float32 (N, num_classes); softmax gives probabilities, argmax the class index
    (`classifier.label(i)` its name).
  """
  if isinstance(images, (str, os.PathLike, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim == 2):
    images = [images]
  outputs = [np.zeros((0, classifier.num_classes), np.float32)]
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    outputs.append(classifier.logits(np.stack([classifier.preprocess(x) for x in chunk])))
  return np.concatenate(outputs)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices (N, k) by falling probability, probabilities (N, k)) of logits (N, classes)."""
  logits = np.asarray(logits, np.float64)
  exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probabilities = exponentials / exponentials.sum(axis=-1, keepdims=True)
  indices = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return indices, np.take_along_axis(probabilities, indices, axis=-1)


# --------------------------------------------------------------------------- loading


def checkpoint_step(source: str) -> int:
  """The step of an Orbax source ('orbax:.../checkpoints/STEP/state'), else 0."""
  match = re.search(r'(?:^|[/:])checkpoints/(\d+)/state$', source)
  return int(match[1]) if match else 0


def _class_names_and_stored_channels(data_config, default_channels: int):
  """The dataset's label names and stored channels; (None, default) if it is not here."""
  try:
    if data_config.name == data.DEMO_DATASET:
      data.ensure_prepared(data_config)  # ships in the package: seconds to prepare
    info = data.dataset_info(data_config)
  except (data.MissingDatasetError, FileNotFoundError, ValueError):
    return None, default_channels
  return info.class_names, info.image_shape[-1] or default_channels


def _workdir_model(config, flat: dict):
  objective = objectives.get_objective(config)
  if isinstance(objective, objectives.MaskedAutoencoder):
    raise interop.CheckpointError(
        'it is an MAE pretraining run, which has no classifier: fine-tune it first '
        '(configs/mae_finetune.py with --config.init.path=THIS_WORKDIR) and predict with '
        'that workdir.')
  num_classes = interop.model_fields(flat)['num_classes']
  return models.from_config(config, **objective.model_overrides(num_classes))


def _file_model(name: str, flat: dict, model_fields: dict):
  fields = interop.model_fields(flat)
  valid = {f.name for f in dataclasses.fields(models.ViT)}
  fields = {k: v for k, v in fields.items() if k in valid}
  vit_name = 'ViT-' + name.split('-', 1)[1] if name.startswith('MAE-') else name
  return models.get_model(vit_name, **{**fields, 'scan': False, **model_fields})


def load(path: str, *, model: str = '', model_fields: Optional[dict] = None,
         data_config: Optional[ml_collections.ConfigDict] = None) -> Classifier:
  """A classifier ready to predict, from a workdir, an Orbax folder or a checkpoint file.

  Args:
    path: a training workdir (model and preprocessing from its config.json), an Orbax
      folder, or a .npz/.safetensors/.pth file.
    model: the model's name (e.g. 'ViT-B/16') for a path without config.json; the
      sizes come from the arrays, the image size from a learned position table.
    model_fields: fields that override the model's: image_size for a model with fixed
      (sincos2d) position embeddings, whose arrays do not show it; dtype; ...
    data_config: the preprocessing (a `data` config) for a path without config.json;
      default: central 87.5% crop, ImageNet statistics for RGB, 0.5/0.5 for grayscale.
  Raises:
    ValueError (interop.CheckpointError): one line naming `path` when it is not a
    classifier checkpoint or its arrays do not fit the model.
  """
  config = None
  if epath.Path(path).is_dir() and (epath.Path(path) / 'config.json').exists():
    config = train.load_config_json(path)
  elif not model:
    raise ValueError(f'{path} has no config.json: give the model name too (--model=ViT-B/16, '
                     "or vit_jax.load(path, model='ViT-B/16')).")
  source, variables = checkpoint.load_params(path, model_state=True)
  flat = param_tree.flat_numpy(variables.pop('params'))
  try:
    if config is not None:
      classifier_model = _workdir_model(config, flat)
      if model_fields:
        classifier_model = classifier_model.replace(**model_fields)
    else:
      classifier_model = _file_model(model, flat, dict(model_fields or {}))
    if not classifier_model.num_classes:
      raise interop.CheckpointError('it has no classifier head (head/kernel): it is an '
                                    'encoder; fine-tune or linearly probe it first.')
    fresh = jax.eval_shape(functools.partial(models.init_variables, classifier_model),
                           jax.random.key(0))
    stand_in = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), fresh['params'])
    params, _ = interop.fit_params(flat, stand_in, new_grid=getattr(classifier_model, 'grid', None),
                                   source=path)
  except interop.CheckpointError as e:
    message = str(e)
    raise interop.CheckpointError(message if message.startswith(path) else f'{path}: {message}'
                                  ) from None
  missing_state = sorted(set(fresh) - {'params'} - set(variables))
  if missing_state:
    raise interop.CheckpointError(f'{path}: the model needs {missing_state} (BatchNorm '
                                  'statistics), which the checkpoint does not hold.')
  if config is not None:
    data_config = config.data
  elif data_config is None:
    data_config = data.default_data_config()
    rgb = classifier_model.channels == 3
    data_config.mean = data.IMAGENET_MEAN if rgb else (0.5,)
    data_config.std = data.IMAGENET_STD if rgb else (0.5,)
  class_names, stored_channels = (
      _class_names_and_stored_channels(data_config, classifier_model.channels)
      if config is not None else (None, classifier_model.channels))
  transform = ImageTransform.from_config(data_config, image_size=classifier_model.image_size,
                                         channels=classifier_model.channels, train=False)
  return Classifier(model=classifier_model, variables={'params': params, **variables},
                    preprocess=Preprocess(transform, stored_channels),
                    class_names=class_names, source=source, config=config)


__all__ = ['Classifier', 'Preprocess', 'load', 'predict', 'top_k']

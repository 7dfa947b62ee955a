"""RandAugment (Cubuk et al. 2019, arXiv 1909.13719) on PIL images, no TensorFlow.

The operations and magnitudes follow timm's 'increasing' set (`rand-mM-inc1`, the DeiT
and MAE fine-tuning recipe): every layer picks one of 15 operations uniformly and applies
it with probability 0.5; a magnitude in [0, 10] scales every operation, 0 being the
weakest (the identity for all but AutoContrast, Equalize and Invert), and geometric and
colour operations take a random sign. Two differences from timm: the magnitude is fixed
(no `mstd` noise), and Posterize keeps 8 bits at magnitude 0 down to 4 bits at 10, the
paper's range (timm's increasing Posterize goes down to 0 bits, a black image).
"""

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0
APPLY_PROB = 0.5
FILL_GRAY = 128  # Geometric operations fill uncovered pixels with mid gray, as timm.
_RESAMPLE = Image.Resampling.BILINEAR


def _fill(image: Image.Image):
  return FILL_GRAY if image.mode == 'L' else (FILL_GRAY,) * 3


def _signed(rng: np.random.Generator, value: float) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, _RESAMPLE,
                         fillcolor=_fill(image))


def _rotate(image, level, rng):
  return image.rotate(_signed(rng, level * 30.0), _RESAMPLE, fillcolor=_fill(image))


def _shear_x(image, level, rng):
  return _affine(image, (1, _signed(rng, level * 0.3), 0, 0, 1, 0))


def _shear_y(image, level, rng):
  return _affine(image, (1, 0, 0, _signed(rng, level * 0.3), 1, 0))


def _translate_x(image, level, rng):
  return _affine(image, (1, 0, _signed(rng, level * 0.45) * image.size[0], 0, 1, 0))


def _translate_y(image, level, rng):
  return _affine(image, (1, 0, 0, 0, 1, _signed(rng, level * 0.45) * image.size[1]))


def _enhancer(enhance_cls) -> Callable:
  # Factor 1 is the identity; the magnitude moves it up to 0.9 either way.
  return lambda image, level, rng: enhance_cls(image).enhance(1.0 + _signed(rng, level * 0.9))


def _posterize(image, level, rng):
  del rng
  bits = 8 - int(level * 4)  # 8 bits (identity) at magnitude 0 down to 4 at 10.
  return image if bits >= 8 else ImageOps.posterize(image, bits)


def _solarize(image, level, rng):
  del rng
  return ImageOps.solarize(image, 256 - int(level * 256))  # Threshold 256 is the identity.


def _solarize_add(image, level, rng):
  del rng
  add = int(level * 110)
  table = [min(255, v + add) if v < 128 else v for v in range(256)]
  return image.point(table * len(image.getbands()))


def _no_level(fn) -> Callable:
  return lambda image, level, rng: fn(image)


# (name, fn(image, level in [0, 1], rng) -> image).
OPERATIONS = (
    ('AutoContrast', _no_level(ImageOps.autocontrast)),
    ('Equalize', _no_level(ImageOps.equalize)),
    ('Invert', _no_level(ImageOps.invert)),
    ('Rotate', _rotate),
    ('Posterize', _posterize),
    ('Solarize', _solarize),
    ('SolarizeAdd', _solarize_add),
    ('Color', _enhancer(ImageEnhance.Color)),
    ('Contrast', _enhancer(ImageEnhance.Contrast)),
    ('Brightness', _enhancer(ImageEnhance.Brightness)),
    ('Sharpness', _enhancer(ImageEnhance.Sharpness)),
    ('ShearX', _shear_x),
    ('ShearY', _shear_y),
    ('TranslateX', _translate_x),
    ('TranslateY', _translate_y),
)


def apply_operation(name: str, image: Image.Image, magnitude: float,
                    rng: np.random.Generator) -> Image.Image:
  """Applies the operation `name` at `magnitude` (0..10) to an 'L' or 'RGB' image."""
  fn = dict(OPERATIONS)[name]
  return fn(image, min(max(magnitude, 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE, rng)


def rand_augment(image: Image.Image, rng: np.random.Generator, *, num_layers: int,
                 magnitude: float) -> Image.Image:
  """`num_layers` random operations, each applied with probability 0.5."""
  level = min(max(magnitude, 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
  for _ in range(num_layers):
    _, fn = OPERATIONS[rng.integers(len(OPERATIONS))]
    if rng.random() < APPLY_PROB:
      image = fn(image, level, rng)
  return image

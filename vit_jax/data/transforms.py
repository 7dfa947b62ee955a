"""Host-side image transforms: crop, resize, flip, RandAugment, normalise.

An example goes crop box -> one PIL resize of the box to the output size -> flip ->
RandAugment as a PIL image (PIL's resize is antialiased, in C, and releases the
GIL, so pipeline threads overlap), then becomes uint8; whole batches are converted to
float32, normalised and expanded to the model's channels in numpy at once.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from vit_jax.data import randaugment

RESAMPLE = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}
# data.transparent_background: the grey level transparent pixels are composited onto;
# 'contrast': black under a light glyph, white under a dark one (by the mean luminance of
# the visible pixels), so that no glyph vanishes into its background.
BACKGROUNDS = {'white': 255, 'gray': 128, 'black': 0, 'contrast': None}

# (left, upper, right, lower) in pixels of the stored image, PIL's order; floats allowed.
Box = tuple[float, float, float, float]


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: Sequence[float], ratio: Sequence[float]) -> Box:
  """Inception-style crop: area fraction uniform in `scale`, aspect ratio log-uniform in
  `ratio`; 10 tries, then the largest central crop with a ratio in range. The algorithm
  of torchvision's RandomResizedCrop, which timm, DeiT and MAE use."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      left = int(rng.integers(0, width - crop_w + 1))
      top = int(rng.integers(0, height - crop_h + 1))
      return (left, top, left + crop_w, top + crop_h)
  aspect = width / height
  if aspect < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    crop_w, crop_h = int(round(height * max(ratio))), height
  else:
    crop_w, crop_h = width, height
  left, top = (width - crop_w) // 2, (height - crop_h) // 2
  return (left, top, left + crop_w, top + crop_h)


def center_crop_box(width: int, height: int, crop_fraction: float) -> Box:
  """The square that 'resize the shorter side to size / crop_fraction, then cut the
  central size x size' keeps, in stored pixels: its side is crop_fraction * shorter side."""
  side = crop_fraction * min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def composite(pixels: np.ndarray, background: Optional[int]) -> np.ndarray:
  """uint8 (H, W, 2 or 4) with alpha last -> uint8 (H, W, 1 or 3) over a grey background
  (a level 0-255, or None: black or white, whichever contrasts with the visible pixels)."""
  colour = pixels[..., :-1].astype(np.float32)
  alpha = pixels[..., -1:].astype(np.float32) * (1.0 / 255.0)
  if background is None:
    if colour.shape[-1] == 3:  # ITU-R 601 luma, as PIL's convert('L')
      luminance = colour @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
      luminance = colour[..., 0]
    weight = alpha[..., 0].sum()
    mean = float((luminance * alpha[..., 0]).sum() / weight) if weight > 0 else 255.0
    background = 0 if mean >= 127.5 else 255
  return np.round(colour * alpha + float(background) * (1.0 - alpha)).astype(np.uint8)


def random_erase(image: np.ndarray, rng: np.random.Generator, probability: float, *,
                 scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> None:
  """Random erasing (Zhong et al. 2020) of a normalised float image (H, W, C), in place.

  With `probability`, one rectangle whose area is a `scale` fraction of the image and
  whose aspect ratio is log-uniform in `ratio` (up to `attempts` draws until one fits) is
  replaced by standard normal noise per pixel and channel: timm's RandomErasing in
  mode='pixel' with one rectangle, as the MAE fine-tuning recipe uses it (reprob 0.25),
  after normalisation, so the noise has the statistics of normalised pixels."""
  if probability <= 0 or rng.random() >= probability:
    return
  height, width, channels = image.shape
  for _ in range(attempts):
    area = rng.uniform(*scale) * height * width
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      image[top:top + h, left:left + w] = rng.standard_normal((h, w, channels), np.float32)
      return


def crop_resize(pixels: np.ndarray, box_fn: Callable[[int, int], Box], image_size: int,
                mode: str, resample) -> Image.Image:
  """Cuts box_fn(width, height) out of a stored image and resizes it to a square.

  Args:
    pixels: uint8 (H, W, C) or (H, W) array, as TFDS data sources return images.
    box_fn: gives the crop box from the stored width and height.
    image_size: side of the square output.
    mode: 'L' or 'RGB', the PIL mode of the output.
    resample: a PIL resampling filter.
  Returns:
    PIL image of size (image_size, image_size) in `mode`.
  """
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[:, :, 0]
  image = Image.fromarray(pixels)
  if image.mode != mode:
    image = image.convert(mode)
  # One resize of the box: PIL antialiases when it shrinks, as torchvision does.
  return image.resize((image_size, image_size), resample, box=box_fn(*image.size))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Everything an image goes through between storage and the model.

  Attributes:
    image_size: side of the square images the model takes.
    channels: channels the model takes; grayscale becomes 3 by repetition, colour
      becomes 1 by PIL's luminance.
    train: random crop, flip and RandAugment when True; centre crop when False.
    crop_scale, crop_ratio: random resized crop ranges of area fraction and aspect.
    flip: random horizontal flip (train).
    randaugment_layers, randaugment_magnitude: RandAugment (train; 0 layers = off).
    random_erasing: probability of erasing a rectangle of each normalised training image
      (see random_erase; 0 = off).
    eval_crop_fraction: evaluation keeps the central crop_fraction of the shorter side.
    interpolation: 'bilinear' or 'bicubic'.
    mean, std: per-channel normalisation of pixel values in [0, 1]; one value or one per
      output channel.
    transparent_background: 'white', 'gray', 'black' or 'contrast' (see BACKGROUNDS),
      what transparent pixels (of a dataset stored with alpha) are composited onto,
      before anything else.
  """
  image_size: int
  channels: int
  train: bool
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  randaugment_layers: int = 0
  randaugment_magnitude: float = 9.0
  random_erasing: float = 0.0
  eval_crop_fraction: float = 1.0
  interpolation: str = 'bilinear'
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)
  transparent_background: str = 'contrast'

  @classmethod
  def from_config(cls, data_config, *, image_size: int, channels: int, train: bool):
    return cls(image_size=int(image_size), channels=int(channels), train=train,
               crop_scale=tuple(data_config.crop_scale), crop_ratio=tuple(data_config.crop_ratio),
               flip=bool(data_config.flip), randaugment_layers=int(data_config.randaugment_layers),
               randaugment_magnitude=float(data_config.randaugment_magnitude),
               random_erasing=float(data_config.random_erasing),
               eval_crop_fraction=float(data_config.eval_crop_fraction),
               interpolation=data_config.interpolation,
               mean=tuple(data_config.mean), std=tuple(data_config.std),
               transparent_background=data_config.transparent_background)

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f'channels={self.channels}: the pipeline gives 1 or 3 channels.')
    if self.transparent_background not in BACKGROUNDS:
      raise ValueError(f'data.transparent_background={self.transparent_background!r} is not one '
                       f'of {sorted(BACKGROUNDS)}.')
    if self.interpolation not in RESAMPLE:
      raise ValueError(f'interpolation={self.interpolation!r} is not one of {sorted(RESAMPLE)}.')
    for name in ('mean', 'std'):
      if len(getattr(self, name)) not in (1, self.channels):
        raise ValueError(f'data.{name}={getattr(self, name)} needs 1 or {self.channels} values '
                         f'for {self.channels}-channel images.')
    if not 0 <= self.random_erasing <= 1:
      raise ValueError(f'data.random_erasing={self.random_erasing} is a probability: give a '
                       'value in [0, 1] (the MAE fine-tuning recipe uses 0.25).')
    if not 0 < self.eval_crop_fraction <= 1:
      raise ValueError(f'eval_crop_fraction={self.eval_crop_fraction} must be in (0, 1].')
    if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
      raise ValueError(f'crop_scale={self.crop_scale} must be 0 < low <= high <= 1.')

  def work_channels(self, stored_channels: Optional[int]) -> int:
    """Channels between decoding and `batch`: grayscale (with or without alpha) stays one
    channel (3x less work) and is repeated in `batch` when the model wants 3."""
    return 1 if self.channels == 1 or stored_channels in (1, 2) else 3

  def example(self, pixels: np.ndarray, stored_channels: Optional[int],
              rng: Optional[np.random.Generator]) -> np.ndarray:
    """One stored uint8 image (H, W, C) -> uint8 (S, S, work_channels(stored_channels)).

    `rng` is needed when `train`. Alpha (C = 2 or 4) is composited away first.
    """
    mode = 'L' if self.work_channels(stored_channels) == 1 else 'RGB'
    if pixels.ndim == 3 and pixels.shape[-1] in (2, 4):
      pixels = composite(pixels, BACKGROUNDS[self.transparent_background])
    if self.train:
      box_fn = lambda w, h: random_resized_crop_box(rng, w, h, self.crop_scale, self.crop_ratio)
    else:
      box_fn = lambda w, h: center_crop_box(w, h, self.eval_crop_fraction)
    image = crop_resize(pixels, box_fn, self.image_size, mode, RESAMPLE[self.interpolation])
    if self.train and self.flip and rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if self.train and self.randaugment_layers:
      image = randaugment.rand_augment(image, rng, num_layers=self.randaugment_layers,
                                       magnitude=self.randaugment_magnitude)
    array = np.asarray(image, np.uint8)
    return array[:, :, None] if array.ndim == 2 else array

  def erase(self, image: np.ndarray, rng: Optional[np.random.Generator]) -> None:
    """Random erasing of one normalised image of `batch` (train), in place."""
    if self.train and self.random_erasing:
      random_erase(image, rng, self.random_erasing)

  def batch(self, images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 1 or 3) -> normalised float32 (B, S, S, channels)."""
    if images.shape[-1] == 1 and self.channels == 3:
      images = np.repeat(images, 3, axis=-1)
    normalised = images.astype(np.float32)
    # In place: for large batches this is memory-bound, and temporaries cost a third more.
    normalised -= 255.0 * np.asarray(self.mean, np.float32)
    normalised *= 1.0 / (255.0 * np.asarray(self.std, np.float32))
    return normalised

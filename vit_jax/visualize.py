"""MAE reconstructions as in the paper's figures: original, masked, reconstruction, and
reconstruction with the visible patches pasted back, one row per image."""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from vit_jax import models
from vit_jax.models import layers

TITLES = ('original', 'masked', 'reconstruction', '+ visible')


def reconstruct(model, params, images, key):
  """Returns (masked, reconstruction, pasted), each (batch, H, W, C), in the input's scale.

  With norm_pix_loss the predictions are per-patch normalised; they are mapped back
  with the mean and variance of the true patches, as the official demo does.
  """
  _, pred, mask = model.apply({'params': params}, images, rngs={'masking': key})
  target = layers.patchify(images, model.patch_size)
  if model.norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    pred = pred * (var + 1e-6)**0.5 + mean
  unpatch = lambda x: layers.unpatchify(x, model.patch_size, model.grid, model.channels)  # noqa: E731
  removed = mask[..., None]
  masked = unpatch(target * (1 - removed))
  reconstruction = unpatch(pred)
  pasted = unpatch(target * (1 - removed) + pred * removed)
  return masked, reconstruction, pasted


def load_image_files(paths, model, mean, std) -> np.ndarray:
  """Image files -> (batch, H, W, C) float32 at the model's size, normalised by mean/std."""
  size = models.input_shape(model)[:2]
  images = []
  for path in paths:
    image = Image.open(path).convert('L' if model.channels == 1 else 'RGB')
    image = np.asarray(image.resize(size[::-1], Image.BICUBIC), np.float32) / 255.0
    images.append(image.reshape(*size, model.channels))
  return ((np.stack(images) - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def to_uint8(images, mean, std):
  """Normalised (batch, H, W, C) -> uint8 RGB, grayscale repeated to 3 channels."""
  images = np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)
  images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def panel_grid(rows, scale: int) -> Image.Image:
  """rows: list of lists of uint8 (H, W, 3) arrays -> one image with column titles."""
  height, width = rows[0][0].shape[:2]
  cell_w, cell_h, pad, title_h = width * scale, height * scale, 4, 14
  grid = Image.new('RGB', (len(rows[0]) * (cell_w + pad) + pad,
                           title_h + len(rows) * (cell_h + pad) + pad), 'white')
  draw = ImageDraw.Draw(grid)
  for col, title in enumerate(TITLES[:len(rows[0])]):
    draw.text((pad + col * (cell_w + pad), 2), title, fill='black')
  for r, row in enumerate(rows):
    for c, cell in enumerate(row):
      tile = Image.fromarray(cell).resize((cell_w, cell_h), Image.NEAREST)
      grid.paste(tile, (pad + c * (cell_w + pad), title_h + pad + r * (cell_h + pad)))
  return grid


def save_reconstructions(model, params, images, path: str, *, mean, std, seed: int = 0) -> str:
  """Writes the four-panel PNG for `images` (batch, H, W, C), normalised as in training."""
  images = jnp.asarray(images, jnp.float32)
  masked, reconstruction, pasted = reconstruct(model, params, images, jax.random.key(seed))
  panels = [to_uint8(x, mean, std) for x in (images, masked, reconstruction, pasted)]
  rows = [[panel[i] for panel in panels] for i in range(images.shape[0])]
  scale = max(1, 128 // images.shape[1])
  with epath.Path(path).open('wb') as f:  # also gs://
    panel_grid(rows, scale).save(f, format='PNG')
  return path

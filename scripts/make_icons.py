r"""A folder of small icons with transparent backgrounds, to measure how transparency is fed.

  python scripts/make_icons.py --output=/tmp/icons [--train=2000 --test=1000 --seed=0]
      [--glyphs=mixed|light|dark]

Writes ROOT/{train,test}/CLASS/NNNNN.png: 32x32 RGBA PNGs of nine shapes in unbalanced
classes (the largest 43% of each split), as icon sets are: an anti-aliased glyph of one
colour (light, dark or saturated, a third each) on a fully transparent background, with
black under the transparent pixels (what premultiplied exporters store) in 70% of the
files and the glyph's own colour in the rest (what design tools store). Used by
docs/data.md's measurement of data.transparent_background and by its test.
"""

import math
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'diamond', 'bar', 'arrow')
# Shares of the classes, largest first (the largest is 43.4%, as in the report).
SHARES = (0.434, 0.15, 0.10, 0.08, 0.07, 0.06, 0.045, 0.035, 0.026)
SIZE = 32
SUPERSAMPLE = 4  # drawn at 128x128 and reduced: soft, anti-aliased alpha at the edges


def _polygon(draw, centre, radius, angles, rotation):
  points = [(centre[0] + radius * math.cos(a + rotation),
             centre[1] + radius * math.sin(a + rotation)) for a in angles]
  draw.polygon(points, fill=255)


def glyph_mask(shape: str, rng: np.random.Generator) -> np.ndarray:
  """uint8 (SIZE, SIZE) coverage of one shape, random size, position and rotation."""
  big = SIZE * SUPERSAMPLE
  mask = Image.new('L', (big, big), 0)
  draw = ImageDraw.Draw(mask)
  radius = rng.uniform(0.25, 0.42) * big
  centre = big / 2 + rng.uniform(-0.08, 0.08, size=2) * big
  rotation = rng.uniform(0, 2 * math.pi)
  width = max(4, int(radius * 0.35))
  box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
  if shape == 'circle':
    draw.ellipse(box, fill=255)
  elif shape == 'ring':
    draw.ellipse(box, outline=255, width=width)
  elif shape == 'square':
    _polygon(draw, centre, radius, [math.pi / 4 + k * math.pi / 2 for k in range(4)], rotation)
  elif shape == 'diamond':
    _polygon(draw, centre, radius, [k * math.pi / 2 for k in range(4)], 0.0)
  elif shape == 'triangle':
    _polygon(draw, centre, radius, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)],
             rotation)
  elif shape == 'star':
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    points = [(centre[0] + (radius if k % 2 == 0 else radius * 0.45) * math.cos(a + rotation),
               centre[1] + (radius if k % 2 == 0 else radius * 0.45) * math.sin(a + rotation))
              for k, a in enumerate(angles)]
    draw.polygon(points, fill=255)
  elif shape in ('cross', 'bar'):
    directions = (rotation, rotation + math.pi / 2) if shape == 'cross' else (rotation,)
    for angle in directions:
      dx, dy = radius * math.cos(angle), radius * math.sin(angle)
      draw.line([centre[0] - dx, centre[1] - dy, centre[0] + dx, centre[1] + dy], fill=255,
                width=width)
  elif shape == 'arrow':
    dx, dy = math.cos(rotation), math.sin(rotation)
    tip = (centre[0] + radius * dx, centre[1] + radius * dy)
    tail = (centre[0] - radius * dx, centre[1] - radius * dy)
    draw.line([tail, tip], fill=255, width=width)
    for side in (-1, 1):
      angle = rotation + math.pi + side * math.pi / 5
      draw.line([tip, (tip[0] + 0.6 * radius * math.cos(angle),
                       tip[1] + 0.6 * radius * math.sin(angle))], fill=255, width=width)
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def glyph_colour(rng: np.random.Generator, glyphs: str = 'mixed') -> np.ndarray:
  """'mixed': light, dark or saturated, a third each; 'light' or 'dark': only those."""
  kind = {'mixed': rng.integers(3), 'light': 0, 'dark': 1}[glyphs]
  if kind == 0:  # light
    return np.full(3, rng.integers(225, 256), np.uint8)
  if kind == 1:  # dark
    return np.full(3, rng.integers(0, 31), np.uint8)
  hue = np.array(Image.new('HSV', (1, 1), (int(rng.integers(256)), 255, 255)).convert('RGB'))
  return hue.reshape(3).astype(np.uint8)


def icon(shape: str, rng: np.random.Generator, glyphs: str = 'mixed') -> Image.Image:
  """One RGBA icon: the glyph's colour where it is, transparent elsewhere."""
  alpha = glyph_mask(shape, rng)
  colour = glyph_colour(rng, glyphs)
  rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
  if rng.random() < 0.3:  # the glyph's colour under every pixel
    rgba[..., :3] = colour
  else:  # black under the transparent pixels
    rgba[..., :3] = np.where(alpha[..., None] > 0, colour, 0)
  rgba[..., 3] = alpha
  return Image.fromarray(rgba, 'RGBA')


def write_icons(root: str, counts: dict[str, int], seed: int,
                glyphs: str = 'mixed') -> dict[str, list[int]]:
  """Writes root/SPLIT/CLASS/NNNNN.png for {split: count}; returns {split: labels}."""
  labels = {}
  for split_index, (split, count) in enumerate(counts.items()):
    rng = np.random.default_rng([seed, split_index])
    # Exact shares (rounded), shuffled: every split has the same class balance.
    per_class = [int(round(share * count)) for share in SHARES]
    per_class[0] += count - sum(per_class)
    split_labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
    for index, label in enumerate(split_labels):
      folder = os.path.join(root, split, CLASSES[label])
      os.makedirs(folder, exist_ok=True)
      icon(CLASSES[label], rng, glyphs).save(os.path.join(folder, f'{index:05d}.png'))
    labels[split] = split_labels.tolist()
  return labels


def main(argv):
  del argv
  flag_values = flags.FLAGS
  counts = {'train': flag_values.train, 'test': flag_values.test}
  labels = write_icons(flag_values.output, counts, flag_values.seed, flag_values.glyphs)
  for split, split_labels in labels.items():
    largest = max(np.bincount(split_labels)) / len(split_labels)
    print(f'{split}: {len(split_labels)} icons, largest class {largest:.1%}')
  print(f'Icons in {flag_values.output}/{{train,test}}/CLASS/*.png')


if __name__ == '__main__':
  flags.DEFINE_string('output', None, 'Folder to write (ROOT/{train,test}/CLASS/*.png).')
  flags.DEFINE_integer('train', 2000, 'Training icons.')
  flags.DEFINE_integer('test', 1000, 'Test icons.')
  flags.DEFINE_integer('seed', 0, 'Seed of the shapes, colours and order.')
  flags.DEFINE_enum('glyphs', 'mixed', ['mixed', 'light', 'dark'],
                    'Glyph colours: light, dark and saturated a third each, or one kind.')
  flags.mark_flag_as_required('output')
  sys.exit(app.run(main))

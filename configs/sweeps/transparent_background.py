r"""What transparent pixels are composited onto (data.transparent_background), measured on
icons with transparent backgrounds: white, mid grey, black, or black or white by the
glyph's luminance ('contrast'), two seeds each.

  python scripts/make_icons.py --output=runs/icons      # 2,000 + 1,000 icons, 9 classes
  python scripts/prepare_dataset.py --dataset=image_folder --source_dir=runs/icons
  python -m vit_jax.sweep --sweep=configs/sweeps/transparent_background.py \
      --workdir=runs/transparent_background

The icons (scripts/make_icons.py) are light, dark and coloured glyphs, a third each, on
fully transparent pixels, in nine unbalanced classes (the largest 43.4%). The recipe is
the README's image-folder command with configs/vit_scratch.py:demo for 30 epochs, as in
the report that the white background of image_folder 1.1.0 trained to the share of the
largest class. 8 runs of 2.4 minutes each on a 2-core CPU. Results and the choice of
the default: docs/data.md, "Transparent images".
"""

import os

from vit_jax import sweep

ICONS = os.environ.get('ICONS', 'runs/icons')


def get_sweep():
  return sweep.Sweep(
      title='Transparent icons: the background they are composited onto',
      stages=[sweep.Stage(
          'scratch', 'configs/vit_scratch.py:demo',
          overrides={'data.name': 'image_folder', 'data.source_dir': ICONS,
                     'data.eval_split': 'test', 'model.channels': 3, 'num_epochs': 30},
          grid=sweep.product(
              {'data.transparent_background': ['white', 'gray', 'black', 'contrast']},
              {'seed': [0, 1]}))])

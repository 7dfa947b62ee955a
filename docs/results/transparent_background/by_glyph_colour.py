"""Test top-1 of each member of the transparent_background study by glyph colour.

  python docs/results/transparent_background/by_glyph_colour.py runs/transparent_background/scratch/*

A glyph (its pixels of alpha > 200) is 'coloured' when its channels spread more than 60
levels, else 'light' or 'dark' by its mean. Writes runs/by_colour.json (copied here as
by_glyph_colour.json). Run from the repository root with TFDS_DATA_DIR as in training.
"""
import glob, json, os, sys
import numpy as np
from PIL import Image
import vit_jax

root = 'runs/icons/test'
files, labels, groups = [], [], []
classes = sorted(os.listdir(root))
for label, name in enumerate(classes):
  for path in sorted(glob.glob(f'{root}/{name}/*.png')):
    rgba = np.asarray(Image.open(path).convert('RGBA')).astype(int)
    opaque = rgba[..., 3] > 200
    colour = rgba[..., :3][opaque].mean(0)
    spread = colour.max() - colour.min()
    group = 'coloured' if spread > 60 else ('light' if colour.mean() > 128 else 'dark')
    files.append(path); labels.append(label); groups.append(group)
labels, groups = np.array(labels), np.array(groups)
rows = {}
for workdir in sys.argv[1:]:
  classifier = vit_jax.load(workdir)
  assert list(classifier.class_names) == classes
  hits = vit_jax.predict(classifier, files).argmax(1) == labels
  rows[workdir] = {'all': hits.mean(),
                   **{g: hits[groups == g].mean() for g in ('light', 'dark', 'coloured')}}
  print(workdir, ' '.join(f'{k} {v:.3f}' for k, v in rows[workdir].items()), flush=True)
print({g: int((groups == g).sum()) for g in ('light', 'dark', 'coloured')})
json.dump(rows, open('runs/by_colour.json', 'w'), indent=1)

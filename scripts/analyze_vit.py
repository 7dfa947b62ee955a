r"""What a trained ViT learned: the ViT paper's analyses (section 4.5) as figures and numbers.

From a training workdir (its config.json, latest checkpoint and eval images):

  python scripts/analyze_vit.py --workdir=runs/finetune_demo --output_dir=runs/analysis_ft

From anything `init.path` takes (an Orbax workdir or folder, an MAE encoder, a vit_jax
.npz, a timm .safetensors/.pth), with the architecture from --model; fields that the file
shows (depth, width, MLP size, patch, channels, class token, position embedding and
image size, fc_norm, MAP head, representation layer) are read from it, the number of
heads comes from the name unless --model_fields says otherwise:

  python scripts/analyze_vit.py --checkpoint=ViT-B_16.npz --model=ViT-B/16 --images=a.jpg,b.jpg
  python scripts/analyze_vit.py --checkpoint=tiny.safetensors --model=ViT-mu/16 \
      --model_fields=num_heads=4 --images=a.png

Writes into --output_dir:
  embedding_filters.png     top principal components of the patch-embedding filters (Fig. 7 left)
  position_similarity.png   cosine similarity of each position embedding to all (Fig. 7 centre)
  attention_distance.png    mean attention distance of every head against depth (Fig. 7 right)
  attention_rollout.png     attention rollout from the output onto example images (Fig. 6)
  analysis.json             the numbers behind them
"""

import json
import math
import os
import sys

from absl import app, flags, logging
import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import analysis, checkpoint, data, inference, interop, metrics  # noqa: E402
from vit_jax import models, param_tree, train  # noqa: E402
from vit_jax import visualize  # noqa: E402
from vit_jax.models import layers  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir: model from its config.json, '
                               'weights from its latest checkpoint, images from its eval split.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights: anything init.path takes. With '
                                  '--workdir it replaces the workdir\'s checkpoint.')
_MODEL = flags.DEFINE_string('model', None, 'Model name (ViT-B/16, MAE-L/16, ...) when there is '
                             'no config.json.')
_MODEL_FIELDS = flags.DEFINE_list('model_fields', [], 'key=value model fields over those of '
                                  'the config or the file, e.g. num_heads=4,pool=gap.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files; default: the eval split of the '
                            'workdir\'s data.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, 'Images averaged for the attention '
                                   'distances.')
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 8, 'Images shown with their rollout.')
_NUM_COMPONENTS = flags.DEFINE_integer('num_components', 28, 'Principal components drawn.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Images per forward pass.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the PNGs and analysis.json go; '
                                  'default WORKDIR/analysis.')

# The analyses need the encoder only: these entries of a checkpoint are not loaded.
NOT_ANALYSED = (r'head/.*', r'decoder_.*', r'Decoder/.*', r'mask_token')
POOL_OUTPUT = {
    'tok': 'the class token (the classifier reads it)',
    'gap': 'the mean of the patch tokens (the classifier reads their average)',
    'map': "the MAP head's probe (its attention over the last tokens, times the rollout)",
}


# ------------------------------------------------------------------------- the model


def parse_fields(items) -> dict:
  """['num_heads=4', 'pool=gap'] -> {'num_heads': 4, 'pool': 'gap'}."""
  fields = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--model_fields entry {item!r} is not key=value (e.g. num_heads=4).')
    try:
      fields[key] = json.loads(value)
    except json.JSONDecodeError:
      fields[key] = value
  return fields


def encoder_name(name: str) -> str:
  """'MAE-B/16' -> 'ViT-B/16': the analyses run the encoder as a ViT without a head."""
  return 'ViT-' + name.split('-', 1)[1] if name.startswith('MAE-') else name


def build_model(name: str, fields: dict):
  """An unscanned float32 ViT without a head, whatever the run trained with."""
  encoder_fields = {f for f in models.ViT.__dataclass_fields__} - {'parent', 'name'}
  fields = {k: v for k, v in fields.items() if k in encoder_fields}
  fields.update(num_classes=0, scan=False, remat_policy='none', dtype='float32')
  return models.get_model(encoder_name(name), **fields)


def load(workdir, checkpoint_path, model_name, overrides):
  """-> (model, params, config or None, source)."""
  weights = checkpoint_path or workdir
  config_dir = workdir or (checkpoint_path if checkpoint_path and os.path.isfile(
      os.path.join(checkpoint_path, 'config.json')) else None)
  config = train.load_config_json(config_dir) if config_dir else None
  if config is None and not model_name:
    raise ValueError(f'{weights} has no config.json: give --model=NAME (e.g. ViT-B/16) for it.')
  source, loaded = checkpoint.load_params(weights)
  flat = param_tree.flat_numpy(loaded)
  if config is not None:
    name, fields = config.model_name, config.model.to_dict()
    if name.startswith('MAE-'):  # the encoder: class token, fixed sincos2d, encoder_norm
      fields.update(pool='tok', posemb='sincos2d', fc_norm=False)
  else:
    name, fields = model_name, interop.model_fields(flat)
  model = build_model(name, {**fields, **overrides})
  fresh = jax.device_get(jax.jit(lambda key: models.init_variables(model, key))(
      jax.random.key(0))['params'])
  params, report = interop.fit_params(flat, fresh, ignore_unexpected=NOT_ANALYSED,
                                      new_grid=model.grid, source=weights)
  print(f'{model.__class__.__name__} {encoder_name(name)} from {source}: {report}')
  return model, params, config, source


def load_images(model, config, paths, count: int):
  """-> (images normalised as the model takes them, mean, std, description)."""
  if config is not None:
    mean, std = config.data.mean, config.data.std
  elif model.channels == 3:  # public RGB checkpoints: ImageNet's statistics
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
  else:
    mean, std = (0.5,) * model.channels, (0.5,) * model.channels
  if paths:
    return visualize.load_image_files(paths, model, mean, std), mean, std, f'{len(paths)} files'
  if config is None:
    raise ValueError('no images: give --images=a.jpg,b.png (only a workdir brings its data).')
  data.ensure_prepared(config.data)
  split = config.data.eval_split
  batch = data.pipeline.eval_batches(config.data, local_batch_size=count,
                                     image_size=model.image_size, channels=model.channels,
                                     split=split, process_index=0, process_count=1)[0]
  images = np.asarray(batch['image'])[np.asarray(batch['mask']) > 0]
  return images, mean, std, (
      f'the first {len(images)} images of {config.data.name}:{split}')


# ------------------------------------------------------------------------- the figures


def mosaic(tiles: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
  """(n, h, w[, c]) -> one image of `columns` tiles per row, NaN between tiles and after the last."""
  n, h, w = tiles.shape[:3]
  rows = math.ceil(n / columns)
  out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap) + tiles.shape[3:], np.nan)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
  return out


def draw_filters(components, explained, path: str) -> None:
  k = len(components)
  columns = min(k, 7)
  # Each component scaled to [0, 1] on its own, as images of directions.
  low = components.min(axis=(1, 2, 3), keepdims=True)
  high = components.max(axis=(1, 2, 3), keepdims=True)
  tiles = (components - low) / np.maximum(high - low, 1e-12)
  tiles = tiles[..., 0] if tiles.shape[-1] == 1 else tiles
  image = mosaic(tiles, columns)
  rows = math.ceil(k / columns)
  fig, ax = plt.subplots(figsize=(1.0 * columns + 0.4, 1.0 * rows + 0.8))
  cmap = plt.get_cmap('gray').copy()
  cmap.set_bad('white')
  ax.imshow(np.where(np.isnan(image), 1.0, image) if image.ndim == 3 else
            np.ma.masked_invalid(image), cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
  ax.set_axis_off()
  dims = int(np.prod(components.shape[1:]))
  ax.set_title(f'Patch embedding: top {k} of {dims} principal components\n'
               f'({100 * explained.sum():.1f}% of the filters\' variance)', fontsize=9)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def draw_position_similarity(similarity, grid, kind: str, path: str) -> None:
  rows, cols = grid
  tiles = similarity.reshape(rows * cols, rows, cols)
  image = mosaic(tiles, cols)
  size = min(8.0, 0.45 * cols + 1.5)
  fig, ax = plt.subplots(figsize=(size + 0.8, size * rows / cols + 0.6))
  cmap = plt.get_cmap('viridis').copy()
  cmap.set_bad('white')
  # The colour range starts at the lowest similarity, not at -1: a fixed sincos2d table is
  # similar everywhere (0.74 to 1 on a 7x7 grid of width 128), and -1..1 hides its structure.
  low = min(0.9, math.floor(float(np.nanmin(image)) * 10) / 10)
  shown = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=low, vmax=1,
                    interpolation='nearest')
  ax.set_xticks([c * (cols + 1) + cols / 2 - 0.5 for c in range(cols)], range(1, cols + 1),
                fontsize=6)
  ax.set_yticks([r * (rows + 1) + rows / 2 - 0.5 for r in range(rows)], range(1, rows + 1),
                fontsize=6)
  ax.tick_params(length=0)
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  ax.set_title(f'Position embedding similarity ({kind})', fontsize=9)
  fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label='cosine similarity')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def draw_attention_distance(distance, uniform: float, image_size, path: str) -> None:
  depth, heads = distance.shape
  fig, ax = plt.subplots(figsize=(4.2, 3.4))
  for head in range(heads):
    ax.scatter(np.arange(1, depth + 1), distance[:, head], s=14, label=f'head {head + 1}')
  ax.axhline(uniform, color='gray', linestyle='--', linewidth=1)
  ax.text(depth + 0.45, uniform, 'uniform', color='gray', fontsize=7, va='bottom', ha='right')
  ax.set_xlim(0.5, depth + 0.5)
  ax.set_ylim(0, max(float(distance.max()), uniform) * 1.1)
  ax.set_xticks(range(1, depth + 1))
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_title(f'Attention distance ({layers.pair(image_size)[0]} px images)', fontsize=9)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2 if heads > 6 else 1, loc='lower right')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def draw_rollout(images_uint8, maps, grid, output: str, path: str) -> None:
  n = len(images_uint8)
  height, width = images_uint8.shape[1:3]
  fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.9), squeeze=False)
  for i in range(n):
    heat = maps[i].reshape(grid)
    heat = heat / max(float(heat.max()), 1e-12)
    heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((width, height),
                                                                      Image.BILINEAR))
    axes[0, i].imshow(images_uint8[i], interpolation='nearest')
    axes[1, i].imshow(images_uint8[i], interpolation='nearest')
    axes[1, i].imshow(heat, cmap='inferno', alpha=0.6, vmin=0, vmax=1, interpolation='bilinear')
    for ax in axes[:, i]:
      ax.set_axis_off()
  fig.suptitle(f'Attention rollout from {output}', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


# ------------------------------------------------------------------------------ main


def rounded(x, digits: int = 4):
  return np.round(np.asarray(x, np.float64), digits).tolist()


def similarity_by_distance(similarity, grid) -> dict:
  """Mean cosine similarity of position embeddings at each grid distance (rounded), > 0."""
  distances = analysis.patch_distances(grid, 1)
  out = {}
  for d in sorted(set(np.round(distances[distances > 0]).astype(int).tolist()))[:6]:
    out[str(d)] = round(float(similarity[np.round(distances) == d].mean()), 4)
  return out


def analyze(model, params, images, output_dir: str, *, num_examples: int, num_components: int,
            batch_size: int, mean, std) -> dict:
  """Writes the four PNGs; returns the numbers for analysis.json."""
  os.makedirs(output_dir, exist_ok=True)
  grid, p = model.grid, model.num_prefix_tokens
  result = {}

  components, explained = analysis.embedding_components(params['embedding']['kernel'],
                                                        num_components)
  draw_filters(components, explained, os.path.join(output_dir, 'embedding_filters.png'))
  result['embedding_filters'] = {
      'png': 'embedding_filters.png', 'components': len(components),
      'explained_variance': rounded(explained)}

  if model.posemb == 'learn':
    posemb, kind = params['Transformer']['posembed_input']['pos_embedding'][0, p:], 'learned'
  else:
    posemb, kind = layers.sincos2d_table(grid, model.width), 'fixed sincos2d, not learned'
  similarity = analysis.cosine_similarity(posemb)
  draw_position_similarity(similarity, grid, kind,
                           os.path.join(output_dir, 'position_similarity.png'))
  result['position_similarity'] = {
      'png': 'position_similarity.png', 'kind': kind, 'grid': list(grid),
      'mean_by_grid_distance': similarity_by_distance(similarity, grid),
      'similarity': rounded(similarity, 3)}

  summary = analysis.attention_summary(model, params, images, batch_size=batch_size)
  uniform = analysis.uniform_attention_distance(grid, model.patch_size)
  draw_attention_distance(summary['distance'], uniform, model.image_size,
                          os.path.join(output_dir, 'attention_distance.png'))
  result['attention_distance'] = {
      'png': 'attention_distance.png', 'images': len(images),
      'pixels': rounded(summary['distance'], 3),
      'layer_mean_pixels': rounded(summary['distance'].mean(axis=1), 3),
      'uniform_attention_pixels': round(uniform, 3),
      'prefix_token_share': rounded(summary['prefix_share'])}

  maps = summary['rollout']
  normalised = maps / maps.sum(axis=1, keepdims=True)
  top = max(1, normalised.shape[1] // 10)
  top_share = np.sort(normalised, axis=1)[:, -top:].sum(axis=1)
  shown = min(num_examples, len(images))
  draw_rollout(visualize.to_uint8(images[:shown], mean, std), maps[:shown], grid,
               POOL_OUTPUT[model.pool], os.path.join(output_dir, 'attention_rollout.png'))
  result['attention_rollout'] = {
      'png': 'attention_rollout.png', 'output': POOL_OUTPUT[model.pool],
      'patch_share': round(float(maps.sum(axis=1).mean()), 4),
      f'top_{top}_patches_share': round(float(top_share.mean()), 4),
      'uniform_top_share': round(top / normalised.shape[1], 4),
      'maps': rounded(normalised[:shown])}
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if not (_WORKDIR.value or _CHECKPOINT.value):
      raise ValueError('give --workdir=DIR or --checkpoint=FILE_OR_DIR.')
    for flag in (_NUM_IMAGES, _NUM_EXAMPLES, _NUM_COMPONENTS, _BATCH):
      if flag.value < 1:
        raise ValueError(f'--{flag.name}={flag.value} must be at least 1.')
    overrides = parse_fields(_MODEL_FIELDS.value)
    model, params, config, source = load(_WORKDIR.value, _CHECKPOINT.value, _MODEL.value,
                                         overrides)
    images, mean, std, images_from = load_images(model, config, _IMAGES.value, _NUM_IMAGES.value)
    output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value or '.', 'analysis')
    kind, _, where = source.partition(':')
    if where.startswith(os.getcwd() + os.sep):  # paths under the current folder, relative
      source = f'{kind}:{os.path.relpath(where)}'
    result = {'source': source, 'images': images_from, 'model': {
        k: getattr(model, k) for k in ('patch_size', 'width', 'depth', 'num_heads', 'mlp_dim',
                                       'image_size', 'channels', 'pool', 'class_token',
                                       'posemb')}}
    result |= analyze(model, params, images, output_dir, num_examples=_NUM_EXAMPLES.value,
                      num_components=_NUM_COMPONENTS.value, batch_size=_BATCH.value,
                      mean=mean, std=std)
  except ValueError as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  with open(os.path.join(output_dir, 'analysis.json'), 'w') as f:
    json.dump(result, f, indent=1)
  distances = result['attention_distance']['layer_mean_pixels']
  print(f'Mean attention distance by layer (px): {", ".join(f"{d:.1f}" for d in distances)} '
        f'(uniform attention: {result["attention_distance"]["uniform_attention_pixels"]:.1f})')
  print(f'Wrote {output_dir}/{{embedding_filters,position_similarity,attention_distance,'
        f'attention_rollout}}.png and analysis.json')
  if _WORKDIR.value:  # beside the run's curves, under TensorBoard's Images
    step = inference.checkpoint_step(source)
    metrics.write_images(_WORKDIR.value, step, {
        f'analysis/{name}': os.path.join(output_dir, result[name]['png'])
        for name in ('embedding_filters', 'position_similarity', 'attention_distance',
                     'attention_rollout')})
    print(f'TensorBoard: the figures are under Images, analysis/*, at step {step} '
          f'({_WORKDIR.value}/tensorboard).')


if __name__ == '__main__':
  app.run(main)

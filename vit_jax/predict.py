r"""Command line: a trained classifier on your images.

  python -m vit_jax.predict --checkpoint=runs/finetune_demo --images=photos/ [--top_k=5] \
      [--output=predictions.csv|.jsonl] [--labels=names.txt]
  python -m vit_jax.predict --checkpoint=runs/finetune_demo --eval_dir=ROOT  # ROOT/CLASS/*.png

--checkpoint takes what `config.init.path` takes: a training workdir (model, weights and
evaluation preprocessing from it), an Orbax folder, or a .npz/.safetensors/.pth file
(then --model=ViT-B/16 names the model). --images takes files, folders (searched
recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp) and globs, comma-separated. Batches go
over every local device. One line per image: CSV on stdout, or --output as CSV or JSONL
(by its extension). Unreadable images are listed on stderr and skipped.

With --eval_dir=ROOT (ROOT/CLASS_NAME/*.png, class names those of the model's dataset or
of --labels, '/' in a name written '_') it also prints top-1 and top-5 accuracy, overall
and per class, and writes the confusion matrix as a PNG (--confusion_matrix; also to the
workdir's TensorBoard when --checkpoint is a training workdir).

From Python, use `vit_jax.load` and `vit_jax.predict` (vit_jax/inference.py); importing
this module would shadow `vit_jax.predict`, the function.
"""

import contextlib
import csv
import glob
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A training workdir, an Orbax folder or '
                                  'a .npz/.safetensors/.pth file.')
_MODEL = flags.DEFINE_string('model', '', 'Model name (e.g. ViT-B/16) for a checkpoint without '
                             'config.json.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files, folders or globs, comma-separated.')
_EVAL_DIR = flags.DEFINE_string('eval_dir', '', 'ROOT of ROOT/CLASS/* images: also report '
                                'accuracy per class and the confusion matrix.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes per image, most probable first.')
_LABELS = flags.DEFINE_string('labels', '', 'File of class names, one per line (default: the '
                              "dataset's).")
_OUTPUT = flags.DEFINE_string('output', '', 'Where the predictions go: .csv or .jsonl '
                              '(default: CSV on stdout).')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Images per forward pass, over all devices.')
_CONFUSION = flags.DEFINE_string('confusion_matrix', 'confusion_matrix.png',
                                 'PNG of the confusion matrix (with --eval_dir).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'A progress bar on stderr when it is a terminal.')


class Unreadable(Exception):
  """An image file that PIL cannot decode."""


# ---------------------------------------------------------------------------- inputs


def image_files(entries) -> list[str]:
  """Files of the --images entries, in order, each once; an entry that names nothing
  raises ValueError."""
  from vit_jax.data import builders  # pylint: disable=import-outside-toplevel
  found = []
  for entry in entries:
    if os.path.isdir(entry):
      matches = builders.image_files(entry)
    elif any(c in entry for c in '*?['):
      matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
      if not matches:
        raise ValueError(f'--images: the glob {entry!r} matches no file.')
    elif os.path.isfile(entry):
      matches = [entry]
    else:
      raise ValueError(f'--images: {entry!r} is neither a file nor a folder.')
    if not matches:
      raise ValueError(f'--images: the folder {entry!r} holds no image file '
                       f'({", ".join(builders.IMAGE_EXTENSIONS)}).')
    found += matches
  return list(dict.fromkeys(found))


def labelled_files(root: str, class_names) -> tuple[list[str], list[int], tuple[str, ...]]:
  """(files, labels, class names) of ROOT/CLASS/*; labels index the model's classes."""
  from vit_jax.data import builders  # pylint: disable=import-outside-toplevel
  layout = builders.scan_image_folder(root)
  if set(layout.files) != {'train'}:
    raise ValueError(f'--eval_dir={root} holds split folders {sorted(layout.files)}: give one '
                     f'of them, e.g. --eval_dir={os.path.join(root, sorted(layout.files)[0])}.')
  names = tuple(class_names) if class_names else tuple(layout.class_names)
  # A folder is named by its class, '/' written as '_' ('T-shirt/top' -> 'T-shirt_top').
  index = {name.replace('/', '_'): i for i, name in enumerate(names)}
  index.update({name: i for i, name in enumerate(names)})
  unknown = [c for c in layout.class_names if c not in index]
  if unknown:
    raise ValueError(f'--eval_dir: folder(s) {unknown} of {root} are not classes of the '
                     f'model ({", ".join(names[:12])}{" ..." if len(names) > 12 else ""}); '
                     'rename them or give --labels=FILE.')
  files = [path for path, _ in layout.files['train']]
  labels = [index[layout.class_names[label]] for _, label in layout.files['train']]
  return files, labels, names


def read_labels(path: str, num_classes: int) -> tuple[str, ...]:
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if len(names) != num_classes:
    raise ValueError(f'--labels={path} has {len(names)} names; the model has {num_classes} '
                     'classes.')
  return names


# ------------------------------------------------------------------------ prediction


def predict_files(classifier, files, batch_size: int, progress: bool):
  """Yields (file, logits or None, error or None) per file, in order, batch by batch."""
  bar = None
  if progress and sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(files), unit='img', file=sys.stderr)
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    images, errors = [], []
    for path in chunk:
      try:
        images.append(classifier.preprocess(path))
        errors.append(None)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'.strip())
    logits = iter(classifier.logits(np.stack(images)) if images else [])
    for path, error in zip(chunk, errors):
      yield path, (None if error else next(logits)), error
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()


def rows(predictions, labels, classifier, k: int):
  """One dict per readable image: image, (label,) top-k classes and probabilities."""
  from vit_jax import inference  # pylint: disable=import-outside-toplevel
  if not predictions:
    return
  paths = [path for path, _ in predictions]
  indices, probabilities = inference.top_k(np.stack([x for _, x in predictions]), k)
  for path, top, chances in zip(paths, indices, probabilities):
    row = {'image': path}
    if labels is not None:
      row['label'] = classifier.label(labels[path])
    row['top_k'] = [{'class': classifier.label(int(i)), 'index': int(i),
                     'probability': round(float(p), 6)} for i, p in zip(top, chances)]
    yield row


def write_rows(all_rows, stream, fmt: str, k: int, labelled: bool) -> None:
  if fmt == 'jsonl':
    for row in all_rows:
      stream.write(json.dumps(row) + '\n')
    return
  writer = csv.writer(stream, lineterminator='\n')
  header = ['image'] + (['label'] if labelled else [])
  for rank in range(1, k + 1):
    header += [f'class_{rank}', f'probability_{rank}']
  writer.writerow(header)
  for row in all_rows:
    cells = [row['image']] + ([row['label']] if labelled else [])
    for entry in row['top_k']:
      cells += [entry['class'], f'{entry["probability"]:.6f}']
    writer.writerow(cells)


# ------------------------------------------------------------------------ evaluation


def accuracy_report(labels, logits, class_names) -> tuple[str, np.ndarray]:
  """(text: top-1 and top-5 overall and per class, confusion matrix (true, predicted))."""
  labels = np.asarray(labels)
  order = np.argsort(-logits, axis=-1, kind='stable')
  top1 = order[:, 0] == labels
  top5 = np.any(order[:, :5] == labels[:, None], axis=1)
  confusion = np.zeros((len(class_names), len(class_names)), np.int64)
  np.add.at(confusion, (labels, order[:, 0]), 1)
  lines = [f'Accuracy on {len(labels)} images: top-1 {top1.mean():.2%} ({top1.sum()}), '
           f'top-5 {top5.mean():.2%} ({top5.sum()})',
           f'  {"class":<24} {"images":>6} {"top-1":>8}']
  for index, name in enumerate(class_names):
    members = labels == index
    if members.any():
      lines.append(f'  {name[:24]:<24} {members.sum():>6} {top1[members].mean():>8.2%}')
  return '\n'.join(lines), confusion


def save_confusion_matrix(confusion, class_names, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  size = max(4.0, 0.45 * len(class_names) + 2)
  figure, axes = plt.subplots(figsize=(size, size))
  axes.imshow(confusion, cmap='Blues')
  ticks = range(len(class_names))
  axes.set_xticks(ticks, class_names, rotation=90)
  axes.set_yticks(ticks, class_names)
  axes.set_xlabel('predicted')
  axes.set_ylabel('true')
  high = confusion.max() / 2
  for (row, col), count in np.ndenumerate(confusion):
    if count:
      axes.text(col, row, str(count), ha='center', va='center', fontsize=7,
                color='white' if count > high else 'black')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


# ---------------------------------------------------------------------------- main


def run_prediction() -> None:
  from vit_jax import inference  # pylint: disable=import-outside-toplevel
  if not (_IMAGES.value or _EVAL_DIR.value):
    raise ValueError('Nothing to predict: give --images=FILES,FOLDERS,GLOBS or --eval_dir=ROOT.')
  if _TOP_K.value < 1 or _BATCH.value < 1:
    raise ValueError('--top_k and --batch_size must be at least 1.')
  fmt = 'jsonl' if _OUTPUT.value.endswith('.jsonl') else 'csv'
  if _OUTPUT.value and not _OUTPUT.value.endswith(('.csv', '.jsonl')):
    raise ValueError(f'--output={_OUTPUT.value}: name a .csv or .jsonl file.')
  files = image_files(_IMAGES.value)  # before the model loads: a typo fails at once
  classifier = inference.load(_CHECKPOINT.value, model=_MODEL.value)
  if _LABELS.value:
    classifier.class_names = read_labels(_LABELS.value, classifier.num_classes)
  labels = None
  if _EVAL_DIR.value:
    eval_files, eval_labels, names = labelled_files(_EVAL_DIR.value, classifier.class_names)
    classifier.class_names = names if classifier.class_names else None
    files = list(dict.fromkeys(files + eval_files))
    labels = dict(zip(eval_files, eval_labels))
  k = min(_TOP_K.value, classifier.num_classes)
  print(f'{classifier.model.__class__.__name__} from {classifier.source}: {len(files)} '
        f'image(s), {classifier.num_classes} classes.', file=sys.stderr)

  predicted, skipped = [], []
  for path, logits, error in predict_files(classifier, files, _BATCH.value, _PROGRESS.value):
    if error:
      skipped.append(f'{path} ({error})')
    else:
      predicted.append((path, logits))
  with (open(_OUTPUT.value, 'w', newline='') if _OUTPUT.value
        else contextlib.nullcontext(sys.stdout)) as stream:
    write_rows(rows(predicted, labels, classifier, k), stream, fmt, k, labels is not None)
  if _OUTPUT.value:
    print(f'Wrote {len(predicted)} prediction(s) to {_OUTPUT.value}.', file=sys.stderr)
  if skipped:
    print(f'Skipped {len(skipped)} unreadable image(s): ' + '; '.join(skipped), file=sys.stderr)
  if labels is not None:
    evaluated = [(labels[p], x) for p, x in predicted if p in labels]
    if not evaluated:
      raise ValueError(f'--eval_dir={_EVAL_DIR.value}: no image could be read.')
    names = classifier.class_names or tuple(str(i) for i in range(classifier.num_classes))
    text, confusion = accuracy_report([y for y, _ in evaluated],
                                      np.stack([x for _, x in evaluated]), names)
    save_confusion_matrix(confusion, names, _CONFUSION.value)
    print(f'{text}\nConfusion matrix: {_CONFUSION.value}', file=sys.stderr)
    if classifier.config is not None:  # a training workdir: also beside its curves
      from vit_jax import metrics  # pylint: disable=import-outside-toplevel
      step = inference.checkpoint_step(classifier.source)
      metrics.write_images(_CHECKPOINT.value, step,
                           {'predict/confusion_matrix': _CONFUSION.value})
      print(f'TensorBoard: predict/confusion_matrix at step {step} '
            f'({_CHECKPOINT.value}/tensorboard).', file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from vit_jax import data, platform  # pylint: disable=import-outside-toplevel
  platform.skip_absent_tpu()
  platform.use_every_cpu_core()
  platform.hide_notes_that_are_not_problems()
  try:
    run_prediction()
  except (ValueError, OSError, data.MissingDatasetError) as e:
    print(f'Error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(1)


def cli():
  """Console entry point (vit-jax-predict)."""
  flags.mark_flag_as_required('checkpoint')
  app.run(main)


if __name__ == '__main__':
  cli()

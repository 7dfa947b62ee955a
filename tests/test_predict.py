"""Inference after training: vit_jax.load / vit_jax.predict and `python -m vit_jax.predict`.

A tiny classifier is trained for a few steps on the built-in data; its evaluation
images are written out as PNG files, and predictions on those files must be what the
evaluation computed on the stored images.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import vit_jax
from tests.test_main import ROOT, demo_config, env8, run_in_process
from tests.test_outputs import tensorboard_events
from vit_jax import data, interop, param_tree
from vit_jax.data import datasets, pipeline, transforms

NUM_EVAL = 128


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """(workdir, config, final metrics) of a tiny classifier trained for 6 steps."""
  config = demo_config('vit_scratch', data_dir, total_steps=6)
  config.data.eval_split = f'test[:{NUM_EVAL}]'
  workdir = tmp_path_factory.mktemp('classifier')
  final = run_in_process(config, workdir)
  return str(workdir), config, final


@pytest.fixture(scope='module')
def eval_pngs(tmp_path_factory, trained):
  """ROOT/CLASS_NAME/NNN.png: the stored pixels of the evaluation split, and the labels."""
  _, config, _ = trained
  root = tmp_path_factory.mktemp('eval_pngs')
  split = datasets.open_split(config.data, config.data.eval_split)
  names = data.dataset_info(config.data).class_names
  files, labels = [], []
  for index in range(NUM_EVAL):
    example = split.source[index]
    label = int(example['label'])
    folder = root / names[label].replace('/', '_')
    folder.mkdir(exist_ok=True)
    path = folder / f'{index:03d}.png'
    Image.fromarray(example['image'][:, :, 0]).save(path)
    files.append(str(path))
    labels.append(label)
  return str(root), files, np.array(labels)


def evaluation_batch(config, model):
  """The evaluation pipeline's batch of the whole split, in order (one host batch)."""
  batch = pipeline.eval_batches(config.data, local_batch_size=NUM_EVAL,
                                image_size=model.image_size, channels=model.channels,
                                split=config.data.eval_split, process_index=0,
                                process_count=1)[0]
  return batch


def test_predictions_equal_what_the_evaluation_saw(trained, eval_pngs):
  workdir, config, final = trained
  _, files, labels = eval_pngs
  classifier = vit_jax.load(workdir)
  assert classifier.class_names[0] == 'T-shirt/top' and classifier.num_classes == 10
  assert classifier.source.startswith('orbax:') and classifier.source.endswith('/6/state')
  # The same pixels, from a PNG file and from the stored dataset, preprocessed alike.
  batch = evaluation_batch(config, classifier.model)
  preprocessed = np.stack([classifier.preprocess(path) for path in files])
  np.testing.assert_array_equal(preprocessed, batch['image'])
  np.testing.assert_array_equal(batch['label'], labels)

  logits = vit_jax.predict(classifier, files, batch_size=48)  # 3 batches, the last padded
  assert logits.shape == (NUM_EVAL, 10)
  reference = jax.jit(lambda v, x: classifier.model.apply(v, x, train=False))(
      classifier.variables, batch['image'])
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)
  # Top-1 against the run's own evaluation, where no two leading logits nearly tie.
  ordered = np.sort(logits, axis=1)
  assert (ordered[:, -1] - ordered[:, -2]).min() > 1e-5
  hits = int((logits.argmax(1) == labels).sum())
  assert hits == round(final['eval/top1'] * NUM_EVAL)


def test_predict_takes_arrays_and_pil_images(trained, eval_pngs):
  workdir, _, _ = trained
  _, files, _ = eval_pngs
  classifier = vit_jax.load(workdir)
  pixels = np.asarray(Image.open(files[0]))
  from_path = vit_jax.predict(classifier, files[0])
  for image in (pixels, pixels[:, :, None], Image.open(files[0]),
                Image.open(files[0]).convert('RGB')):
    np.testing.assert_array_equal(vit_jax.predict(classifier, [image]), from_path)
  with pytest.raises(ValueError, match='uint8'):
    vit_jax.predict(classifier, [pixels.astype(np.float32) / 255])


def run_predict(*flags, data_dir, cwd):
  return subprocess.run([sys.executable, '-m', 'vit_jax.predict', *flags], cwd=cwd,
                        env=env8(data_dir) | {'PYTHONPATH': ROOT}, capture_output=True,
                        text=True, timeout=300)


def transparent_copy(path, destination) -> np.ndarray:
  """The grey image as black ink of opacity 255 - grey (white pixels fully transparent);
  returns the RGBA pixels."""
  grey = np.asarray(Image.open(path))
  rgba = np.zeros((*grey.shape, 4), np.uint8)
  rgba[..., 3] = 255 - grey
  Image.fromarray(rgba, 'RGBA').save(destination)
  return rgba


def test_the_command_on_a_folder_with_a_corrupt_file_and_a_transparent_png(
    trained, eval_pngs, data_dir, tmp_path):
  workdir, _, _ = trained
  _, files, _ = eval_pngs
  folder = tmp_path / 'mixed'
  folder.mkdir()
  for path in files[:3]:
    Image.open(path).save(folder / os.path.basename(path))
  rgba = transparent_copy(files[3], folder / 'transparent.png')
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  result = run_predict(f'--checkpoint={workdir}', f'--images={folder}', '--top_k=3',
                       data_dir=data_dir, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  table = list(csv.DictReader(io.StringIO(result.stdout)))
  assert [os.path.basename(r['image']) for r in table] == [
      os.path.basename(p) for p in files[:3]] + ['transparent.png']
  skipped = [line for line in result.stderr.splitlines() if line.startswith('Skipped')]
  assert len(skipped) == 1 and 'Skipped 1 unreadable image(s)' in skipped[0]
  assert 'corrupt.png' in skipped[0]
  classifier = vit_jax.load(workdir)
  # The transparent PNG is seen composited onto the run's data.transparent_background,
  # as the evaluation would have seen it in a prepared image folder.
  background = classifier.preprocess.transform.transparent_background
  grey_alpha = np.stack([rgba[..., 0], rgba[..., 3]], axis=-1)  # black ink: luma 0
  flat = transforms.composite(grey_alpha, transforms.BACKGROUNDS[background])
  np.testing.assert_array_equal(classifier.preprocess(str(folder / 'transparent.png')),
                                classifier.preprocess(flat))
  if background == 'contrast':  # dark ink goes onto white: the original image, exactly
    np.testing.assert_array_equal(flat[..., 0], np.asarray(Image.open(files[3])))
  expected = vit_jax.predict(classifier, files[:3] + [flat])
  for row, logits in zip(table, expected):
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert row['class_1'] == classifier.class_names[int(np.argmax(logits))] or np.isclose(
        np.sort(probabilities)[-1], np.sort(probabilities)[-2], atol=2e-6)
    assert float(row['probability_1']) == pytest.approx(probabilities.max(), abs=2e-6)
  assert all(re.search(r'warning|error', line, re.I) is None for line in
             result.stderr.splitlines() if not line.startswith('Skipped'))


def test_eval_dir_accuracy_equals_the_evaluation(trained, eval_pngs, data_dir, tmp_path):
  workdir, _, final = trained
  root, _, labels = eval_pngs
  output = tmp_path / 'predictions.jsonl'
  result = run_predict(f'--checkpoint={workdir}', f'--eval_dir={root}', '--top_k=5',
                       f'--output={output}', '--confusion_matrix=confusion.png',
                       data_dir=data_dir, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(rows) == NUM_EVAL and all(len(r['top_k']) == 5 for r in rows)
  hits = round(final['eval/top1'] * NUM_EVAL)
  top5 = round(final['eval/top5'] * NUM_EVAL)
  summary = re.search(r'top-1 ([\d.]+)% \((\d+)\), top-5 ([\d.]+)% \((\d+)\)', result.stderr)
  assert summary, result.stderr
  assert (int(summary[2]), int(summary[4])) == (hits, top5)
  assert sum(r['label'] == r['top_k'][0]['class'] for r in rows) == hits
  per_class = re.findall(r'^  (\S.*?)\s+(\d+)\s+[\d.]+%$', result.stderr, re.M)
  assert sum(int(count) for _, count in per_class) == NUM_EVAL
  assert len(per_class) == len(set(labels.tolist()))
  with Image.open(tmp_path / 'confusion.png') as figure:
    assert figure.format == 'PNG' and figure.width >= 400
    size = figure.size
  # A training workdir also gets it beside its curves, at the checkpoint's step.
  [image] = tensorboard_events(workdir).Images('predict/confusion_matrix')
  assert image.step == 6 and (image.width, image.height) == size


def test_a_file_checkpoint_with_the_model_name(trained, eval_pngs, tmp_path):
  workdir, config, _ = trained
  _, files, _ = eval_pngs
  from_workdir = vit_jax.load(workdir)
  path = str(tmp_path / 'classifier.npz')
  interop.export_npz(from_workdir.variables['params'], path)
  from_file = vit_jax.load(path, model='ViT-mu/4', model_fields=dict(num_heads=2, image_size=28),
                           data_config=config.data)
  assert from_file.class_names is None and from_file.label(3) == '3'
  np.testing.assert_allclose(vit_jax.predict(from_file, files[:8]),
                             vit_jax.predict(from_workdir, files[:8]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='no config.json: give the model name'):
    vit_jax.load(path)


def test_what_does_not_fit_is_one_line(trained, data_dir, tmp_path):
  workdir, _, _ = trained
  path = str(tmp_path / 'classifier.npz')
  params = param_tree.flat_numpy(vit_jax.load(workdir).variables['params'])
  del params['Transformer/encoder_norm/scale']  # a file that lacks an array of the model
  np.savez(path, **params)
  result = run_predict(f'--checkpoint={path}', '--model=ViT-mu/4', f'--images={ROOT}/README.md',
                       data_dir=data_dir, cwd=tmp_path)
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(f'Error: {path}') and 'encoder_norm' in error[0]
  missing = run_predict(f'--checkpoint={workdir}', '--images=nothing/*.png', data_dir=data_dir,
                        cwd=tmp_path)
  assert missing.returncode == 1
  assert missing.stderr.strip() == "Error: --images: the glob 'nothing/*.png' matches no file."


def test_an_mae_workdir_has_no_classifier_and_its_probe_keeps_batchnorm(data_dir, tmp_path,
                                                                         eval_pngs):
  config = demo_config('mae_pretrain', data_dir)
  config.reconstructions = 0
  run_in_process(config, tmp_path / 'mae')
  with pytest.raises(ValueError, match='MAE pretraining run, which has no classifier'):
    vit_jax.load(str(tmp_path / 'mae'))
  # A linear probe of it: the head reads BatchNorm statistics, which must come along.
  probe = demo_config('linear_probe', data_dir, total_steps=3)
  probe.init.path = str(tmp_path / 'mae')
  probe.data.eval_split = f'test[:{NUM_EVAL}]'
  final = run_in_process(probe, tmp_path / 'probe')
  classifier = vit_jax.load(str(tmp_path / 'probe'))
  statistics = classifier.variables['batch_stats']
  assert np.abs(jax.tree.leaves(statistics)[0]).sum() > 0  # trained, not the initial zeros
  _, files, labels = eval_pngs
  logits = vit_jax.predict(classifier, files)
  ordered = np.sort(logits, axis=1)
  assert (ordered[:, -1] - ordered[:, -2]).min() > 1e-6
  assert int((logits.argmax(1) == labels).sum()) == round(final['eval/top1'] * NUM_EVAL)


def test_a_workdir_older_than_a_data_key_reads_as_it_ran(trained, tmp_path):
  workdir, _, _ = trained
  from vit_jax import train  # pylint: disable=import-outside-toplevel
  assert train.load_config_json(workdir).data.transparent_background == 'contrast'
  stored = json.loads(open(os.path.join(workdir, 'config.json')).read())
  del stored['data']['transparent_background']  # written before the key existed
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  older = train.load_config_json(str(tmp_path))
  assert older.data.transparent_background == 'white'  # what image_folder 1.1.0 did
  assert older.data.to_dict() | {'transparent_background': 'contrast'} == (
      train.load_config_json(workdir).data.to_dict())

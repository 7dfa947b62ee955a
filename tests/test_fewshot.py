"""Few-shot linear accuracy and k-NN accuracy on features whose answer is known."""

import numpy as np
import pytest

from vit_jax import fewshot


def clustered(num_classes, per_class, dims, spread, seed, noise_seed):
  """Features around one random centre per class (fixed by `seed`), and their labels."""
  centres = np.random.default_rng(seed).normal(size=(num_classes, dims)) * 10
  labels = np.repeat(np.arange(num_classes), per_class)
  noise = np.random.default_rng(noise_seed).normal(size=(len(labels), dims))
  return centres[labels] + spread * noise, labels


@pytest.mark.parametrize('shots', fewshot.SHOTS)
def test_separable_classes_give_every_test_image_right(shots):
  train, train_labels = clustered(10, 30, 64, spread=1.0, seed=0, noise_seed=1)
  test, test_labels = clustered(10, 50, 64, spread=1.0, seed=0, noise_seed=2)
  assert fewshot.fewshot_accuracy(train, train_labels, test, test_labels, shots=shots,
                                  num_classes=10) == 1.0


def test_labels_that_carry_no_information_give_chance():
  rng = np.random.default_rng(1)
  accuracies = []
  for seed in range(5):
    train, test = rng.normal(size=(500, 32)), rng.normal(size=(2000, 32))
    train_labels, test_labels = rng.integers(0, 10, 500), rng.integers(0, 10, 2000)
    accuracies.append(fewshot.fewshot_accuracy(train, train_labels, test, test_labels,
                                               shots=10, num_classes=10, seed=seed))
  # Chance is 0.1; the mean of 5 x 2000 guesses has a standard deviation of 0.003.
  assert abs(np.mean(accuracies) - 0.1) < 0.015


@pytest.mark.parametrize('n, d', [(20, 64), (200, 16)])  # the dual and the primal form
def test_the_closed_form_is_the_least_squares_solution(n, d):
  rng = np.random.default_rng(2)
  x, y, l2_reg = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 7.0
  # Ridge as plain least squares on rows [X; sqrt(l2_reg) I] and targets [Y; 0].
  stacked = np.concatenate([x, np.sqrt(l2_reg) * np.eye(d)])
  expected = np.linalg.lstsq(stacked, np.concatenate([y, np.zeros((d, 3))]), rcond=None)[0]
  np.testing.assert_allclose(fewshot.ridge_weights(x, y, l2_reg), expected, rtol=1e-8,
                             atol=1e-10)


def test_shots_are_that_many_per_class_and_fixed_by_the_seed():
  labels = np.random.default_rng(3).integers(0, 4, 100)
  chosen = fewshot.select_shots(labels, 5, 4, seed=0)
  assert np.bincount(labels[chosen], minlength=4).tolist() == [5, 5, 5, 5]
  np.testing.assert_array_equal(chosen, fewshot.select_shots(labels, 5, 4, seed=0))
  assert not np.array_equal(chosen, fewshot.select_shots(labels, 5, 4, seed=1))
  with pytest.raises(ValueError, match='class 2 has 1 examples, fewer than 5 shots'):
    fewshot.select_shots(np.array([0] * 5 + [1] * 5 + [2]), 5, 3)


def test_a_draw_of_more_shots_holds_the_draw_of_fewer():
  labels = np.random.default_rng(3).integers(0, 4, 200)
  for seed in range(3):
    chosen = {k: set(fewshot.select_shots(labels, k, 4, seed=seed)) for k in fewshot.SHOTS}
    assert chosen[1] <= chosen[5] <= chosen[10] <= chosen[25]


def test_the_accuracy_is_the_mean_over_draws():
  # Classes that overlap: one shot per class gets a different share right in each draw.
  train, train_labels = clustered(5, 40, 8, spread=8.0, seed=5, noise_seed=6)
  test, test_labels = clustered(5, 200, 8, spread=8.0, seed=5, noise_seed=7)
  def accuracy(seed, draws):
    return fewshot.fewshot_accuracy(train, train_labels, test, test_labels, shots=1,
                                    num_classes=5, seed=seed, draws=draws)
  single = [accuracy(seed, 1) for seed in (2, 3, 4)]
  assert max(single) - min(single) > 0.02  # the draws differ, so the mean is not one of them
  assert accuracy(2, 3) == pytest.approx(np.mean(single), abs=1e-12)
  assert fewshot.DRAWS == 3  # big_vision's num_seeds
  with pytest.raises(ValueError, match='draws=0'):
    accuracy(0, 0)


def test_each_run_seed_draws_its_own_shots():
  """A run's draws are seeded from its own seed (vit_jax.train.FeatureProbe): seeds 0-2 of
  a study draw 9 different sets of shots, seed 0 keeps fewshot.seed's, and runs of other
  seeds draw apart from seed 0's whatever their number of draws."""
  import types  # pylint: disable=import-outside-toplevel
  from vit_jax import config_utils, train  # pylint: disable=import-outside-toplevel
  def draw_seeds(run_seed, draws=3, probe_seed=0):
    config = config_utils.base_config()
    config.seed = run_seed
    config.fewshot.update(dict(seed=probe_seed, draws=draws))
    probe = train.FeatureProbe(config, None, None, None, types.SimpleNamespace(num_classes=10))
    assert probe.seed == probe_seed  # the config's, as scripts/eval_checkpoints.py records
    return set(range(probe.first_seed, probe.first_seed + probe.draws))
  by_run = [draw_seeds(run_seed) for run_seed in range(3)]
  assert by_run[0] == {0, 1, 2}
  assert len(set.union(*by_run)) == 9
  assert draw_seeds(0, probe_seed=5) == {5, 6, 7}
  assert not draw_seeds(1, draws=1) & by_run[0] and not draw_seeds(1, draws=5) & by_run[0]
  labels = np.random.default_rng(3).integers(0, 10, 1000)
  shots = [[tuple(fewshot.select_shots(labels, 5, 10, s)) for s in seeds] for seeds in by_run]
  assert len({draw for run in shots for draw in run}) == 9  # 9 different sets of images


def unit(angle_degrees):
  angle = np.radians(angle_degrees)
  return np.array([np.cos(angle), np.sin(angle)])


def test_knn_weighs_votes_by_similarity():
  # One training image of class 0 at 0 degrees, three of class 1 at 60 degrees (cosine
  # similarity 0.5 to a test image at 0 degrees, against 1.0).
  train = np.stack([unit(0), unit(60), unit(60), unit(60)]) * [[1], [2], [3], [4]]
  train_labels = np.array([0, 1, 1, 1])
  test, test_labels = unit(0)[None] * 5, np.array([0])
  # k = 1: the nearest, class 0.
  assert fewshot.knn_accuracy(train, train_labels, test, test_labels, num_classes=2, k=1) == 1.0
  # k = 4 at temperature 0.07: exp(1/0.07) outweighs 3 exp(0.5/0.07), so class 0.
  assert fewshot.knn_accuracy(train, train_labels, test, test_labels, num_classes=2, k=4) == 1.0
  # k = 4 with nearly equal weights (temperature 100): three votes beat one, class 1.
  assert fewshot.knn_accuracy(train, train_labels, test, test_labels, num_classes=2, k=4,
                              temperature=100.0) == 0.0


def test_knn_on_clusters_and_in_blocks():
  train, train_labels = clustered(5, 40, 16, spread=1.0, seed=4, noise_seed=5)
  test, test_labels = clustered(5, 30, 16, spread=1.0, seed=4, noise_seed=6)
  for block in (7, 1024):  # the blocks of test images change nothing
    assert fewshot.knn_accuracy(train, train_labels, test, test_labels, num_classes=5,
                                block=block) == 1.0


# ---------------------------------------------------------------------------------------
# In a run: config.fewshot at each evaluation.

@pytest.mark.parametrize('name', ['vit_scratch', 'mae_pretrain'])
def test_a_run_reports_the_probe_free_measures_of_its_features(name, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from tests.test_main import demo_config  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from vit_jax import checkpoint, data, metrics, models, objectives, sharding, train
  from vit_jax.data import datasets, transforms  # pylint: disable=import-outside-toplevel
  config = demo_config(name, str(tmp_path / 'tfds'), total_steps=3)
  config.eval_batch_size = 64
  config.data.eval_split = 'test[:100]'  # padded: 100 is not a multiple of 64
  config.fewshot.update(dict(shots=(1, 5), knn_k=5, train_split='train[:300]'))
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  final = [row for row in metrics.read_metrics(str(workdir)) if 'eval/knn_top1' in row][-1]
  names = {'eval/fewshot_1shot', 'eval/fewshot_5shot', 'eval/knn_top1'}
  assert names <= set(final)
  # The same numbers from the checkpoint's parameters on one device, without the sharded
  # pipeline: every example read and transformed here, padding never counted.
  _, params = checkpoint.load_params(str(workdir))
  objective = objectives.get_objective(config)
  info = data.dataset_info(config.data)
  model = models.from_config(config, **objective.model_overrides(info.num_classes))
  transform = transforms.ImageTransform.from_config(
      config.data, image_size=model.image_size, channels=model.channels, train=False)
  stored_channels = datasets.read_info(config.data).image_shape[-1]

  def features(split):
    source = datasets.open_split(config.data, split)
    examples = [source.source[i] for i in range(len(source.source))]
    images = transform.batch(np.stack([transform.example(e[source.image_key], stored_channels,
                                                         None) for e in examples]))
    labels = np.array([int(e[source.label_key]) for e in examples])
    with jax.default_device(jax.devices()[0]):
      return np.asarray(objective.features(model, {'params': params}, images)), labels

  train_set, test_set = features('train[:300]'), features('test[:100]')
  # What the run computed, gathered from 8 devices, padding dropped: the same examples in
  # the same order, the same features to float32 rounding.
  probe = train.FeatureProbe(config, model, objective, sharding.make_mesh(config.mesh), info)
  for split, (expected_features, expected_labels) in (('train[:300]', train_set),
                                                      ('test[:100]', test_set)):
    gathered, labels = probe._features(params, {}, split)  # pylint: disable=protected-access
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(gathered, expected_features, rtol=1e-4, atol=1e-5)
  # The accuracies are counts of argmaxes over nearly tied scores (a model of 3 steps):
  # another order of float32 sums may move a few images.
  for shots in (1, 5):
    expected = fewshot.fewshot_accuracy(*train_set, *test_set, shots=shots, num_classes=10)
    assert abs(final[f'eval/fewshot_{shots}shot'] - expected) <= 0.03 + 1e-9
  expected = fewshot.knn_accuracy(*train_set, *test_set, num_classes=10, k=5)
  assert abs(final['eval/knn_top1'] - expected) <= 0.03 + 1e-9
  assert all(0 <= final[n] <= 1 for n in names)
  if name != 'mae_pretrain':
    return
  # scripts/eval_checkpoints.py on the kept checkpoint: the run's own numbers.
  import json, os, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  output = tmp_path / 'checkpoints.json'
  result = subprocess.run(
      [sys.executable, f'{root}/scripts/eval_checkpoints.py', f'--workdir={workdir}',
       '--shots=1,5', '--knn_k=5', '--train_split=train[:300]', f'--output={output}'],
      capture_output=True, text=True, check=False, timeout=300,
      env={**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads(output.read_text())
  assert (written['fewshot_draws'], written['fewshot_seed'], written['fewshot_l2_reg']) == (
      3, 0, 2.0 ** 10)
  (row,) = written['rows']
  assert row['step'] == 3 and row['train_hours'] > 0
  assert {n: row[n] for n in names} == pytest.approx({n: final[n] for n in names}, abs=1e-9)

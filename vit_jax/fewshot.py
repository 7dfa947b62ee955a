"""Probe-free measures of frozen features: few-shot linear accuracy and k-NN accuracy.

Few-shot linear accuracy is the ViT paper's measure in its scaling figures (as in
big_vision's fewshot evaluator): take `shots` training images per class, standardise
their features (the training shots' mean and standard deviation, applied to the test
features too), and fit a ridge regression onto targets in {-1, +1} (one column per
class) in closed form; a test image's class is the column with the largest output. A
draw orders each class's training images at random and takes the first `shots`, so one
draw's 5 shots contain its 1 shot; the accuracy is the mean over `draws` draws (big_vision
reports 3), which shrinks the spread that one draw of a few images brings.

k-NN accuracy is the usual monitor of self-supervised training (InstDisc, DINO): each
test image votes among its k most cosine-similar training images, each vote weighted by
exp(similarity / temperature).

Both take NumPy arrays of features and integer labels; they are cheap next to the
feature extraction (a few hundred training shots; a k-NN over n_train x n_test
similarities, computed in blocks).
"""

import numpy as np

SHOTS = (1, 5, 10, 25)  # big_vision's few-shot counts
L2_REG = 2.0 ** 10  # big_vision's default ridge strength on standardised features
DRAWS = 3  # draws of shots averaged, as big_vision's num_seeds


SEEDS_PER_RUN = 1000  # a run of seed s draws from seeds fewshot.seed + 1000 s on


def first_draw_seed(probe_seed: int, run_seed: int) -> int:
  """The seed of a run's first draw of shots: its draws are seeds first, first + 1, ...,
  so runs of different seeds draw different shots (their spread holds the draws' own)
  whatever their number of draws (up to SEEDS_PER_RUN), and runs of one seed draw the
  same (two arms at a seed are compared on the same images). Run seed 0 draws from
  `probe_seed` on."""
  return probe_seed + SEEDS_PER_RUN * run_seed


def select_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` examples of each class: the first `shots` of each class's examples
  in an order fixed by `seed`, so a seed's draws are nested (more shots add examples).

  Raises ValueError when a class has fewer examples than `shots`."""
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(num_classes):
    members = rng.permutation(np.flatnonzero(labels == label))
    if len(members) < shots:
      raise ValueError(f'class {label} has {len(members)} examples, fewer than {shots} shots.')
    chosen.append(members[:shots])
  return np.sort(np.concatenate(chosen))


def ridge_weights(features: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_w |features @ w - targets|^2 + l2_reg |w|^2, in closed form (float64).

  With fewer examples than feature dimensions (the few-shot case) the dual form
  w = X^T (X X^T + l2_reg I)^-1 Y solves an n x n system instead of a d x d one; both
  are the same solution."""
  x = np.asarray(features, np.float64)
  y = np.asarray(targets, np.float64)
  n, d = x.shape
  if n < d:
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)


def fewshot_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                     test_features: np.ndarray, test_labels: np.ndarray, *, shots: int,
                     num_classes: int, l2_reg: float = L2_REG, seed: int = 0,
                     draws: int = DRAWS) -> float:
  """Accuracy on the test features of a ridge classifier fit on `shots` training
  examples per class, the mean over draws seeded seed, seed + 1, ... (see the module's
  docstring)."""
  if draws < 1:
    raise ValueError(f'draws={draws}: at least one draw of shots is needed.')
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  test_features = np.asarray(test_features, np.float64)
  accuracies = []
  for draw in range(draws):
    chosen = select_shots(train_labels, shots, num_classes, seed + draw)
    x = np.asarray(train_features)[chosen].astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    targets = 2.0 * np.eye(num_classes)[train_labels[chosen]] - 1.0
    weights = ridge_weights((x - mean) / std, targets, l2_reg)
    outputs = ((test_features - mean) / std) @ weights
    accuracies.append(np.mean(outputs.argmax(axis=1) == test_labels))
  return float(np.mean(accuracies))


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                 k: int = 20, temperature: float = 0.07, block: int = 1024) -> float:
  """Weighted k-NN accuracy with cosine similarity (see the module's docstring)."""
  def normalised(f):
    f = np.asarray(f, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

  train, test = normalised(train_features), normalised(test_features)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  k = min(k, len(train))
  # At most ~256 MiB of similarities at once (ImageNet's 1.28 M training images: 52 rows).
  block = max(1, min(block, (256 << 20) // (4 * len(train))))
  correct = 0
  for start in range(0, len(test), block):
    similarity = test[start:start + block] @ train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    votes = np.zeros((len(nearest), num_classes))
    np.add.at(votes, (np.arange(len(nearest))[:, None], train_labels[nearest]), weights)
    correct += int(np.sum(votes.argmax(axis=1) == test_labels[start:start + block]))
  return correct / len(test)

"""Host-side transforms, RandAugment, and on-device mixup/cutmix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import sharding
from vit_jax.data import mixup, randaugment, transforms


# ---------------------------------------------------------------------------------------
# Crops, resizes, normalisation.

def test_random_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  width, height, scale, ratio = 300, 200, (0.2, 1.0), (3 / 4, 4 / 3)
  areas, aspects = [], []
  for _ in range(2000):
    left, top, right, bottom = transforms.random_resized_crop_box(rng, width, height, scale, ratio)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    areas.append((right - left) * (bottom - top) / (width * height))
    aspects.append((right - left) / (bottom - top))
  # Rounding to whole pixels moves the edges by at most half a pixel.
  assert 0.19 <= min(areas) and max(areas) <= 1.0
  assert 0.74 <= min(aspects) and max(aspects) <= 1.35
  # The whole range is used (a 3:2 image holds crops of ratio <= 4/3 up to 0.89 area).
  assert min(areas) < 0.22 and max(areas) > 0.85
  assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_random_resized_crop_falls_back_to_a_central_crop_in_range():
  # A 10:1 strip admits no crop with ratio <= 4/3 at scale >= 0.9.
  box = transforms.random_resized_crop_box(np.random.default_rng(0), 1000, 100, (0.9, 1.0),
                                           (3 / 4, 4 / 3))
  assert box == (433, 0, 566, 100)


def test_center_crop_box_is_resize_then_central_square():
  assert transforms.center_crop_box(40, 20, 0.875) == (11.25, 1.25, 28.75, 18.75)
  assert transforms.center_crop_box(28, 28, 1.0) == (0, 0, 28, 28)


def test_eval_transform_with_fraction_one_is_a_plain_resize():
  pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
  transform = transforms.ImageTransform(image_size=28, channels=1, train=False,
                                        eval_crop_fraction=1.0)
  np.testing.assert_array_equal(transform.example(pixels, 1, None), pixels)
  bigger = transforms.ImageTransform(image_size=56, channels=1, train=False,
                                     eval_crop_fraction=1.0).example(pixels, 1, None)
  expected = np.asarray(Image.fromarray(pixels[..., 0]).resize((56, 56), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(bigger[..., 0], expected)


def test_batch_normalisation_and_channel_repetition():
  transform = transforms.ImageTransform(image_size=2, channels=3, train=False,
                                        mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
  images = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)
  out = transform.batch(images)
  assert out.shape == (1, 1, 2, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-1.0, -1.0, 0.0])
  np.testing.assert_allclose(out[0, 0, 1], [1.0, 3.0, 1.0])


def erased_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int] | None:
  """(top, left, height, width) of the pixels that changed, which must form one rectangle."""
  changed = np.any(before != after, axis=-1)
  if not changed.any():
    return None
  rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
  top, left = rows[0], cols[0]
  height, width = rows[-1] - top + 1, cols[-1] - left + 1
  assert changed[top:top + height, left:left + width].all()  # all of it, nothing outside
  assert changed.sum() == height * width
  return top, left, height, width


def test_random_erasing_replaces_one_rectangle_with_normal_noise():
  rng = np.random.default_rng(0)
  before = np.full((64, 48, 3), 5.0, np.float32)  # far from the noise: every pixel changes
  areas, aspects, noise, erased = [], [], [], 0
  for _ in range(3000):
    image = before.copy()
    transforms.random_erase(image, rng, 0.25)
    box = erased_box(before, image)
    if box is None:
      continue
    erased += 1
    top, left, height, width = box
    areas.append(height * width / (64 * 48))
    aspects.append(height / width)
    noise.append(image[top:top + height, left:left + width].ravel())
  # A quarter of the images (binomial sd 0.008), one rectangle each.
  assert abs(erased / 3000 - 0.25) < 0.03
  # Area within (0.02, 1/3) of the image, ratio within (0.3, 3.3), up to rounding to pixels.
  assert 0.015 < min(areas) < 0.03 and 0.28 < max(areas) < 0.36
  assert 0.25 < min(aspects) < 0.4 and 2.6 < max(aspects) < 3.9
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01  # standard normal
  # Probability 1 always erases, 0 never; a seed gives the same rectangle.
  for probability, expected in ((1.0, True), (0.0, False)):
    image = before.copy()
    transforms.random_erase(image, np.random.default_rng(1), probability)
    assert (erased_box(before, image) is not None) == expected
  twice = [before.copy(), before.copy()]
  for image in twice:
    transforms.random_erase(image, np.random.default_rng(7), 1.0)
  np.testing.assert_array_equal(twice[0], twice[1])


def test_random_erasing_applies_to_training_batches_only():
  kwargs = dict(image_size=16, channels=3, random_erasing=1.0, flip=False)
  image = np.full((16, 16, 3), 3.0, np.float32)
  train = transforms.ImageTransform(train=True, **kwargs)
  erased = image.copy()
  train.erase(erased, np.random.default_rng(0))
  assert erased_box(image, erased) is not None
  evaluation = transforms.ImageTransform(train=False, **kwargs)
  kept = image.copy()
  evaluation.erase(kept, None)
  np.testing.assert_array_equal(kept, image)


def test_train_transform_flips_and_is_deterministic_given_rng():
  pixels = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 1))
  transform = transforms.ImageTransform(image_size=16, channels=1, train=True,
                                        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
  outputs = [transform.example(pixels, 1, np.random.default_rng(s)) for s in range(20)]
  flipped = [np.array_equal(o, pixels[:, ::-1]) for o in outputs]
  kept = [np.array_equal(o, pixels) for o in outputs]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
  np.testing.assert_array_equal(outputs[3], transform.example(pixels, 1, np.random.default_rng(3)))


@pytest.mark.parametrize('field, value', [
    ('channels', 2), ('interpolation', 'nearest'), ('mean', (0.1, 0.2)),
    ('eval_crop_fraction', 0.0), ('crop_scale', (0.5, 0.2)), ('random_erasing', 1.5)])
def test_transform_refuses_bad_settings(field, value):
  kwargs = dict(image_size=8, channels=3, train=True)
  kwargs[field] = value
  with pytest.raises(ValueError, match=field):
    transforms.ImageTransform(**kwargs)


# ---------------------------------------------------------------------------------------
# RandAugment.

def photo(mode):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize('mode', ['L', 'RGB'])
@pytest.mark.parametrize('name', [name for name, _ in randaugment.OPERATIONS])
def test_every_operation_keeps_size_and_mode(name, mode):
  out = randaugment.apply_operation(name, photo(mode), 9, np.random.default_rng(0))
  assert out.size == (32, 24) and out.mode == mode


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
                                  'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
                                  'Brightness', 'Sharpness'])
def test_magnitude_zero_is_the_identity(name):
  image = photo('RGB')
  out = randaugment.apply_operation(name, image, 0, np.random.default_rng(0))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_magnitude_scales_the_change():
  image = photo('RGB')
  change = lambda m: np.abs(np.asarray(randaugment.apply_operation(
      'Brightness', image, m, np.random.default_rng(0)), np.float32) - np.asarray(image)).mean()
  assert 0 < change(3) < change(9)


def test_rand_augment_is_deterministic_and_changes_images():
  image = photo('RGB')
  run = lambda seed: np.asarray(randaugment.rand_augment(
      image, np.random.default_rng(seed), num_layers=2, magnitude=9))
  np.testing.assert_array_equal(run(5), run(5))
  changed = sum(not np.array_equal(run(s), np.asarray(image)) for s in range(20))
  assert changed >= 12  # Each of 2 layers applies with probability 0.5: 75% expected.


# ---------------------------------------------------------------------------------------
# Mixup and CutMix.

BATCH, SIZE, CLASSES = 8, 16, 10


def example_batch():
  """Image i is the constant i + 1, so every pixel tells which example it came from."""
  images = jnp.broadcast_to(jnp.arange(1, BATCH + 1, dtype=jnp.float32)[:, None, None, None],
                            (BATCH, SIZE, SIZE, 3))
  labels = jnp.arange(BATCH) % CLASSES
  return images, jax.nn.one_hot(labels, CLASSES)


@functools.lru_cache
def jitted_mix(**kwargs):
  return jax.jit(functools.partial(mixup.mix, **kwargs))


def sharded_mix(seed=0, **kwargs):
  """mix() under jit on a batch split over all devices, as in the train step."""
  batch = jax.device_put(example_batch(), sharding.batch_sharding(sharding.make_mesh()))
  return jitted_mix(**kwargs)(jax.random.key(seed), *batch)


def test_mixup_mixes_with_the_mirrored_batch():
  images, targets = sharded_mix(mixup_alpha=0.8, cutmix_alpha=0.0)
  x, _ = example_batch()
  lam = float(targets[0, 0])  # Example 0 (label 0) mixes with example 7 (label 7).
  assert 0 < lam < 1 and float(targets[0, 7]) == pytest.approx(1 - lam, abs=1e-6)
  np.testing.assert_allclose(images, lam * x + (1 - lam) * x[::-1], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_box_area_matches_lambda():
  for seed in range(5):
    images, targets = sharded_mix(seed, mixup_alpha=0.0, cutmix_alpha=1.0)
    pasted = np.asarray(images[0, :, :, 0]) == BATCH  # Pixels of example 7 in example 0.
    lam = float(targets[0, 0])
    assert 1 - pasted.mean() == pytest.approx(lam, abs=1e-6)
    rows, cols = np.nonzero(pasted)
    if rows.size:  # One rectangle: its bounding box is full.
      assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert set(np.unique(images[0])) <= {1.0, float(BATCH)}  # Pasted, not blended.
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_mix_switches_between_modes_and_respects_prob():
  _, y = example_batch()
  blended = cut = untouched = 0
  for seed in range(40):
    images, targets = sharded_mix(seed, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                                  prob=0.5)
    values = set(np.unique(np.asarray(images[0])).tolist())
    if values == {1.0}:
      untouched += 1
      np.testing.assert_array_equal(targets, y)
    elif values <= {1.0, float(BATCH)}:
      cut += 1
    else:
      blended += 1
  assert untouched >= 8 and cut >= 4 and blended >= 4


def test_mix_off_returns_inputs():
  x, y = example_batch()
  images, targets = mixup.mix(jax.random.key(0), x, y, mixup_alpha=0.0, cutmix_alpha=0.0)
  assert images is x and targets is y

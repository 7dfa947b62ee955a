"""Mixup (Zhang et al. 2017) and CutMix (Yun et al. 2019) on device, inside the jitted step.

timm's batch mode: one lambda per batch; each example is mixed with the example at the
mirrored position of the batch (batch[::-1]); CutMix pastes one box whose area corrects
lambda; targets are mixed with the same lambda. Shapes are static and every branch is a
`jnp.where`, so it jits once and runs on a batch sharded over any mesh.
"""

import jax
import jax.numpy as jnp


def _cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
  """timm's rand_bbox: a box of (1 - lam) of the area (before clipping) centred at a
  uniform pixel, clipped to the image. Returns (mask (H, W) bool, corrected lambda)."""
  rng_y, rng_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  y_low, y_high = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x_low, x_high = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  mask = (ys >= y_low) & (ys < y_high) & (xs >= x_low) & (xs < x_high)
  area = (y_high - y_low) * (x_high - x_low)
  return mask, 1.0 - area / (height * width)


def mix(rng: jax.Array, images: jax.Array, labels_onehot: jax.Array, *,
        mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
        prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its mirror image.

  Args:
    rng: PRNG key, one per step.
    images: (B, H, W, C).
    labels_onehot: (B, num_classes) targets, already smoothed if wanted.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) of lambda; 0 turns that mode off.
    switch_prob: probability of CutMix instead of Mixup when both are on.
    prob: probability of mixing this batch at all.
  Returns:
    (images (B, H, W, C) of the input dtype, targets (B, num_classes) float32).
  """
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, labels_onehot
  rng_apply, rng_switch, rng_lam, rng_box = jax.random.split(rng, 4)
  apply = jax.random.uniform(rng_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = max(mixup_alpha, cutmix_alpha)
  # One Beta draw whatever the mode: each one adds seconds to the step's compile time.
  lam_drawn = jax.random.beta(rng_lam, alpha, alpha)
  box, lam_box = _cutmix_box(rng_box, lam_drawn, images.shape[1], images.shape[2])

  do_mixup = apply & ~use_cutmix
  do_cutmix = apply & use_cutmix
  lam = jnp.where(do_mixup, lam_drawn, jnp.where(do_cutmix, lam_box, 1.0)).astype(jnp.float32)

  flipped = images[::-1]
  lam_pixels = jnp.where(do_mixup, lam_drawn, 1.0).astype(images.dtype)
  mixed = images * lam_pixels + flipped * (1 - lam_pixels)
  mixed = jnp.where((box & do_cutmix)[None, :, :, None], flipped, mixed)
  targets = lam * labels_onehot + (1.0 - lam) * labels_onehot[::-1]
  return mixed, targets

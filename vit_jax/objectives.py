"""Loss and metrics per objective: MAE pretraining, classification, linear probing.

Each objective says how it changes the model and optimizer of the config, computes the
training loss of one batch, and sums the evaluation metrics of one batch (weighted by
the batch's `mask`, which is 0 on the padding of the last evaluation batch).
The training loop knows nothing else of them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax.data import mixup
from vit_jax.models import layers, mae

OBJECTIVES = ('mae', 'classification', 'linear_probe')


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base: a classifier trained with softmax cross-entropy."""
  config: Any  # the whole ml_collections config

  def model_overrides(self, num_classes: int) -> dict:
    return {'num_classes': num_classes}

  @property
  def trainable(self) -> str:
    """Regex of the parameters the optimizer trains."""
    return self.config.optim.trainable

  def train_loss(self, model, variables, batch, rng):
    """Returns (loss, (metrics dict, updated mutable collections))."""
    mix_rng, dropout_rng = jax.random.split(rng)
    num_classes = model.num_classes
    targets = mixup.one_hot_smoothed(batch['label'], num_classes, self.config.label_smoothing)
    images = batch['image']
    m = self.config.mixup
    if m.prob > 0 and (m.mixup_alpha > 0 or m.cutmix_alpha > 0):
      images, targets = mixup.mix(mix_rng, images, targets, mixup_alpha=m.mixup_alpha,
                                  cutmix_alpha=m.cutmix_alpha, switch_prob=m.switch_prob,
                                  prob=m.prob)
    mutable = [k for k in variables if k != 'params']
    logits, updates = model.apply(variables, images, train=True, rngs={'dropout': dropout_rng},
                                  mutable=mutable)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, ({'loss': loss}, updates)

  def eval_sums(self, model, variables, batch, rng):
    """Sums over the real examples of the batch: loss, top1, top5 and count."""
    del rng
    logits = model.apply(variables, batch['image'], train=False)
    labels = batch['label']
    weight = batch['mask']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top = jnp.argsort(-logits, axis=-1)[:, :5]
    hits = top == labels[:, None]
    return {'loss': jnp.sum(loss * weight),
            'top1': jnp.sum(hits[:, 0] * weight),
            'top5': jnp.sum(jnp.any(hits, axis=1) * weight),
            'count': jnp.sum(weight)}


class Classification(Objective):
  """Supervised training from scratch or fine-tuning from a checkpoint."""


class LinearProbe(Objective):
  """MAE's linear probe: frozen encoder, BatchNorm without affine parameters, linear head.

  Only `head` trains; gradients stop below it, so the encoder's backward pass is skipped.
  """

  def model_overrides(self, num_classes: int) -> dict:
    return {'num_classes': num_classes, 'head_batchnorm': True, 'frozen_encoder': True}

  @property
  def trainable(self) -> str:
    # The encoder never trains in a linear probe, whatever optim.trainable says.
    trainable = self.config.optim.trainable
    return 'head/.*' if trainable == '.*' else trainable


class MaskedAutoencoder(Objective):
  """MAE pretraining: the model computes its own loss over the removed patches."""

  def model_overrides(self, num_classes: int) -> dict:
    del num_classes
    return {}

  def train_loss(self, model, variables, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    loss, _, _ = model.apply(variables, batch['image'], train=True,
                             rngs={'masking': masking_rng, 'dropout': dropout_rng})
    return loss, ({'loss': loss}, {})

  def eval_sums(self, model, variables, batch, rng):
    """Sum of per-example losses (every example has the same number of removed patches)."""
    _, pred, mask = model.apply(variables, batch['image'], train=False, rngs={'masking': rng})
    target = layers.patchify(batch['image'], model.patch_size)
    per_example = jax.vmap(lambda p, t, m: mae.masked_patch_loss(p, t, m, model.norm_pix_loss))(
        pred, target, mask)
    return {'loss': jnp.sum(per_example * batch['mask']), 'count': jnp.sum(batch['mask'])}


def get_objective(config) -> Objective:
  classes = {'mae': MaskedAutoencoder, 'classification': Classification,
             'linear_probe': LinearProbe}
  if config.objective not in classes:
    raise ValueError(f'Unknown objective {config.objective!r}; known: {OBJECTIVES}.')
  return classes[config.objective](config)


def summarize_eval(sums: dict) -> dict:
  """Summed metrics -> means: loss, top1, top5 (those present)."""
  count = float(sums['count'])
  return {k: float(v) / count for k, v in sums.items() if k != 'count'} | {'count': count}

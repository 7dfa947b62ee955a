"""Loss and metrics per objective: MAE pretraining, classification, linear probing.

Each objective declares the config keys it reads beyond config_utils.base_config (with
their defaults, `CONFIG_KEYS`), says how it changes the model and optimizer of the
config, computes the training loss of one batch, sums the evaluation metrics of one
batch (weighted by the batch's `mask`, which is 0 on the padding of the last evaluation
batch), and writes its end-of-run artefacts (`finish`). The training loop knows nothing
else of them.
"""

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from vit_jax import data
from vit_jax.data import mixup
from vit_jax.models import layers, mae

OBJECTIVES = ('mae', 'classification', 'linear_probe')


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base: a classifier trained with softmax cross-entropy."""
  config: Any  # the whole ml_collections config
  # The keys this objective reads beyond base_config, with their defaults.
  CONFIG_KEYS: ClassVar[dict] = {
      'label_smoothing': 0.1,
      # On-device mixup/cutmix (timm's batch mode, see vit_jax/data/mixup.py).
      'mixup': dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5),
  }

  def option(self, key: str):
    """config[key], or the declared default where the config does not have the key."""
    default = self.CONFIG_KEYS[key]
    if key in self.config:
      return self.config[key]
    return ml_collections.ConfigDict(default) if isinstance(default, dict) else default

  def check(self) -> None:
    """Raises a ValueError naming a key of CONFIG_KEYS whose value makes no sense."""
    smoothing = self.option('label_smoothing')
    if not 0.0 <= smoothing < 1.0:
      raise ValueError(f'label_smoothing={smoothing} must be in [0, 1).')
    m = self.option('mixup')
    for key, low, high in (('mixup_alpha', 0.0, None), ('cutmix_alpha', 0.0, None),
                           ('prob', 0.0, 1.0), ('switch_prob', 0.0, 1.0)):
      if m[key] < low or (high is not None and m[key] > high):
        bounds = f'in [{low:g}, {high:g}]' if high is not None else f'at least {low:g}'
        raise ValueError(f'mixup.{key}={m[key]} must be {bounds}.')

  def model_overrides(self, num_classes: int) -> dict:
    return {'num_classes': num_classes}

  @property
  def trainable(self) -> str:
    """Regex of the parameters the optimizer trains."""
    return self.config.optim.trainable

  def train_loss(self, model, variables, batch, rng):
    """Returns (loss, (metrics dict, updated mutable collections))."""
    mix_rng, dropout_rng = jax.random.split(rng)
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch['label'], model.num_classes, dtype=jnp.float32),
        self.option('label_smoothing'))
    images = batch['image']
    m = self.option('mixup')
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

  def features(self, model, variables, images):
    """(batch, D) float32 frozen features of `images`: the classifier's input (pooled,
    after fc_norm and pre_logits where the model has them)."""
    return model.clone(num_classes=0).apply({'params': variables['params']}, images,
                                            train=False)

  def finish(self, model, mesh, state, workdir: str, writer) -> str | None:
    """End-of-run artefacts (collective: called on every process), images also through
    `writer` (metrics.MetricWriter) to TensorBoard; returns a line for the log."""
    del model, mesh, state, workdir, writer
    return None


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
  CONFIG_KEYS: ClassVar[dict] = {
      'reconstructions': 8,  # images in workdir/reconstructions.png at the end; 0: none
  }

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

  def features(self, model, variables, images):
    """The encoder's class token over all patches (mask ratio 0), as MAE's linear probe."""
    noise = jnp.zeros((images.shape[0], int(np.prod(model.grid))), jnp.float32)
    return model.clone(mask_ratio=0.0).apply({'params': variables['params']}, images,
                                             noise=noise, features_only=True)

  def check(self) -> None:
    if self.option('reconstructions') < 0:
      raise ValueError(f'reconstructions={self.option("reconstructions")} must be 0 (none) or '
                       f'positive.')

  def finish(self, model, mesh, state, workdir: str, writer) -> str | None:
    """The four-panel figure of the first evaluation images (reconstructions.png, and
    'mae/reconstructions' in TensorBoard)."""
    num_images = self.option('reconstructions')
    if not num_images:
      return None
    from vit_jax import visualize  # pylint: disable=import-outside-toplevel
    config = self.config
    batch = next(iter(data.eval_iterator(
        config.data, global_batch_size=config.eval_batch_size, mesh=mesh,
        image_size=model.image_size, channels=model.channels)))
    # Gathered: with FSDP across hosts no process holds every shard.
    images, params = multihost_utils.process_allgather((batch['image'], state['params']),
                                                       tiled=True)
    path = os.path.join(workdir, 'reconstructions.png')
    if jax.process_index() == 0:
      visualize.save_reconstructions(model, params, images[:num_images], path,
                                     mean=config.data.mean, std=config.data.std,
                                     seed=config.seed)
      writer.write_image(int(state['step'].addressable_data(0)), 'mae/reconstructions', path)
    return f'Reconstructions: {path}'


CLASSES = {'mae': MaskedAutoencoder, 'classification': Classification,
           'linear_probe': LinearProbe}


def objective_class(name: str) -> type[Objective]:
  if name not in CLASSES:
    raise ValueError(f'Unknown objective {name!r}; known: {OBJECTIVES}.')
  return CLASSES[name]


def get_objective(config) -> Objective:
  """The objective of `config`, its keys checked."""
  objective = objective_class(config.objective)(config)
  objective.check()
  return objective


def summarize_eval(sums: dict) -> dict:
  """Summed metrics -> means: loss, top1, top5 (those present)."""
  count = float(sums['count'])
  return {k: float(v) / count for k, v in sums.items() if k != 'count'} | {'count': count}

"""vit_jax: Vision Transformers and Masked Autoencoders in JAX/Flax.

From Python, a trained classifier in two lines (see vit_jax/inference.py):

  classifier = vit_jax.load('runs/finetune_demo')
  logits = vit_jax.predict(classifier, ['shoe.png', 'bag.jpg'])

Training, sweeps and the pre-flight are command lines: `python -m vit_jax.main`,
`python -m vit_jax.sweep`, `python -m vit_jax.preflight`, `python -m vit_jax.predict`.
"""

__version__ = '0.1.0'


# Imported on first use: `import vit_jax` stays light, and the command lines set JAX's
# options (devices, platforms) before JAX is imported.
def load(path: str, **kwargs):
  """vit_jax.inference.load: a classifier from a workdir, Orbax folder or file."""
  from vit_jax import inference, platform  # pylint: disable=import-outside-toplevel
  platform.skip_absent_tpu()
  return inference.load(path, **kwargs)


def predict(classifier, images, **kwargs):
  """vit_jax.inference.predict: logits (N, num_classes) of images (paths, PIL, uint8)."""
  from vit_jax import inference  # pylint: disable=import-outside-toplevel
  return inference.predict(classifier, images, **kwargs)

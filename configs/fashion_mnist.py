r"""The papers' recipes at small scale on the full Fashion-MNIST (60,000 + 10,000 images).

The studies of configs/sweeps/ start from these: the demo recipes of mae_pretrain.py,
mae_finetune.py and linear_probe.py (a 0.8 M-parameter ViT, patch 4 on the 28x28
images: 49 patches) on the whole training set, evaluated on the 10,000 test images, with
every key that a study sweeps written out. Prepare the data once:

  apt-get install dataset-fashion-mnist
  python scripts/prepare_dataset.py --dataset=fashion_mnist

then, for example (ARG: mae | finetune | probe | scratch, and epochs=N):

  python -m vit_jax.main --config=configs/fashion_mnist.py:mae,epochs=3 --workdir=runs/fm_mae
  python -m vit_jax.main --config=configs/fashion_mnist.py:finetune,epochs=2 \
      --workdir=runs/fm_ft --config.init.path=runs/fm_mae

`scratch` is `finetune` without layer-wise decay (which would hold back the lower blocks
of a random start), for training the same classifier from scratch.

`holdout=1` keeps the test set out for choosing a recipe: it trains on the first 54,000
training images and evaluates on the other 6,000 (TFDS's stored order is shuffled at
preparation, so they are a random tenth); the test set is then scored once, with the
chosen recipe, without it.
"""

import os

from vit_jax import config_utils

# variant: (config file of the recipe, default epochs)
VARIANTS = {'mae': ('mae_pretrain.py', 3.0), 'finetune': ('mae_finetune.py', 2.0),
            'probe': ('linear_probe.py', 2.0), 'scratch': ('mae_finetune.py', 2.0)}
TRAIN_EXAMPLES = 60_000
HOLDOUT = 6_000  # training images held out for choosing recipes (holdout=1)


def _recipe(filename: str):
  """The demo variant of a sibling config file."""
  return config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), filename), 'demo')


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variants=tuple(VARIANTS), variant='mae', epochs=0.0,
                               holdout=False)
  filename, epochs = VARIANTS[arg.variant]
  config = _recipe(filename)
  config.data.name = 'fashion_mnist'
  config.eval_batch_size = 1000  # 10 batches for the 10,000 test images; 8 devices divide it
  config.num_epochs = arg.epochs or epochs
  # Warm up over about 200 steps of 256 (the demos warm up over 1-2 of their 31-step
  # epochs); the studies' runs are a few epochs long.
  config.optim.warmup_epochs = 0.8
  config.checkpoint_every_steps = 200
  config.log_every_steps = 50
  train_examples = TRAIN_EXAMPLES
  if arg.holdout:
    train_examples -= HOLDOUT
    config.data.train_split = f'train[:{train_examples}]'
    config.data.eval_split = f'train[{train_examples}:]'
  if arg.variant == 'mae':
    return config
  config.eval_every_steps = train_examples // config.global_batch_size  # about every epoch
  if arg.variant == 'scratch':
    config.optim.layer_decay = 1.0
  return config

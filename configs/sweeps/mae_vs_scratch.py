r"""MAE pretraining against training from scratch, each trained until it stops improving,
three seeds (MAE paper section 4, Table 3), and the headline: the MAE-pretrained,
fine-tuned ViT on the 10,000 Fashion-MNIST test images.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_vs_scratch.py --workdir=runs/mae_vs_scratch

pretrain: MAE-mu/4 (0.8 M parameters, patch 4) on the 60,000 training images, no labels,
  100 epochs (10 of warm-up), keeping a checkpoint every 2,000 steps for the accuracy-
  against-hours curve (scripts/eval_checkpoints.py). One run: ~1.7 h.
finetune: the classifier from it, FT epochs, seeds 0-2; finetune_2x: twice that, seed 0.
scratch: the same classifier from a random start, SCRATCH epochs, seeds 0-2; scratch_2x:
  twice that, seed 0.
The recipes are configs/fashion_mnist.py's (chosen on held-out training images by
configs/sweeps/fashion_finetune_tune.py); the 2x runs show whether the budget has
flattened.
"""

from vit_jax import sweep

FT_EPOCHS = 10
SCRATCH_EPOCHS = 20
SEEDS = {'seed': [0, 1, 2]}


def get_sweep():
  pretrain = sweep.Stage('pretrain', 'configs/fashion_mnist.py:mae,epochs=100',
                         overrides={'optim.warmup_epochs': 10.0,
                                    'keep_checkpoint_every_steps': 2000})
  stages = [
      pretrain,
      sweep.Stage('finetune', f'configs/fashion_mnist.py:finetune,epochs={FT_EPOCHS}',
                  init_from='pretrain', grid=sweep.product(SEEDS)),
      sweep.Stage('finetune_2x', f'configs/fashion_mnist.py:finetune,epochs={2 * FT_EPOCHS}',
                  init_from='pretrain', grid=[{'seed': 0}]),
      sweep.Stage('scratch', f'configs/fashion_mnist.py:scratch,epochs={SCRATCH_EPOCHS}',
                  grid=sweep.product(SEEDS)),
      sweep.Stage('scratch_2x', f'configs/fashion_mnist.py:scratch,epochs={2 * SCRATCH_EPOCHS}',
                  grid=[{'seed': 0}]),
  ]
  half_point = 0.005
  claims = [
      sweep.Claim('MAE pretraining then fine-tuning beats the same ViT trained from scratch '
                  '(He et al. 2022, section 4 and Table 3)',
                  sweep.Group('finetune'), sweep.Group('scratch')),
      sweep.Claim(f'Fine-tuning has flattened: {2 * FT_EPOCHS} epochs instead of {FT_EPOCHS} '
                  'move top-1 by less than half a point',
                  sweep.Group('finetune_2x'), sweep.Group('finetune'), kind='within',
                  margin=half_point),
      sweep.Claim(f'Training from scratch has flattened: {2 * SCRATCH_EPOCHS} epochs instead '
                  f'of {SCRATCH_EPOCHS} move top-1 by less than half a point',
                  sweep.Group('scratch_2x'), sweep.Group('scratch'), kind='within',
                  margin=half_point),
  ]
  return sweep.Sweep(stages, claims=claims,
                     title='MAE pretraining against training from scratch, Fashion-MNIST')

r"""MAE pretraining against training from scratch, each trained until it stops improving,
three seeds (MAE paper section 4, Table 3), on the 10,000 Fashion-MNIST test images.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_vs_scratch.py --workdir=runs/mae_vs_scratch \
      --results=docs/results/mae_vs_scratch

pretrain: MAE-mu/4 (0.8 M parameters, patch 4) on the 60,000 training images, no labels,
  50 epochs (5 of warm-up). 50, not the headline's 100: in the headline's 100-epoch
  pretraining 20-NN accuracy moved 0.29 points from 43 to 85 epochs
  (docs/results/headline/README.md), and a run must finish within one sitting of the
  machine (about 2.5 h: a new sitting may not find the workdir; --results keeps the
  finished runs and this run's weights, not an interrupted run). Ran 1.33 h of steps at
  631 images/s (2026-12-07): 20-NN 83.80% and 1/5/10/25-shot 56.8/63.4/67.1/71.2% on the
  test images (docs/results/mae_vs_scratch/pretrain_probe_free.json), against 84.43% and
  59.1/63.0/67.5/71.5% after the headline's 100 epochs.
finetune_half: the classifier from it, fine-tuned for FT / 2 epochs, seeds 0-2;
  finetune: FT epochs, seeds 0-2: whether doubling the budget up to FT still gains half a
  point.
scratch_half: the same classifier from a random start, SCRATCH / 2 epochs, seeds 0-2;
  scratch: SCRATCH epochs, seeds 0-2.
The short runs come first: the more of them finish in one sitting, the less a lost
workdir costs.
Both arms are compared at the same number of epochs of supervised training: what the
pretraining buys at that budget. 40 epochs, because on the held-out images 20 epochs of
fine-tuning gained 0.96 points over 10 and scratch training reached 84% after 10 (the
tuning sweep), so neither had flattened by 20; the headline's fine-tunings of the
100-epoch pretraining gained 1.03 points from 20 to 40 epochs.
The recipes are configs/fashion_mnist.py's (chosen on held-out training images by
configs/sweeps/fashion_finetune_tune.py). The seeds vary the fine-tuning and the scratch
training; all fine-tunings start from the one pretraining, so the verdict is about that
pretraining and leaves its own seed-to-seed spread out. Cost on the 2-core CPU alone at
330 images/s (fine-tuning and scratch steps on the machine of 2026-12-07; 570 on a faster
one): about 1 h a 20-epoch run and 2 h a 40-epoch run, 18 h in all over sittings.

The headline (docs/results/headline/README.md) was this sweep file as of commit 439b005
(a 100-epoch pretraining, only its fine-tunings run): `git show
439b005:configs/sweeps/mae_vs_scratch.py`.
"""

from vit_jax import sweep

FT_EPOCHS = 40
SCRATCH_EPOCHS = 40
SEEDS = {'seed': [0, 1, 2]}


def get_sweep():
  pretrain = sweep.Stage('pretrain', 'configs/fashion_mnist.py:mae,epochs=50',
                         overrides={'optim.warmup_epochs': 5.0})
  stages = [
      pretrain,
      sweep.Stage('finetune_half', f'configs/fashion_mnist.py:finetune,epochs={FT_EPOCHS // 2}',
                  init_from='pretrain', grid=sweep.product(SEEDS)),
      sweep.Stage('scratch_half',
                  f'configs/fashion_mnist.py:scratch,epochs={SCRATCH_EPOCHS // 2}',
                  grid=sweep.product(SEEDS)),
      sweep.Stage('finetune', f'configs/fashion_mnist.py:finetune,epochs={FT_EPOCHS}',
                  init_from='pretrain', grid=sweep.product(SEEDS)),
      sweep.Stage('scratch', f'configs/fashion_mnist.py:scratch,epochs={SCRATCH_EPOCHS}',
                  grid=sweep.product(SEEDS)),
  ]
  half_point = 0.005
  claims = [
      sweep.Claim('MAE pretraining then fine-tuning beats the same ViT trained from scratch '
                  '(He et al. 2022, section 4 and Table 3; one 50-epoch pretraining, '
                  'seeds of the fine-tuning)',
                  sweep.Group('finetune'), sweep.Group('scratch')),
      sweep.Claim(f'Fine-tuning has flattened: {FT_EPOCHS} epochs instead of '
                  f'{FT_EPOCHS // 2} gain less than half a point of top-1',
                  sweep.Group('finetune'), sweep.Group('finetune_half'), kind='at_most',
                  margin=half_point),
      sweep.Claim(f'Training from scratch has flattened: {SCRATCH_EPOCHS} epochs instead of '
                  f'{SCRATCH_EPOCHS // 2} gain less than half a point of top-1',
                  sweep.Group('scratch'), sweep.Group('scratch_half'), kind='at_most',
                  margin=half_point),
  ]
  return sweep.Sweep(stages, claims=claims,
                     title='MAE pretraining against training from scratch, Fashion-MNIST')

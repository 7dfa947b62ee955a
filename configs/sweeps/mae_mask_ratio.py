r"""MAE mask ratio (MAE paper Fig. 5): pretraining with 50%, 75% and 90% of the patches
removed, judged by probe-free measures of the frozen encoder, on the full Fashion-MNIST.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_mask_ratio.py --workdir=runs/mae_mask_ratio \
      --results=docs/results/mae_mask_ratio

pretrain: MAE-mu/4 (width 128, depth 4, decoder 64 x 2; patch 4, so 49 patches of which
  25, 12 and 5 are seen) for PRETRAIN_EPOCHS epochs with its own schedule, seeds 0-2.
  Each run ends with 20-NN top-1 (the verdicts' metric) and 1/5/10/25-shot linear
  accuracy of its frozen encoder (vit_jax/fewshot.py: fitted on the 60,000 training
  images, scored on the 10,000 test images).
pretrain_half: mask 0.75 for half the epochs, seeds 0-2: whether doubling the budget up
  to PRETRAIN_EPOCHS still gains half a point (three seeds a side decide it where one
  run against three seeds could not).

The paper's Fig. 5 measures linear probing and fine-tuning; here the closed-form few-shot
classifier and k-NN stand in for the probe (they have no training budget of their own to
converge), and fine-tuning is left to configs/sweeps/mae_vs_scratch.py. Mask 0.25 (the
costliest pretraining, ~130 s an epoch) is left out: the verdicts need three seeds at each
compared ratio, and 0.25 is not one. Cost on a 2-core CPU alone: 60 s an epoch at mask
0.75, ~45 s at 0.9, ~95 s at 0.5 (the encoder sees twice the patches), ~1 min of
evaluation a run: 3 x 20 x 200 s + 3 x 10 x 60 s + 12 min = 3.9 h, over sittings.
"""

from vit_jax import sweep

PRETRAIN_EPOCHS = 20
COMPARED = [0.5, 0.75, 0.9]
METRIC = 'last_eval/knn_top1'


def get_sweep():
  probe_free = {'fewshot.knn_k': 20, 'fewshot.shots': (1, 5, 10, 25),
                'optim.warmup_epochs': PRETRAIN_EPOCHS / 10}
  ratios = sweep.product({'seed': [0, 1, 2], 'model.mask_ratio': COMPARED})
  stages = [
      sweep.Stage('pretrain', f'configs/fashion_mnist.py:mae,epochs={PRETRAIN_EPOCHS}',
                  overrides=probe_free, grid=ratios),
      sweep.Stage('pretrain_half', f'configs/fashion_mnist.py:mae,epochs={PRETRAIN_EPOCHS // 2}',
                  overrides={**probe_free, 'optim.warmup_epochs': PRETRAIN_EPOCHS / 20},
                  grid=sweep.product({'seed': [0, 1, 2], 'model.mask_ratio': [0.75]})),
  ]

  def at(ratio, stage='pretrain'):
    return sweep.Group(stage, {'model.mask_ratio': ratio})

  claims = [
      sweep.Claim('Masking 75% of the patches beats masking 50% for the frozen features '
                  '(He et al. 2022, Fig. 5: linear probing peaks at 75%; 20-NN stands in for '
                  'the probe)', at(0.75), at(0.5), metric=METRIC),
      sweep.Claim('Masking 75% of the patches beats masking 90% for the frozen features '
                  '(He et al. 2022, Fig. 5)', at(0.75), at(0.9), metric=METRIC),
      sweep.Claim(f'Pretraining has flattened: {PRETRAIN_EPOCHS} epochs instead of '
                  f'{PRETRAIN_EPOCHS // 2} gain less than half a point of 20-NN top-1',
                  at(0.75), at(0.75, 'pretrain_half'), kind='at_most', margin=0.005,
                  metric=METRIC),
  ]
  return sweep.Sweep(stages, claims=claims,
                     title='MAE mask ratio on Fashion-MNIST (MAE paper Fig. 5)')

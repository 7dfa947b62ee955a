r"""MAE mask ratio (MAE paper Fig. 5): pretraining with 25%, 50%, 75% and 90% of the
patches removed, each followed by fine-tuning and by linear probing, on the full
Fashion-MNIST.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_mask_ratio.py --workdir=runs/mae_mask_ratio

Budget, sized for about an hour of a 2-core CPU: MAE-mu/4 (width 128, depth 4, decoder
64 x 2) pretrained for 2 epochs, fine-tuned for 1 epoch, probed for 1 epoch. The paper
pretrains for 800-1600 epochs; at this scale the study shows the direction of the
effect, not the paper's numbers. 12 runs.
"""

from vit_jax import sweep


def get_sweep():
  pretrain = sweep.Stage('pretrain', 'configs/fashion_mnist.py:mae,epochs=2',
                         grid=sweep.product({'model.mask_ratio': [0.25, 0.5, 0.75, 0.9]}))
  return sweep.Sweep(
      title='MAE mask ratio on Fashion-MNIST (MAE paper Fig. 5)',
      stages=[pretrain,
              sweep.Stage('finetune', 'configs/fashion_mnist.py:finetune,epochs=1',
                          overrides={'optim.warmup_epochs': 0.2}, init_from='pretrain'),
              sweep.Stage('probe', 'configs/fashion_mnist.py:probe,epochs=1',
                          overrides={'optim.warmup_epochs': 0.2}, init_from='pretrain')])

r"""MAE pretraining against training from scratch at the same total compute, 2 seeds,
on the full Fashion-MNIST (target: at least 94.0% top-1 on the 10,000 test images for the
MAE-pretrained, fine-tuned ViT, and above the ViT trained from scratch).

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_vs_scratch.py --workdir=runs/mae_vs_scratch

MAE-mu/4 pretrained for 3 epochs, then fine-tuned for 2; the same classifier from
scratch for 3.2 epochs, which costs the same training FLOPs: one pretraining step of 256
is 25.3 GFLOP and one classifier step 64 GFLOP (XLA's counts, see `train_flops` in the
results), so 3 x 25.3 / 64 + 2 = 3.2 epochs. About 55 minutes of a 2-core CPU. 6 runs.
"""

from vit_jax import sweep

SEEDS = {'seed': [0, 1]}


def get_sweep():
  return sweep.Sweep(
      title='MAE pretraining against training from scratch, same compute, Fashion-MNIST',
      stages=[sweep.Stage('pretrain', 'configs/fashion_mnist.py:mae,epochs=3',
                          grid=sweep.product(SEEDS)),
              sweep.Stage('finetune', 'configs/fashion_mnist.py:finetune,epochs=2',
                          init_from='pretrain'),
              sweep.Stage('scratch', 'configs/fashion_mnist.py:scratch,epochs=3.2',
                          grid=sweep.product(SEEDS))])

r"""Compute scaling of ViT classifiers trained from scratch (ViT paper Fig. 5-6, in the
style of compute scaling laws): 4 model sizes x 3 training budgets on the full
Fashion-MNIST; eval loss against training FLOPs on log-log axes, the compute-efficient
frontier and a power law fitted to it.

  python -m vit_jax.sweep --sweep=configs/sweeps/scaling.py --workdir=runs/scaling

Sizes (width, depth, heads, MLP): 32/2/2/128, 64/2/2/256, 96/3/3/384, 128/4/4/512
(0.03 M to 0.8 M parameters), patch 4; budgets 0.5, 1 and 2 epochs of 60,000 images
(117, 235 and 469 steps of 256), each with its own cosine schedule. 12 runs.
"""

from vit_jax import sweep


def get_sweep():
  sizes = sweep.zipped({'model.width': [32, 64, 96, 128], 'model.depth': [2, 2, 3, 4],
                        'model.num_heads': [2, 2, 3, 4], 'model.mlp_dim': [128, 256, 384, 512]})
  return sweep.Sweep(
      title='Scaling: ViT from scratch on Fashion-MNIST, eval loss against compute',
      scaling='model.width',
      stages=[sweep.Stage(
          'scratch', 'configs/fashion_mnist.py:scratch',
          overrides={'optim.warmup_epochs': 0.2},
          grid=sweep.product(sizes, {'num_epochs': [0.5, 1.0, 2.0]}))])

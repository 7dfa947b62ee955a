r"""MAE decoder depth and width (MAE paper Table 1a and 1b): depth 1, 2, 4 at width 64,
and width 32 and 128 at depth 2, each pretraining followed by fine-tuning and by linear
probing, on the full Fashion-MNIST.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_decoder.py --workdir=runs/mae_decoder

Budget as configs/sweeps/mae_mask_ratio.py (2 epochs of pretraining at mask ratio 0.75,
1 of fine-tuning, 1 of probing): about an hour and a quarter of a 2-core CPU. 15 runs.
The paper's finding: a deep decoder matters for linear probing (8 blocks: +8 points over
1 block) and little for fine-tuning; width 512 is best among 128-1024.
"""

from vit_jax import sweep


def get_sweep():
  decoders = (sweep.product({'model.decoder_depth': [1, 2, 4]}) +
              sweep.zipped({'model.decoder_width': [32, 128], 'model.decoder_mlp_dim': [128, 512]}))
  return sweep.Sweep(
      title='MAE decoder depth and width on Fashion-MNIST (MAE paper Table 1a/1b)',
      stages=[sweep.Stage('pretrain', 'configs/fashion_mnist.py:mae,epochs=2', grid=decoders),
              sweep.Stage('finetune', 'configs/fashion_mnist.py:finetune,epochs=1',
                          overrides={'optim.warmup_epochs': 0.2}, init_from='pretrain'),
              sweep.Stage('probe', 'configs/fashion_mnist.py:probe,epochs=1',
                          overrides={'optim.warmup_epochs': 0.2}, init_from='pretrain')])

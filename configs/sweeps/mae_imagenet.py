r"""The MAE paper at full scale on ImageNet-1k: ViT-B/16 pretrained at mask ratios 0.5,
0.75 and 0.9 (Fig. 5's ends and its best), each fine-tuned and linearly probed with the
paper's recipes (configs/mae_pretrain.py, mae_finetune.py, linear_probe.py). For a pod or
a cluster: print the SLURM job arrays and the TPU-VM lines with

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_imagenet.py \
      --workdir=/shared/mae_imagenet --launch=print

Expected (paper Fig. 5, ViT-L/16, 800 epochs): fine-tuning 84.9 / 85.7 / 85.2 % and
linear probing 56.4 / 71.6 / 68.4 % at mask ratios 0.5 / 0.75 / 0.9 (read off the
figure). 800 epochs of B/16 take about 13 h on 128 TPU-v3 cores per pretraining (the
paper's Table 2 gives 15.4 h for L/16 at decoder depth 8).
"""

from vit_jax import sweep

DATA = 'model=B/16,data=imagenet2012'


def get_sweep():
  return sweep.Sweep(
      title='MAE mask ratio on ImageNet-1k (MAE paper Fig. 5), ViT-B/16',
      stages=[sweep.Stage('pretrain', f'configs/mae_pretrain.py:{DATA}',
                          grid=sweep.product({'model.mask_ratio': [0.5, 0.75, 0.9]})),
              sweep.Stage('finetune', f'configs/mae_finetune.py:{DATA}', init_from='pretrain'),
              sweep.Stage('probe', f'configs/linear_probe.py:{DATA}', init_from='pretrain')])

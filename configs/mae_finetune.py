r"""Fine-tuning a pretrained MAE encoder as a classifier (MAE paper, FINETUNE.md recipe).

  python -m vit_jax.main --config=configs/mae_finetune.py:model=B/16,data=imagenet2012 \
      --workdir=runs/ft_b16 --config.init.path=runs/mae_b16

`init.path` is the MAE workdir (or an official `mae_pretrain_vit_base.pth`, see
vit_jax/interop/). Recipe: global average pooling with fc_norm, batch 1024, AdamW
(0.9, 0.999), weight decay 0.05, base lr 5e-4 (B) / 1e-3 (L, H) scaled by batch/256,
layer decay 0.65 (B) / 0.75 (L, H), drop path 0.1 / 0.2 / 0.3, 100 epochs (B) / 50
(L, H) with 5 warmup epochs, RandAugment(9, 0.5), mixup 0.8, cutmix 1.0, label
smoothing 0.1, random erasing 0.25 (one rectangle of noise, after normalisation). Expected
(paper, from 1600-epoch pretraining): 83.6% top-1 (B/16), 85.9% (L/16), 86.9% (H/14).

Hardware: the official fine-tuning ran on 32 V100 GPUs; the pre-flight checks it on the
TPUs of the paper's pretraining, 128 v3 cores (`--topology=v3:8x8`, docs/preflight.md).

Demo, from the demo MAE (configs/mae_pretrain.py:demo), on CPU:

  python -m vit_jax.main --config=configs/mae_finetune.py:demo --workdir=runs/ft_demo \
      --config.init.path=runs/mae_demo

The same command without init.path trains the same classifier from scratch.
"""

from vit_jax import config_utils

RECIPES = {  # model: (base_lr, layer_decay, drop_path, epochs)
    'B/16': (5e-4, 0.65, 0.1, 100),
    'L/16': (1e-3, 0.75, 0.2, 50),
    'H/14': (1e-3, 0.75, 0.3, 50),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant='', model='B/16', data='imagenet2012')
  config = config_utils.base_config('classification')
  config.init = config_utils.mae_finetune_init()
  config.optim.name = 'adamw'
  config.optim.b1, config.optim.b2 = 0.9, 0.999
  config.optim.weight_decay = 0.05
  config.optim.lr_batch_base = 256
  config.optim.schedule = 'cosine'
  config.optim.min_lr = 1e-6  # main_finetune.py's default

  if arg.variant == 'demo':
    config.model_name = 'ViT-mu/4'
    config.model.update(config_utils.DEMO_ENCODER | dict(
        pool='gap', drop_path=0.1, head_init_std=2e-5))
    config_utils.use_demo_data(config)
    config.data.crop_scale = (0.35, 1.0)
    config.num_epochs = 8
    config.optim.warmup_epochs = 1
    config.optim.base_lr = 1e-3
    config.optim.layer_decay = 0.75
    config.mixup.update(dict(mixup_alpha=0.2, cutmix_alpha=0.0))
    config.log_every_steps = 50
    config.checkpoint_every_steps = 300
    return config

  if arg.model not in RECIPES:
    raise ValueError(f'No fine-tuning recipe for {arg.model}; known: {sorted(RECIPES)}.')
  base_lr, layer_decay, drop_path, epochs = RECIPES[arg.model]
  config.model_name = f'ViT-{arg.model}'
  config.model.update(dict(pool='gap', drop_path=drop_path, head_init_std=2e-5))
  config_utils.use_dataset(config, arg.data, imagenet_preprocessing=True)
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 9
  config.data.random_erasing = 0.25  # main_finetune.py's --reprob
  config.global_batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = epochs
  config.optim.warmup_epochs = 5
  config.optim.base_lr = base_lr
  config.optim.layer_decay = layer_decay
  # Mixed precision, as the official code's torch.cuda.amp (and configs/mae_pretrain.py):
  # bfloat16 activations and matmuls, float32 parameters, optimizer state and statistics.
  config.model.dtype = 'bfloat16'
  config.sharding_rules = config_utils.FSDP_OVER_DATA  # see config_utils
  config.mesh = config_utils.PAPER_MESH  # FSDP within each TPU slice
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  return config

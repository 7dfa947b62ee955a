r"""A plain ViT trained from scratch: big_vision's "better plain ViT baselines".

Beyer, Zhai, Kolesnikov 2022 (arXiv 2205.01580): ViT-S/16 on ImageNet-1k in 90 epochs,
global average pooling, fixed sincos2d position embeddings, no class token, a tanh
pre-logits layer (big_vision's rep_size=True), batch 1024,
AdamW (0.9, 0.999), lr 1e-3, decoupled weight decay 1e-4 (0.1 in optax's lr-scaled
convention), 10k warmup steps then cosine, gradient clipping at 1.0, RandAugment(2, 10),
mixup 0.2, Inception crop, zero-initialised head. Expected: 76.5% top-1 after 90 epochs
(paper; 78.5% at 150, 80.0% at 300 epochs).

Hardware of the paper: a TPU v3-8, 6-7 hours for 90 epochs (`--topology=v3:2x2` for
python -m vit_jax.preflight, docs/preflight.md).

  python -m vit_jax.main --config=configs/vit_scratch.py:data=imagenet2012 \
      --workdir=runs/vit_s16

Demo on the built-in Fashion-MNIST subset, on CPU:

  python -m vit_jax.main --config=configs/vit_scratch.py:demo --workdir=runs/scratch_demo
"""

from vit_jax import config_utils, models


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant='', model='S/16', data='imagenet2012', epochs=90)
  config = config_utils.base_config('classification')
  config.model.update(dict(pool='gap', class_token=False, fc_norm=False, posemb='sincos2d',
                           head_init_std=0.0))
  config.label_smoothing = 0.0
  config.mixup.update(dict(mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0))
  config.optim.name = 'adamw'
  config.optim.b1, config.optim.b2 = 0.9, 0.999
  config.optim.base_lr = 1e-3
  config.optim.lr_batch_base = 0
  config.optim.weight_decay = 0.1
  config.optim.grad_clip_norm = 1.0
  config.optim.schedule = 'cosine'
  config.data.crop_scale = (0.05, 1.0)
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 10

  if arg.variant == 'demo':
    config.model_name = 'ViT-mu/4'
    config.model.update(config_utils.DEMO_ENCODER)
    config_utils.use_demo_data(config)
    config.data.crop_scale = (0.35, 1.0)
    config.data.randaugment_layers = 0
    config.num_epochs = 15
    config.optim.warmup_epochs = 1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 300
    return config

  config.model_name = f'ViT-{arg.model}'
  config.model.representation_size = models.VARIANTS[arg.model.split('/')[0]][0]
  config_utils.use_dataset(config, arg.data, imagenet_preprocessing=False)
  config.global_batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = arg.epochs
  config.optim.warmup_epochs = 10_000 / (1_281_167 / 1024)  # 10k steps
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  config.sharding_rules = config_utils.FSDP_OVER_DATA  # see config_utils
  config.mesh = config_utils.PAPER_MESH  # FSDP within each TPU slice
  return config

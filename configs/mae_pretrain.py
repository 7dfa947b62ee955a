r"""MAE pretraining (He et al. 2021, arXiv 2111.06377), the official recipe.

ImageNet-1k (prepared once with scripts/prepare_dataset.py, see the README):

  python -m vit_jax.main --config=configs/mae_pretrain.py:model=B/16,data=imagenet2012 \
      --workdir=runs/mae_b16

Recipe of the paper and of facebookresearch/mae PRETRAIN.md: 800 epochs (1600 for the
headline numbers), batch 4096, AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4
scaled by batch/256, 40 warmup epochs then cosine, mask ratio 0.75, norm_pix_loss,
RandomResizedCrop(224, scale 0.2-1) and flip. Expected, after fine-tuning with
configs/mae_finetune.py (paper, 1600 epochs): 83.6% top-1 for B/16, 85.9% for L/16,
86.9% for H/14. We have not run the ImageNet recipe ourselves.

Hardware of the paper's timings (Table 2: 800 epochs of L/16 in 15.4 h, H/14 in 34.5 h):
128 TPU v3 cores. The memory and time this config needs there, compiled on any machine
(docs/preflight.md):

  python -m vit_jax.preflight --config=configs/mae_pretrain.py:model=L/16,data=imagenet2012 \
      --topology=v3:8x8

Demo on the built-in Fashion-MNIST subset (a small MAE, on CPU):

  python -m vit_jax.main --config=configs/mae_pretrain.py:demo --workdir=runs/mae_demo

writes runs/mae_demo/reconstructions.png (see the README for the time and loss measured).
"""

from vit_jax import config_utils

def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant='', model='B/16', data='imagenet2012', epochs=800)
  config = config_utils.base_config('mae')

  config.optim.name = 'adamw'
  config.optim.b1, config.optim.b2 = 0.9, 0.95
  config.optim.weight_decay = 0.05
  config.optim.base_lr = 1.5e-4
  config.optim.lr_batch_base = 256
  config.optim.schedule = 'cosine'
  config.data.crop_scale = (0.2, 1.0)
  # As timm 0.3.2's add_weight_decay in main_pretrain.py: no decay on biases and norms only
  # (the class and mask tokens are decayed; position embeddings are fixed).
  config.optim.no_decay = ('.*/bias', '.*/scale')

  if arg.variant == 'demo':
    config.model_name = 'MAE-mu/4'
    config.model.update(config_utils.DEMO_ENCODER | config_utils.DEMO_DECODER |
                        dict(norm_pix_loss=True, mask_ratio=0.75))
    config_utils.use_demo_data(config)
    config.num_epochs = 16
    config.optim.warmup_epochs = 2
    config.optim.base_lr = 1.5e-3
    config.log_every_steps = 50
    config.checkpoint_every_steps = 300
    return config

  config.model_name = f'MAE-{arg.model}'
  config.model.norm_pix_loss = True
  config.model.mask_ratio = 0.75  # the paper's choice (Fig. 5); swept by configs/sweeps/
  config_utils.use_dataset(config, arg.data, imagenet_preprocessing=True)
  config.global_batch_size = 4096
  config.eval_batch_size = 1024
  config.num_epochs = arg.epochs
  config.optim.warmup_epochs = 40
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoint_every_steps = 50_000
  config.model.scan = True
  # Mixed precision, as the official code's torch.cuda.amp: bfloat16 activations and
  # matmuls; parameters, optimizer state, LayerNorm statistics and softmax stay float32.
  config.model.dtype = 'bfloat16'
  # No rematerialisation: on the paper's 128 v3 cores (batch 32 per core) L/16 needs 4.4
  # of 16 GiB and H/14 7.9 without it (with FSDP, below), and recomputing the forward pass
  # cost 18% of the step (pre-flight of L/16 on v3:8x8: MFU 38% with nothing_saveable,
  # float32 and replicated state, 50.9% now; docs/preflight.md). Where it does not fit,
  # the pre-flight says so and suggests it.
  config.model.remat_policy = 'none'
  # Parameters and optimizer state split over the devices (FSDP): MAE-L/16's step on TPU
  # v4 is 22% shorter than replicated (126.1 against 162.2 ms in the pre-flight).
  config.sharding_rules = config_utils.FSDP_OVER_DATA  # see config_utils
  config.mesh = config_utils.PAPER_MESH  # FSDP within each TPU slice
  return config

"""Vision Transformer (Dosovitskiy et al. 2020, arXiv 2010.11929) in Flax linen.

One module covers the options of google-research/vision_transformer, big_vision,
timm and MAE fine-tuning: class-token, global-average and attention pooling, learned
or fixed sincos2d position embeddings, a tanh representation layer, dropout,
stochastic depth, bfloat16 compute, rematerialisation and `nn.scan` over blocks.

Parameter tree (unscanned), the layout of the public vit_jax `.npz` checkpoints:
  embedding/{kernel (p, p, C, D), bias}
  cls (1, 1, D)                                      if class_token
  Transformer/posembed_input/pos_embedding (1, N, D)  if posemb == 'learn'
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}
  Transformer/encoder_norm                           unless fc_norm
  fc_norm                                            if fc_norm (pool 'gap' by default)
  MAPHead_0                                          if pool == 'map'
  pre_logits                                         if representation_size
  head_norm/{mean, var} in batch_stats               if head_batchnorm (linear probe)
  head                                               if num_classes
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import layers, ops

POOLS = ('tok', 'gap', 'map')
POSEMBS = ('learn', 'sincos2d')


def patch_grid(image_size, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of patches for an int or (height, width) image size."""
  height, width_px = layers.pair(image_size)
  return height // patch_size, width_px // patch_size


def check_vit_fields(module, name: str) -> None:
  """Raises a ValueError naming the values when the fields do not make a model."""
  height, width_px = layers.pair(module.image_size)
  p = module.patch_size
  if p <= 0 or height % p or width_px % p:
    raise ValueError(f'{name}: image size {height}x{width_px} is not divisible by the patch '
                     f'size {p}; choose image_size as a multiple of {p}.')
  if module.width % module.num_heads:
    raise ValueError(f'{name}: width {module.width} is not divisible by num_heads '
                     f'{module.num_heads}.')
  if module.init_scheme not in layers.INIT_SCHEMES:
    raise ValueError(f'{name}: init_scheme {module.init_scheme!r} is not one of '
                     f'{layers.INIT_SCHEMES}.')
  if module.ops not in ops.OPS:
    raise ValueError(f'{name}: ops {module.ops!r} is not one of {ops.OPS}.')
  if module.remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f'{name}: remat_policy {module.remat_policy!r} is not one of '
                     f'{layers.REMAT_POLICIES}.')
  try:
    jnp.dtype(module.dtype)
  except TypeError as e:
    raise ValueError(f'{name}: dtype {module.dtype!r} is not a dtype.') from e


def check_images(images, image_size, channels: int, name: str) -> None:
  """Raises a ValueError when images are not (batch, H, W, channels) of the model's size."""
  expected = layers.pair(image_size)
  if images.ndim != 4 or tuple(images.shape[1:3]) != expected or images.shape[3] != channels:
    raise ValueError(f'{name} expects images of shape (batch, {expected[0]}, {expected[1]}, '
                     f'{channels}), got {tuple(images.shape)}. Set the model\'s image_size and '
                     f'channels (config.model.image_size, config.model.channels; the data '
                     f'pipeline resizes and converts to them) or resize the input.')


class ViT(nn.Module):
  """Vision Transformer classifier.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features without a head.
    patch_size: side of the square patches.
    width, depth, num_heads, mlp_dim: Transformer sizes.
    image_size: int or (height, width) of the input.
    channels: input channels.
    pool: 'tok' (class token), 'gap' (mean of the patch tokens) or 'map' (multihead
      attention pooling).
    class_token: prepend a learned class token (needed by pool='tok').
    fc_norm: LayerNorm after pooling instead of `encoder_norm` before it (MAE
      fine-tuning, timm's avg pool). None means: True for pool='gap'.
    posemb: 'learn' or 'sincos2d' (fixed, not a parameter).
    representation_size: width of a tanh `pre_logits` layer, None for none.
    dropout, attention_dropout: dropout rates.
    drop_path: stochastic depth rate of the last block (linear in depth from 0).
    layernorm_epsilon: 1e-6 as in vision_transformer, timm and MAE.
    dtype: compute dtype; parameters stay float32.
    scan: run blocks with nn.scan (see vit_jax.param_tree.scan_params/unscan_params).
    remat_policy: 'none', 'full' or a name in jax.checkpoint_policies.
    head_init_std: 0.0 initialises the head with zeros (vision_transformer); otherwise
      a truncated normal with this std (MAE fine-tuning uses 2e-5, linear probing 0.01).
    head_batchnorm: BatchNorm without affine parameters before the head (MAE linear probe).
    frozen_encoder: stop gradients below the head, so that backpropagation skips the
      encoder of a linear probe.
    init_scheme: 'vit' or 'mae', see layers.py.
    ops: 'fast' kernels or the plain-JAX 'reference' ones, see ops.py.
  """
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: Any = 224
  channels: int = 3
  pool: str = 'tok'
  class_token: bool = True
  fc_norm: bool | None = None
  posemb: str = 'learn'
  representation_size: int | None = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layernorm_epsilon: float = 1e-6
  dtype: Any = 'float32'
  scan: bool = False
  remat_policy: str = 'none'
  head_init_std: float = 0.0
  head_batchnorm: bool = False
  frozen_encoder: bool = False
  init_scheme: str = 'vit'
  ops: str = 'fast'

  def __post_init__(self):
    check_vit_fields(self, 'ViT')
    if self.pool not in POOLS:
      raise ValueError(f'ViT: pool {self.pool!r} is not one of {POOLS}.')
    if self.posemb not in POSEMBS:
      raise ValueError(f'ViT: posemb {self.posemb!r} is not one of {POSEMBS}.')
    if self.pool == 'tok' and not self.class_token:
      raise ValueError("ViT: pool='tok' needs class_token=True.")
    super().__post_init__()

  @property
  def grid(self) -> tuple[int, int]:
    return patch_grid(self.image_size, self.patch_size)

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token)

  @property
  def use_fc_norm(self) -> bool:
    return self.pool == 'gap' if self.fc_norm is None else self.fc_norm

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """(batch, H, W, C) images -> (batch, num_classes) float32 logits.

    With num_classes=0 it returns the pooled (batch, width) features instead.
    """
    check_images(images, self.image_size, self.channels, 'ViT')
    dtype = jnp.dtype(self.dtype)
    x = layers.PatchEmbedding(self.patch_size, self.width, self.init_scheme, dtype,
                              name='embedding')(images)
    if self.class_token:
      x = layers.prepend_class_token(self, x, self.init_scheme)
    x = layers.Encoder(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, posemb=self.posemb,
        grid=self.grid, num_prefix_tokens=self.num_prefix_tokens,
        final_norm=not self.use_fc_norm, dropout=self.dropout,
        attention_dropout=self.attention_dropout, drop_path=self.drop_path,
        layernorm_epsilon=self.layernorm_epsilon, scan=self.scan,
        remat_policy=self.remat_policy, init_scheme=self.init_scheme, dtype=dtype,
        ops=self.ops, name='Transformer')(x, train=train)

    if self.pool == 'tok':
      x = x[:, 0]
    elif self.pool == 'gap':
      x = jnp.mean(x[:, self.num_prefix_tokens:], axis=1)
    else:
      x = layers.MAPHead(self.num_heads, self.mlp_dim, self.layernorm_epsilon, dtype,
                         self.ops, name='MAPHead_0')(x)
    if self.use_fc_norm:
      x = ops.norm(self.ops, epsilon=self.layernorm_epsilon, dtype=dtype, name='fc_norm')(x)
    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=dtype, name='pre_logits')(x))
    chex.assert_shape(x, (images.shape[0], self.representation_size or self.width))
    if not self.num_classes:
      return x.astype(jnp.float32)
    if self.frozen_encoder:
      x = jax.lax.stop_gradient(x)
    if self.head_batchnorm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                       use_scale=False, use_bias=False, dtype=jnp.float32, name='head_norm')(x)
    head_init = (nn.initializers.zeros if not self.head_init_std
                 else nn.initializers.truncated_normal(self.head_init_std))
    logits = nn.Dense(self.num_classes, dtype=dtype, kernel_init=head_init, name='head')(x)
    return logits.astype(jnp.float32)

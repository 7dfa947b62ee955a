"""Masked Autoencoder (He et al. 2021, arXiv 2111.06377), as facebookresearch/mae computes it.

The encoder's parameters are a ViT's tree minus the head (`embedding`, `cls`,
`Transformer/encoderblock_{i}`, `Transformer/encoder_norm`), so a pretrained MAE
loads into `get_model('ViT-B/16')` for fine-tuning without renaming. Position
embeddings are the fixed sincos2d tables, not parameters. The decoder adds
`decoder_embed`, `mask_token`, `Decoder/encoderblock_{i}`, `Decoder/encoder_norm`
and `decoder_pred`.

Masks are drawn from the 'masking' RNG stream: one (batch, num_patches) uniform draw
for the global batch, so under sharding every example on every device gets its own
mask, and the masks do not depend on how the batch is split over devices.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers
from vit_jax.models.vit import check_images, check_vit_fields, patch_grid


def random_masking(noise: jax.Array, mask_ratio: float):
  """MAE's per-example random masking by argsort of noise.

  Args:
    noise: (batch, num_patches) floats; small values are kept.
    mask_ratio: fraction of patches removed.
  Returns:
    ids_keep: (batch, num_keep) indices of the visible patches, num_keep =
      int(num_patches * (1 - mask_ratio)).
    ids_restore: (batch, num_patches) permutation that undoes the shuffle.
    mask: (batch, num_patches) float32, 1 for removed patches, 0 for visible ones.
  """
  num_patches = noise.shape[1]
  num_keep = int(num_patches * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return ids_shuffle[:, :num_keep], ids_restore, mask


def masked_patch_loss(pred, target, mask, norm_pix_loss: bool):
  """Mean squared error per patch, averaged over removed patches (mask == 1) only.

  With norm_pix_loss the target is normalised per patch by its mean and unbiased
  variance (eps 1e-6), as torch.var does in the official code.
  """
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.0e-6)**0.5
  per_patch = jnp.mean((pred.astype(jnp.float32) - target)**2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAE(nn.Module):
  """Masked autoencoder: ViT encoder on visible patches, small decoder on all of them.

  Attributes:
    patch_size, width, depth, num_heads, mlp_dim, image_size, channels: the encoder,
      as in ViT.
    decoder_width, decoder_depth, decoder_num_heads, decoder_mlp_dim: the decoder
      (official defaults 512, 8, 16, 2048).
    mask_ratio: fraction of patches removed (0.75).
    norm_pix_loss: normalise each target patch by its mean and std.
    layernorm_epsilon, dtype, scan, remat_policy, init_scheme, ops: as in ViT; the
      default init is MAE's.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: Any = 224
  channels: int = 3
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: int = 2048
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  layernorm_epsilon: float = 1e-6
  dtype: Any = 'float32'
  scan: bool = False
  remat_policy: str = 'none'
  init_scheme: str = 'mae'
  ops: str = 'fast'

  def __post_init__(self):
    check_vit_fields(self, 'MAE')
    if self.decoder_width % self.decoder_num_heads:
      raise ValueError(f'MAE: decoder_width {self.decoder_width} is not divisible by '
                       f'decoder_num_heads {self.decoder_num_heads}.')
    num_patches = int(np.prod(self.grid))
    if not 0.0 <= self.mask_ratio < 1.0 or int(num_patches * (1 - self.mask_ratio)) < 1:
      raise ValueError(f'MAE: mask_ratio {self.mask_ratio} must leave at least one of the '
                       f'{num_patches} patches visible.')
    super().__post_init__()

  @property
  def grid(self) -> tuple[int, int]:
    return patch_grid(self.image_size, self.patch_size)

  def _trunk(self, name, *, depth, num_heads, mlp_dim, posemb):
    """The encoder's or the decoder's blocks; their width is that of the tokens given."""
    return layers.Encoder(depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, posemb=posemb,
                          grid=self.grid, num_prefix_tokens=1,
                          layernorm_epsilon=self.layernorm_epsilon, scan=self.scan,
                          remat_policy=self.remat_policy, init_scheme=self.init_scheme,
                          dtype=jnp.dtype(self.dtype), ops=self.ops, name=name)

  @nn.compact
  def __call__(self, images, *, train: bool = False, noise=None, features_only: bool = False):
    """Returns (loss, pred, mask); with `features_only`, the encoder's class token
    (batch, width) float32 instead (the features a linear probe of MAE reads; give
    mask_ratio 0 for all patches).

    Args:
      images: (batch, H, W, C), normalised as the training data.
      train: unused by the default model (no dropout); kept for a uniform interface.
      noise: optional (batch, num_patches) floats that fix the masking, like the
        official implementation's uniform noise; drawn from the 'masking' RNG if None.
    Returns:
      loss: scalar float32, MSE over removed patches.
      pred: (batch, num_patches, p*p*C) float32 pixel predictions (normalised per
        patch when norm_pix_loss).
      mask: (batch, num_patches) float32, 1 for removed patches.
    """
    check_images(images, self.image_size, self.channels, 'MAE')
    dtype = jnp.dtype(self.dtype)
    batch = images.shape[0]
    num_patches = int(np.prod(self.grid))
    if noise is None:
      noise = jax.random.uniform(self.make_rng('masking'), (batch, num_patches))
    elif noise.shape != (batch, num_patches):
      raise ValueError(f'MAE: noise must have shape {(batch, num_patches)}, got {noise.shape}.')
    ids_keep, ids_restore, mask = random_masking(noise, self.mask_ratio)
    # Only the visible patches are embedded: the official code embeds all of them, then
    # keeps these, the same numbers for 1 / (1 - mask_ratio) times the work.
    x = layers.PatchEmbedding(self.patch_size, self.width, self.init_scheme, dtype,
                              name='embedding')(images, ids_keep)
    posemb = jnp.asarray(layers.sincos2d_table(self.grid, self.width), dtype)
    x = x + posemb[ids_keep]
    x = layers.prepend_class_token(self, x, self.init_scheme)  # its position embedding is 0
    x = self._trunk('Transformer', depth=self.depth, num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim, posemb='none')(x, train=train)
    if features_only:
      return x[:, 0].astype(jnp.float32)

    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=dtype, kernel_init=layers.xavier_uniform, name=name)
    x = dense(self.decoder_width, 'decoder_embed')(x)
    mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02),
                            (1, 1, self.decoder_width), jnp.float32)
    num_masked = num_patches - ids_keep.shape[1]
    patches = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token.astype(dtype), (batch, num_masked,
                                                               self.decoder_width))], axis=1)
    patches = layers.take_tokens(patches, ids_restore)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = self._trunk('Decoder', depth=self.decoder_depth, num_heads=self.decoder_num_heads,
                    mlp_dim=self.decoder_mlp_dim, posemb='sincos2d')(x, train=train)
    pred = dense(self.patch_size**2 * self.channels, 'decoder_pred')(x)[:, 1:]
    pred = pred.astype(jnp.float32)

    target = layers.patchify(images, self.patch_size)
    chex.assert_equal_shape((pred, target))
    loss = masked_patch_loss(pred, target, mask, self.norm_pix_loss)
    return loss, pred, mask

"""Building blocks shared by the ViT and MAE models.

Submodule names follow google-research/vision_transformer (`encoderblock_{i}`,
`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `MlpBlock_3`, ...) so that its
public `.npz` checkpoints map onto our parameter trees one to one.

Two initialisation schemes are supported, named by `init_scheme`:
  'vit': google-research/vision_transformer (xavier-uniform kernels, biases
         normal(1e-6) in the MLP, lecun-normal patch embedding, zero class token).
  'mae': facebookresearch/mae (xavier-uniform kernels with the bound of the fused
         qkv matrix for query/key/value, zero biases, patch embedding xavier-uniform
         as a linear layer, class token normal(0.02)).

The numerical kernels (attention, GELU, LayerNorm) are in ops.py, fast and reference
versions side by side; the modules that use them take the `ops` field that chooses.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import ops as ops_lib

INIT_SCHEMES = ('vit', 'mae')
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'nothing_saveable', 'everything_saveable')

xavier_uniform = nn.initializers.xavier_uniform()
# timm/MAE compute query, key and value with one Linear(D, 3D): xavier-uniform's bound
# is then sqrt(6 / (D + 3D)), half the variance of a separate (D, D) matrix.
fused_qkv_xavier_uniform = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')


def linear_xavier_uniform(key, shape, dtype=jnp.float32):
  """Xavier-uniform for a conv kernel (..., in, out) seen as one (prod(...)*in, out) matrix.

  This is how MAE initialises its patch embedding (`w.view(w.shape[0], -1)`); flax's
  conv initialisers would multiply the fan-out by the receptive field as well.
  """
  fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
  bound = np.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def pair(value) -> tuple[int, int]:
  """An image size given as int or (height, width) -> (height, width)."""
  return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(batch, H, W, C) -> (batch, H/p * W/p, p*p*C), patches in row-major order.

  Inside a patch the order is (row, column, channel), channel fastest: the order of
  MAE's `patchify` and of a (p, p, C, D) convolution kernel flattened to (p*p*C, D).
  """
  batch, height, width, channels = images.shape
  p = patch_size
  rows, cols = height // p, width // p
  x = images.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * cols, p * p * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int],
               channels: int) -> jax.Array:
  """Exact inverse of `patchify`: (batch, rows*cols, p*p*C) -> (batch, H, W, C)."""
  rows, cols = grid
  p = patch_size
  batch = patches.shape[0]
  x = patches.reshape(batch, rows, cols, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * p, cols * p, channels)


def sincos2d_table(grid: tuple[int, int], width: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2D sine-cosine position embeddings of MAE, shape (rows*cols, width).

  The first half of the channels encodes the column index, the second half the row
  index; each half is [sin, cos] of position * omega_i, omega_i = 1/temperature**(i/(width/4)).
  Positions are in row-major order, as `patchify` emits patches.
  """
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, got {width}.')
  rows, cols = grid
  row_index, col_index = np.meshgrid(np.arange(rows, dtype=np.float64),
                                     np.arange(cols, dtype=np.float64), indexing='ij')
  quarter = width // 4
  omega = 1.0 / temperature**(np.arange(quarter, dtype=np.float64) / quarter)

  def one_axis(positions):
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_axis(col_index), one_axis(row_index)], axis=1).astype(np.float32)


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int], *,
                    num_prefix_tokens: int = 0,
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Resamples learned position embeddings to another patch grid (bilinear).

  Args:
    posemb: (1, num_prefix_tokens + rows*cols, width) or without the leading 1.
    new_grid: (rows, cols) of the target model.
    num_prefix_tokens: leading rows that are not on the grid (1 for a class token);
      they are kept unchanged.
    old_grid: (rows, cols) of `posemb`; inferred as a square when not given.
  Returns:
    The embeddings on the new grid, with the shape layout of `posemb`.
  """
  posemb = np.asarray(posemb)
  squeeze = posemb.ndim == 2
  if squeeze:
    posemb = posemb[None]
  prefix, grid_emb = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  width = grid_emb.shape[-1]
  if old_grid is None:
    side = int(round(np.sqrt(grid_emb.shape[0])))
    if side * side != grid_emb.shape[0]:
      raise ValueError(f'Cannot infer the grid of {grid_emb.shape[0]} position embeddings '
                       f'(not a square); pass old_grid=(rows, cols).')
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != grid_emb.shape[0]:
    raise ValueError(f'old_grid {old_grid} does not hold {grid_emb.shape[0]} embeddings.')
  new_grid = tuple(new_grid)
  if tuple(old_grid) == new_grid:
    return posemb[0] if squeeze else posemb
  grid_emb = grid_emb.reshape(*old_grid, width)
  # Bilinear with half-pixel centres and no antialiasing, which is what timm's
  # resample_abs_pos_embed (F.interpolate, align_corners=False) does when upsampling.
  resized = jax.image.resize(jnp.asarray(grid_emb, jnp.float32), (*new_grid, width),
                             method='bilinear', antialias=False)
  resized = np.asarray(resized, posemb.dtype).reshape(1, new_grid[0] * new_grid[1], width)
  out = np.concatenate([prefix, resized], axis=1)
  return out[0] if squeeze else out


def take_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x: (batch, tokens, width), ids: (batch, k) -> (batch, k, width), a gather per example."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


class PatchEmbedding(nn.Module):
  """Linear projection of non-overlapping patches, stored as a (p, p, C, D) conv kernel.

  Computed as patchify + matmul, which is the same function as a stride-p convolution
  and lowers to one large GEMM on every backend.
  """
  patch_size: int
  width: int
  init_scheme: str = 'vit'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, ids_keep=None):
    """(batch, H, W, C) -> (batch, num_patches, D).

    With `ids_keep` (batch, k), only those patches, in that order -> (batch, k, D): MAE
    embeds its visible patches alone, the same numbers for less work.
    """
    p = self.patch_size
    channels = images.shape[-1]
    kernel_init = linear_xavier_uniform if self.init_scheme == 'mae' else nn.initializers.lecun_normal()
    kernel = self.param('kernel', kernel_init, (p, p, channels, self.width), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.width,), jnp.float32)
    patches = patchify(images.astype(self.dtype), p)
    if ids_keep is not None:
      patches = take_tokens(patches, ids_keep)
    kernel = kernel.reshape(p * p * channels, self.width).astype(self.dtype)
    return patches @ kernel + bias.astype(self.dtype)


def prepend_class_token(module: nn.Module, x, init_scheme: str):
  """Creates the parameter `cls` (1, 1, D) on `module` and prepends it to x (B, N, D)."""
  init = nn.initializers.normal(stddev=0.02) if init_scheme == 'mae' else nn.initializers.zeros
  cls = module.param('cls', init, (1, 1, x.shape[-1]), jnp.float32)
  cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
  return jnp.concatenate([cls, x], axis=1)


class MlpBlock(nn.Module):
  """Dense -> exact GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout: float = 0.0
  init_scheme: str = 'vit'
  dtype: Any = jnp.float32
  ops: str = 'fast'

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    bias_init = (nn.initializers.zeros if self.init_scheme == 'mae'
                 else nn.initializers.normal(stddev=1e-6))
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, kernel_init=xavier_uniform, bias_init=bias_init, name=name)
    width = x.shape[-1]
    x = dense(self.mlp_dim, 'Dense_0')(x)
    x = ops_lib.activation(x, self.ops)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = dense(width, 'Dense_1')(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class _DenseGeneralParams(nn.Module):
  """The `kernel` and `bias` of an nn.DenseGeneral, created as it creates them, not applied."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_init: Any

  @nn.compact
  def __call__(self):
    flat_shape = (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))
    # DenseGeneral initialises the flattened (fan_in, fan_out) matrix, then reshapes it.
    kernel = self.param('kernel', lambda key, shape, dtype: self.kernel_init(
        key, flat_shape, dtype).reshape(shape), self.in_shape + self.out_shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, self.out_shape, jnp.float32)
    return kernel.reshape(flat_shape), bias.reshape(flat_shape[1])


class Attention(nn.Module):
  """Multi-head dot-product attention with vision_transformer's parameter layout.

  query/key/value kernels are (D, heads, D/heads), out is (heads, D/heads, D). Each
  projection is one 2D matmul on its kernel seen as a (fan_in, fan_out) matrix: through
  3D kernels (nn.DenseGeneral) XLA's CPU backend copies kernels and their gradients into
  other layouts every step, which made MAE-B/16 training 6-13% slower. One matmul on the
  three kernels concatenated was no faster on CPU: the concatenation and the slicing of
  its gradient, every step, cost what the larger matmul saves. Without attention dropout
  it calls `ops.dot_product_attention`; with it, it spells the softmax out.
  """
  num_heads: int
  dropout: float = 0.0
  init_scheme: str = 'vit'
  dtype: Any = jnp.float32
  ops: str = 'fast'

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, *, deterministic: bool):
    width = inputs_kv.shape[-1]
    head_dim = width // self.num_heads
    heads_shape = (self.num_heads, head_dim)
    qkv_init = fused_qkv_xavier_uniform if self.init_scheme == 'mae' else xavier_uniform

    def project(name, x):
      """x (batch, tokens, D) -> (batch, tokens, heads, head_dim)."""
      kernel, bias = _DenseGeneralParams((width,), heads_shape, qkv_init, name=name)()
      y = x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
      return y.reshape(*x.shape[:-1], *heads_shape)

    # The 1/sqrt(head_dim) scale goes on the queries: tokens x head_dim multiplies
    # instead of tokens x tokens on the logits.
    query = project('query', inputs_q) * jnp.asarray(head_dim**-0.5, self.dtype)
    key = project('key', inputs_kv)
    value = project('value', inputs_kv)
    if self.dropout > 0.0 and not deterministic:
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32)
      probs = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), value)
    else:
      out = ops_lib.dot_product_attention(query, key, value, self.ops)
    kernel, bias = _DenseGeneralParams(heads_shape, (width,), xavier_uniform, name='out')()
    out = out.reshape(*out.shape[:-2], width)
    return out @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def drop_path(x, rate, *, rng):
  """Zeroes whole examples with probability `rate` (may be traced) and rescales the rest."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Returns (x, None) so that the same module can be the body of `nn.scan`.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  use_drop_path: bool = False
  layernorm_epsilon: float = 1e-6
  init_scheme: str = 'vit'
  dtype: Any = jnp.float32
  ops: str = 'fast'

  @nn.compact
  def __call__(self, x, drop_path_rate, deterministic: bool):
    norm = lambda name: ops_lib.norm(self.ops, epsilon=self.layernorm_epsilon,  # noqa: E731
                                     dtype=self.dtype, name=name)

    def residual(x, y):
      if self.use_drop_path and not deterministic:
        y = drop_path(y, drop_path_rate, rng=self.make_rng('dropout'))
      return x + y

    y = norm('LayerNorm_0')(x)
    y = Attention(self.num_heads, self.attention_dropout, self.init_scheme, self.dtype,
                  self.ops, name='MultiHeadDotProductAttention_1')(
                      y, y, deterministic=deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = residual(x, y)
    y = norm('LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.init_scheme, self.dtype, self.ops,
                 name='MlpBlock_3')(y, deterministic=deterministic)
    return residual(x, y), None


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding `pos_embedding` of shape (1, tokens, width)."""

  @nn.compact
  def __call__(self, x):
    posemb = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                        (1,) + x.shape[1:], jnp.float32)
    return x + posemb.astype(x.dtype)


class Encoder(nn.Module):
  """The Transformer trunk: position embedding, dropout, blocks, final LayerNorm.

  Attributes:
    depth: number of blocks.
    num_heads, mlp_dim: block sizes.
    posemb: 'learn' (parameter `posembed_input/pos_embedding`), 'sincos2d' (fixed MAE
      table, zero for the prefix tokens) or 'none' (the caller added it).
    grid: (rows, cols) of the patch grid, for 'sincos2d'.
    num_prefix_tokens: tokens before the patches (class token).
    final_norm: apply `encoder_norm` at the end.
    drop_path: stochastic-depth rate of the last block; block i gets i/(depth-1) of it.
    scan: run the blocks with `nn.scan` (parameters stacked under `encoderblock`).
    remat_policy: 'none', 'full' (save nothing) or a name in `jax.checkpoint_policies`.
    ops: 'fast' or 'reference' kernels, see ops.py.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  posemb: str = 'learn'
  grid: tuple[int, int] = (14, 14)
  num_prefix_tokens: int = 1
  final_norm: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layernorm_epsilon: float = 1e-6
  scan: bool = False
  remat_policy: str = 'none'
  init_scheme: str = 'vit'
  dtype: Any = jnp.float32
  ops: str = 'fast'

  @nn.compact
  def __call__(self, x, *, train: bool):
    deterministic = not train
    if self.posemb == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      table = sincos2d_table(self.grid, x.shape[-1])
      table = np.pad(table, ((self.num_prefix_tokens, 0), (0, 0)))
      x = x + jnp.asarray(table, x.dtype)[None]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    block_cls = EncoderBlock
    if self.remat_policy != 'none':
      policy = (None if self.remat_policy == 'full'
                else getattr(jax.checkpoint_policies, self.remat_policy))
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan, static_argnums=(3,),
                           policy=policy)
    block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                        attention_dropout=self.attention_dropout,
                        use_drop_path=self.drop_path > 0.0,
                        layernorm_epsilon=self.layernorm_epsilon,
                        init_scheme=self.init_scheme, dtype=self.dtype, ops=self.ops)
    rates = np.linspace(0.0, self.drop_path, self.depth, dtype=np.float32)
    if self.scan:
      scanned = nn.scan(block_cls, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(0, nn.broadcast), length=self.depth)
      x, _ = scanned(name='encoderblock', **block_kwargs)(x, jnp.asarray(rates), deterministic)
    else:
      for i in range(self.depth):
        x, _ = block_cls(name=f'encoderblock_{i}', **block_kwargs)(x, float(rates[i]),
                                                                     deterministic)
    if self.final_norm:
      x = ops_lib.norm(self.ops, epsilon=self.layernorm_epsilon, dtype=self.dtype,
                       name='encoder_norm')(x)
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead): a learned probe attends to tokens."""
  num_heads: int
  mlp_dim: int
  layernorm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  ops: str = 'fast'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    probe = self.param('probe', xavier_uniform, (1, 1, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
    x = Attention(self.num_heads, dtype=self.dtype, ops=self.ops,
                  name='MultiHeadDotProductAttention_0')(probe, x, deterministic=True)
    y = ops_lib.norm(self.ops, epsilon=self.layernorm_epsilon, dtype=self.dtype,
                     name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, ops=self.ops, name='MlpBlock_0')(
        y, deterministic=True)
    return x[:, 0]

"""An independent NumPy implementation of MAE's forward pass and loss.

Written from the algorithm of facebookresearch/mae (models_mae.py), in float64, with
no code shared with vit_jax: it reads our parameter tree by name only. Used by the
MAE tests and by the interop tests of official checkpoints.
"""

import math

import numpy as np


def _erf(x):
  return np.vectorize(math.erf)(x)


def gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def dense(x, p):
  return x @ p['kernel'] + p['bias']


def attention(x, p, num_heads):
  tokens, width = x.shape[-2:]
  head_dim = width // num_heads

  def heads(name):  # (batch, tokens, heads, head_dim)
    kernel = p[name]['kernel'].reshape(width, width)
    return (x @ kernel + p[name]['bias'].reshape(width)).reshape(
        x.shape[0], tokens, num_heads, head_dim)

  q, k, v = heads('query'), heads('key'), heads('value')
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(x.shape[0], tokens, width)
  return out @ p['out']['kernel'].reshape(width, width) + p['out']['bias']


def block(x, p, num_heads):
  x = x + attention(layer_norm(x, p['LayerNorm_0']), p['MultiHeadDotProductAttention_1'],
                    num_heads)
  mlp = p['MlpBlock_3']
  return x + dense(gelu(dense(layer_norm(x, p['LayerNorm_2']), mlp['Dense_0'])), mlp['Dense_1'])


def sincos_1d(width, positions):
  omega = 1.0 / 10000**(np.arange(width // 2) / (width / 2.0))
  out = np.outer(positions.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_with_cls(width, grid_size):
  """MAE's get_2d_sincos_pos_embed(width, grid_size, cls_token=True)."""
  grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                               np.arange(grid_size, dtype=np.float64))
  emb = np.concatenate([sincos_1d(width // 2, grid_w), sincos_1d(width // 2, grid_h)], axis=1)
  return np.concatenate([np.zeros((1, width)), emb], axis=0)


def patchify_nchw(imgs, p):
  """MAE's patchify on (N, 3, H, W): einsum('nchpwq->nhwpqc')."""
  n, c, hgt, _ = imgs.shape
  h = w = hgt // p
  x = imgs.reshape(n, c, h, p, w, p)
  x = np.einsum('nchpwq->nhwpqc', x)
  return x.reshape(n, h * w, p * p * c)


def mae_forward(params, images_nhwc, noise, *, patch_size, num_heads, decoder_num_heads,
                mask_ratio, norm_pix_loss):
  """Returns (loss, pred, mask) as models_mae.MaskedAutoencoderViT.forward does."""
  params = _to_float64(params)
  imgs = np.transpose(np.asarray(images_nhwc, np.float64), (0, 3, 1, 2))
  n = imgs.shape[0]
  p = patch_size
  target = patchify_nchw(imgs, p)
  num_patches = target.shape[1]
  grid_size = int(round(math.sqrt(num_patches)))

  # forward_encoder
  kernel = params['embedding']['kernel']  # (p, p, C, D): conv weight in HWIO
  width = kernel.shape[-1]
  x = target @ kernel.reshape(-1, width) + params['embedding']['bias']
  pos = sincos_2d_with_cls(width, grid_size)
  x = x + pos[None, 1:]
  len_keep = int(num_patches * (1 - mask_ratio))
  ids_shuffle = np.argsort(noise, axis=1, kind='stable')
  ids_restore = np.argsort(ids_shuffle, axis=1, kind='stable')
  ids_keep = ids_shuffle[:, :len_keep]
  x = np.take_along_axis(x, ids_keep[..., None], axis=1)
  mask = np.ones((n, num_patches))
  mask[:, :len_keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  cls = params['cls'] + pos[None, :1]
  x = np.concatenate([np.broadcast_to(cls, (n, 1, width)), x], axis=1)
  trunk = params['Transformer']
  depth = sum(k.startswith('encoderblock_') for k in trunk)
  for i in range(depth):
    x = block(x, trunk[f'encoderblock_{i}'], num_heads)
  x = layer_norm(x, trunk['encoder_norm'])

  # forward_decoder
  x = dense(x, params['decoder_embed'])
  dec_width = x.shape[-1]
  mask_tokens = np.broadcast_to(params['mask_token'], (n, num_patches + 1 - x.shape[1], dec_width))
  x_ = np.concatenate([x[:, 1:], mask_tokens], axis=1)
  x_ = np.take_along_axis(x_, ids_restore[..., None], axis=1)
  x = np.concatenate([x[:, :1], x_], axis=1)
  x = x + sincos_2d_with_cls(dec_width, grid_size)[None]
  dec = params['Decoder']
  depth = sum(k.startswith('encoderblock_') for k in dec)
  for i in range(depth):
    x = block(x, dec[f'encoderblock_{i}'], decoder_num_heads)
  x = layer_norm(x, dec['encoder_norm'])
  pred = dense(x, params['decoder_pred'])[:, 1:]

  # forward_loss
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.e-6)**.5
  loss = ((pred - target)**2).mean(-1)
  loss = (loss * mask).sum() / mask.sum()
  return loss, pred, mask


def _to_float64(tree):
  if isinstance(tree, dict):
    return {k: _to_float64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)

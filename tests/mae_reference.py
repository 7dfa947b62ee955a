"""An independent NumPy implementation of MAE's forward pass and loss.

Written from the algorithm of facebookresearch/mae (models_mae.py), in float64, with
no code shared with vit_jax. `mae_forward` reads our parameter tree by name;
`mae_forward_official` reads an official PyTorch state dict by its own names and
layouts, so that the interop tests check our import of official checkpoints against it.
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

  out = attend(heads('query'), heads('key'), heads('value'))
  return out @ p['out']['kernel'].reshape(width, width) + p['out']['bias']


def attend(q, k, v):
  """Softmax attention of (batch, tokens, heads, head_dim) arrays -> (batch, tokens, width)."""
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', probs, v)
  return out.reshape(*out.shape[:2], -1)


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


def random_masking(x, noise, mask_ratio):
  """MAE's random_masking: keeps the tokens of least noise; returns (x_kept, mask, ids_restore)."""
  n, num_patches = noise.shape
  len_keep = int(num_patches * (1 - mask_ratio))
  ids_shuffle = np.argsort(noise, axis=1, kind='stable')
  ids_restore = np.argsort(ids_shuffle, axis=1, kind='stable')
  ids_keep = ids_shuffle[:, :len_keep]
  x = np.take_along_axis(x, ids_keep[..., None], axis=1)
  mask = np.ones((n, num_patches))
  mask[:, :len_keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  return x, mask, ids_restore


def unshuffle_with_mask_tokens(x, mask_token, ids_restore):
  """Appends mask tokens to the encoded (cls + visible) tokens and undoes the shuffle."""
  n, num_patches = ids_restore.shape
  mask_tokens = np.broadcast_to(mask_token, (n, num_patches + 1 - x.shape[1], x.shape[-1]))
  x_ = np.concatenate([x[:, 1:], mask_tokens], axis=1)
  x_ = np.take_along_axis(x_, ids_restore[..., None], axis=1)
  return np.concatenate([x[:, :1], x_], axis=1)


def forward_loss(target, pred, mask, norm_pix_loss):
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.e-6)**.5
  loss = ((pred - target)**2).mean(-1)
  return (loss * mask).sum() / mask.sum()


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
  x, mask, ids_restore = random_masking(x, noise, mask_ratio)
  cls = params['cls'] + pos[None, :1]
  x = np.concatenate([np.broadcast_to(cls, (n, 1, width)), x], axis=1)
  trunk = params['Transformer']
  depth = sum(k.startswith('encoderblock_') for k in trunk)
  for i in range(depth):
    x = block(x, trunk[f'encoderblock_{i}'], num_heads)
  x = layer_norm(x, trunk['encoder_norm'])

  # forward_decoder
  x = unshuffle_with_mask_tokens(dense(x, params['decoder_embed']), params['mask_token'],
                                 ids_restore)
  x = x + sincos_2d_with_cls(x.shape[-1], grid_size)[None]
  dec = params['Decoder']
  depth = sum(k.startswith('encoderblock_') for k in dec)
  for i in range(depth):
    x = block(x, dec[f'encoderblock_{i}'], decoder_num_heads)
  x = layer_norm(x, dec['encoder_norm'])
  pred = dense(x, params['decoder_pred'])[:, 1:]

  return forward_loss(target, pred, mask, norm_pix_loss), pred, mask


# The official PyTorch model, read by its own parameter names (models_mae.py, timm 0.3 Block):
# Linear weights are (out, in), query/key/value are one fused `qkv` Linear, the patch
# embedding is a Conv2d weight (D, C, p, p), and the fixed position embeddings are the
# `pos_embed`/`decoder_pos_embed` tensors of the state dict.


def torch_linear(x, state, name):
  return x @ state[f'{name}.weight'].T + state[f'{name}.bias']


def torch_layer_norm(x, state, name, eps=1e-6):
  return layer_norm(x, {'scale': state[f'{name}.weight'], 'bias': state[f'{name}.bias']}, eps)


def torch_block(x, state, name, num_heads):
  """timm's Block: x + attn(norm1(x)), then x + mlp(norm2(x)), with a fused qkv Linear."""
  batch, tokens, width = x.shape
  qkv = torch_linear(torch_layer_norm(x, state, f'{name}.norm1'), state, f'{name}.attn.qkv')
  qkv = qkv.reshape(batch, tokens, 3, num_heads, width // num_heads)
  x = x + torch_linear(attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), state,
                       f'{name}.attn.proj')
  y = gelu(torch_linear(torch_layer_norm(x, state, f'{name}.norm2'), state, f'{name}.mlp.fc1'))
  return x + torch_linear(y, state, f'{name}.mlp.fc2')


def mae_forward_official(state, images_nhwc, noise, *, num_heads, decoder_num_heads, mask_ratio,
                         norm_pix_loss):
  """Returns (loss, pred, mask) of MaskedAutoencoderViT.forward from its state dict.

  Args:
    state: {official name: array} as in the `model` entry of an official MAE checkpoint
      (cls_token, pos_embed, patch_embed.proj, blocks.i, norm, decoder_embed, mask_token,
      decoder_pos_embed, decoder_blocks.i, decoder_norm, decoder_pred).
    images_nhwc: (batch, H, W, C) images; noise: (batch, num_patches).
  """
  state = {k: np.asarray(v, np.float64) for k, v in state.items()}
  imgs = np.transpose(np.asarray(images_nhwc, np.float64), (0, 3, 1, 2))
  conv = state['patch_embed.proj.weight']  # (D, C, p, p)
  width, channels, p, _ = conv.shape
  n, _, height, width_px = imgs.shape
  rows, cols = height // p, width_px // p
  # A stride-p convolution, then flatten(2).transpose(1, 2): tokens in row-major order.
  x = np.einsum('ncipjq,dcpq->nijd', imgs.reshape(n, channels, rows, p, cols, p), conv)
  x = x.reshape(n, rows * cols, width) + state['patch_embed.proj.bias']

  # forward_encoder
  pos = state['pos_embed']
  x, mask, ids_restore = random_masking(x + pos[:, 1:], noise, mask_ratio)
  cls = np.broadcast_to(state['cls_token'] + pos[:, :1], (n, 1, width))
  x = np.concatenate([cls, x], axis=1)
  depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
  for i in range(depth):
    x = torch_block(x, state, f'blocks.{i}', num_heads)
  x = torch_layer_norm(x, state, 'norm')

  # forward_decoder
  x = unshuffle_with_mask_tokens(torch_linear(x, state, 'decoder_embed'), state['mask_token'],
                                 ids_restore)
  x = x + state['decoder_pos_embed']
  depth = len({k.split('.')[1] for k in state if k.startswith('decoder_blocks.')})
  for i in range(depth):
    x = torch_block(x, state, f'decoder_blocks.{i}', decoder_num_heads)
  pred = torch_linear(torch_layer_norm(x, state, 'decoder_norm'), state, 'decoder_pred')[:, 1:]

  target = patchify_nchw(imgs, p)
  return forward_loss(target, pred, mask, norm_pix_loss), pred, mask


def _to_float64(tree):
  if isinstance(tree, dict):
    return {k: _to_float64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)

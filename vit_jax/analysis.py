"""The ViT paper's analyses of a trained model (Dosovitskiy et al. 2020, section 4.5).

  embedding_components   the top principal components of the patch-embedding filters (Fig. 7 left)
  cosine_similarity      similarity of position embeddings, each patch against all (Fig. 7 centre)
  mean_attention_distance  attention-weighted image distance per head and layer (Fig. 7 right)
  attention_rollout      attention flow from the input to the output (Abnar and Zuidema 2020, Fig. 6)

The model is not changed for this: `attention_weights` runs it with Flax's
`capture_intermediates`, keeping only what each block feeds its attention (the output of
`LayerNorm_0`), and recomputes softmax(q k^T / sqrt(head_dim)) from that and the block's
query/key parameters. The training path never captures anything, so it costs nothing.
The rest are pure NumPy functions of those weights and of the parameters.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLOCK_PREFIX = 'encoderblock_'
# What a block gives its self-attention: vit_jax/models/layers.py EncoderBlock applies
# `LayerNorm_0` and passes its output as queries, keys and values.
ATTENTION_INPUT = 'LayerNorm_0'
ATTENTION = 'MultiHeadDotProductAttention_1'
# Relative gap under which two pixels of a principal component count as equally large
# (float64 SVDs agree to ~1e-15 across processors; real filters differ far more).
SIGN_TOLERANCE = 1e-9


# --------------------------------------------------------------------- attention weights


def _keep_attention_inputs(module: nn.Module, method_name: str) -> bool:
  """capture_intermediates filter: each encoder block's LayerNorm_0, and the trunk's output."""
  if method_name != '__call__':
    return False
  path = module.scope.path if module.scope is not None else ()
  if module.name == ATTENTION_INPUT and len(path) >= 2 and path[-2].startswith(BLOCK_PREFIX):
    return path[0] == 'Transformer'
  return path == ('Transformer',)  # the tokens a MAP head attends to


def _captured(intermediates, *path):
  """The single value captured at `path` (Flax stores a tuple of the calls' outputs)."""
  node = intermediates
  for name in path:
    node = node[name]
  return node['__call__'][0]


def _attention_probs(inputs_q, inputs_kv, attention_params):
  """softmax(q k^T / sqrt(head_dim)) -> (batch, heads, queries, keys) float32.

  inputs: (batch, tokens, width); attention_params: a MultiHeadDotProductAttention
  subtree with query/key kernels (width, heads, head_dim) and biases (heads, head_dim).
  """
  head_dim = attention_params['query']['kernel'].shape[-1]
  query = jnp.einsum('btd,dhk->bhtk', inputs_q, attention_params['query']['kernel'],
                     precision='highest') + attention_params['query']['bias'][:, None]
  key = jnp.einsum('btd,dhk->bhtk', inputs_kv, attention_params['key']['kernel'],
                   precision='highest') + attention_params['key']['bias'][:, None]
  logits = jnp.einsum('bhqk,bhtk->bhqt', query, key, precision='highest') / np.sqrt(head_dim)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def attention_weights(model, params, images):
  """Every block's self-attention on `images`, and the MAP head's if the model has one.

  Args:
    model: an unscanned ViT (scan=False); use float32 for exact weights.
    params: its parameters (unscanned).
    images: (batch, H, W, C) as the model takes them.
  Returns:
    (blocks, pool): blocks (depth, batch, heads, tokens, tokens) float32, rows are
    queries and sum to 1; pool (batch, heads, tokens) the attention of the MAP probe
    over the final tokens, or None for pool 'tok' and 'gap'.
  """
  if getattr(model, 'scan', False):
    raise ValueError('attention_weights needs an unscanned model (scan=False); convert the '
                     'parameters with param_tree.unscan_params.')
  _, state = model.apply({'params': params}, images, train=False,
                         capture_intermediates=_keep_attention_inputs,
                         mutable=['intermediates'])
  captured = state['intermediates']
  trunk = params['Transformer']
  blocks = []
  for i in range(model.depth):
    block = f'{BLOCK_PREFIX}{i}'
    normed = _captured(captured['Transformer'], block, ATTENTION_INPUT).astype(jnp.float32)
    blocks.append(_attention_probs(normed, normed, trunk[block][ATTENTION]))
  pool = None
  if model.pool == 'map':
    tokens = _captured(captured, 'Transformer').astype(jnp.float32)
    head = params['MAPHead_0']
    probe = jnp.broadcast_to(head['probe'], (tokens.shape[0], 1, tokens.shape[-1]))
    pool = _attention_probs(probe, tokens, head['MultiHeadDotProductAttention_0'])[:, :, 0]
  return jnp.stack(blocks), pool


# ------------------------------------------------------------------------- the numbers


def patch_distances(grid: tuple[int, int], patch_size: int) -> np.ndarray:
  """(N, N) distances in pixels between the centres of the N = rows*cols patches (row-major)."""
  rows, cols = grid
  row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  centres = np.stack([row.ravel(), col.ravel()], axis=1).astype(np.float64) * patch_size
  return np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))


def mean_attention_distance(weights, grid: tuple[int, int], patch_size: int,
                            num_prefix_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The ViT paper's "attention distance": how far in the image each head looks.

  For every patch query, the distance in pixels to every patch key weighted by the
  attention; averaged over the queries (and any leading batch axes). Prefix tokens
  (the class token) have no place in the image: queries from them are left out, and
  the attention to them is set aside and the rest renormalised, so that a head that
  looks mostly at the class token is judged by where its remaining attention goes.

  Args:
    weights: (..., heads, tokens, tokens) attention, rows summing to 1.
    grid: (rows, cols) of patches; tokens = num_prefix_tokens + rows * cols.
    patch_size: pixels per patch side.
    num_prefix_tokens: tokens before the patches.
  Returns:
    (distance, prefix_share): both (heads,) averaged over queries and leading axes;
    distance in pixels, prefix_share the mean attention given to prefix tokens.
  """
  weights = np.asarray(weights, np.float64)
  p = num_prefix_tokens
  expected = p + grid[0] * grid[1]
  if weights.shape[-1] != expected or weights.shape[-2] != expected:
    raise ValueError(f'attention of shape {weights.shape} does not fit {p} prefix tokens and '
                     f'a {grid[0]}x{grid[1]} grid ({expected} tokens).')
  to_patches = weights[..., p:, p:]
  patch_mass = to_patches.sum(-1)
  share = 1.0 - patch_mass
  per_query = (to_patches * patch_distances(grid, patch_size)).sum(-1) / np.maximum(
      patch_mass, 1e-12)
  axes = tuple(range(weights.ndim - 3)) + (weights.ndim - 2,)  # keep the heads axis
  return per_query.mean(axis=axes), share.mean(axis=axes)


def attention_rollout(weights, *, residual: bool = True) -> np.ndarray:
  """Attention rollout (Abnar and Zuidema 2020): how much each input token reaches each output.

  Each layer's attention is averaged over heads, the residual connection is accounted
  for as 0.5 A + 0.5 I (rows renormalised), and the layers are multiplied from the first:
  R = A_L ... A_2 A_1.

  Args:
    weights: (layers, ..., heads, tokens, tokens), rows summing to 1.
    residual: add the identity for the residual connection.
  Returns:
    (..., tokens, tokens): row t is how the output token t draws on the input tokens.
  """
  weights = np.asarray(weights, np.float64)
  tokens = weights.shape[-1]
  rollout = np.broadcast_to(np.eye(tokens), weights.shape[1:-3] + (tokens, tokens))
  for layer in weights:
    attention = layer.mean(axis=-3)
    if residual:
      attention = 0.5 * attention + 0.5 * np.eye(tokens)
      attention = attention / attention.sum(-1, keepdims=True)
    rollout = attention @ rollout
  return rollout


def rollout_to_patches(rollout, *, pool: str, num_prefix_tokens: int,
                       pool_attention=None) -> np.ndarray:
  """What the model's output draws on each patch, from `attention_rollout`'s (..., T, T).

  'tok': the class token's row. 'gap': the mean of the patch tokens' rows (the pooled
  output is their mean). 'map': the MAP probe's attention over the final tokens
  (`pool_attention`, (..., heads, T), averaged over heads; no residual) times the rollout.
  Returns (..., num_patches), summing to the share that reaches patches (not prefix tokens).
  """
  p = num_prefix_tokens
  if pool == 'tok':
    row = rollout[..., 0, :]
  elif pool == 'gap':
    row = rollout[..., p:, :].mean(axis=-2)
  elif pool == 'map':
    if pool_attention is None:
      raise ValueError("pool='map' needs the MAP head's attention (pool_attention).")
    probe = np.asarray(pool_attention, np.float64).mean(axis=-2)
    row = np.einsum('...t,...ts->...s', probe, rollout)
  else:
    raise ValueError(f'pool {pool!r} is not one of tok, gap, map.')
  return row[..., p:]


def cosine_similarity(vectors) -> np.ndarray:
  """(N, D) -> (N, N) cosine similarity of every row with every other; the diagonal is 1."""
  vectors = np.asarray(vectors, np.float64)
  unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
  return unit @ unit.T


def embedding_components(kernel, num_components: int) -> tuple[np.ndarray, np.ndarray]:
  """Principal components of the patch-embedding filters (the paper's Fig. 7 left).

  The D filters are the columns of the (p*p*C, D) embedding matrix; their principal
  components are directions in pixel space, shown as p x p x C images.

  Args:
    kernel: (p, p, C, D) patch-embedding kernel.
    num_components: how many, at most min(p*p*C, D).
  Returns:
    (components (k, p, p, C) unit-norm, explained (k,) share of the filters' variance).
  """
  kernel = np.asarray(kernel, np.float64)
  p_h, p_w, channels, width = kernel.shape
  filters = kernel.reshape(-1, width).T  # (D, p*p*C): one filter per row
  centred = filters - filters.mean(axis=0)
  _, singular, directions = np.linalg.svd(centred, full_matrices=False)
  variance = singular**2
  k = min(num_components, directions.shape[0])
  explained = variance[:k] / variance.sum()
  # SVD's signs are arbitrary: make each component's largest pixel positive, so that
  # figures of two models can be compared. Pixels whose magnitudes tie within rounding
  # (a symmetric filter) are decided by the last bit of the SVD, which differs between
  # processors' BLAS: the first pixel within SIGN_TOLERANCE of the largest decides.
  components = directions[:k]
  magnitude = np.abs(components)
  near_largest = magnitude >= magnitude.max(axis=1, keepdims=True) * (1 - SIGN_TOLERANCE)
  deciding = near_largest.argmax(axis=1)  # the first True
  signs = np.where(components[np.arange(k), deciding] < 0, -1.0, 1.0)
  components = components * signs[:, None]
  return components.reshape(k, p_h, p_w, channels), explained


def uniform_attention_distance(grid: tuple[int, int], patch_size: int) -> float:
  """The mean attention distance of a head attending uniformly to all patches (pixels)."""
  return float(patch_distances(grid, patch_size).mean())


def attention_summary(model, params, images, *, batch_size: int = 16) -> dict:
  """Mean attention distances and rollouts over `images`, a batch at a time.

  Returns {'distance': (depth, heads) pixels, 'prefix_share': (depth, heads),
  'rollout': (num_images, num_patches)} as numpy arrays.
  """
  grid, p = model.grid, model.num_prefix_tokens
  distance = prefix_share = 0.0
  rollouts = []
  weights_of = jax.jit(functools.partial(attention_weights, model))
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    blocks, pool = jax.device_get(weights_of(params, chunk))
    layer_distance, layer_share = zip(*(mean_attention_distance(layer, grid, model.patch_size, p)
                                        for layer in blocks))
    distance = distance + np.stack(layer_distance) * len(chunk)
    prefix_share = prefix_share + np.stack(layer_share) * len(chunk)
    rollouts.append(rollout_to_patches(attention_rollout(blocks), pool=model.pool,
                                       num_prefix_tokens=p, pool_attention=pool))
  return {'distance': distance / len(images), 'prefix_share': prefix_share / len(images),
          'rollout': np.concatenate(rollouts)}

"""Public checkpoints in and out: vit_jax/AugReg/big_vision `.npz`, timm, official MAE.

Three steps, each usable alone, each a module of this package (re-exported here):

  fmt, arrays = load_checkpoint_file('ViT-B_16.npz')    # readers.py: any file -> our names
  params, report = fit_params(arrays, init_params)       # fitting.py: -> any size/head/layout
  export_timm_safetensors(params, model, 'model.safetensors')   # export.py; export_npz(...)

torch_names.py holds the table of PyTorch names (timm, MAE) that reading and export share;
common.py the error type and key lists for messages.

The training loop's `config.init.path` reads these files (and Orbax checkpoints) through
vit_jax.checkpoint.load_params and adapts them with fit_params; scripts/convert_checkpoint.py
converts between all of them.

Formats read, told apart by file type and content:
  'vit_jax'     .npz of google-research/vision_transformer and AugReg: flat '/' keys
                ('Transformer/encoderblock_0/...'), optionally under 'opt/target/'.
  'big_vision'  .npz of big_vision: keys under 'params/' (or 'params/img/', the image
                tower of a two-tower model), linen block names (MultiHeadDotProductAttention_0,
                LayerNorm_1, MlpBlock_0), 'pos_embedding' without a class-token row,
                blocks possibly stacked under 'encoderblock' (scan).
  'timm'        timm ViT state dicts (.safetensors, .pth/.bin/.pt), also inside a 'model'
                or 'state_dict' entry: patch_embed.proj, cls_token, pos_embed,
                blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm or fc_norm,
                pre_logits.fc (timm < 0.9), head, attn_pool (MAP head).
  'mae'         official facebookresearch/mae checkpoints (the 'model' entry of the .pth):
                the encoder-only release and the full encoder+decoder one. Their fixed
                position embeddings are checked against layers.sincos2d_table and dropped.

State dicts do not record the number of heads, so query/key/value/out arrays read from
PyTorch files come with merged heads ((D, D) kernels, (D,) biases); fit_params splits
them into the model's (D, heads, D/heads) layout.

Security: loading never runs code from a file. .npz is read with allow_pickle=False,
PyTorch files with torch.load(weights_only=True) (argparse.Namespace allowed, which the
official MAE and timm training scripts store as 'args'), safetensors by its own parser.
Anything else is a one-line CheckpointError naming the file.
"""

from vit_jax.interop.common import POSEMB, CheckpointError
from vit_jax.interop.export import (export_npz, export_timm_safetensors, timm_kwargs,
                                    to_timm_state_dict)
from vit_jax.interop.fitting import HEAD, MAE_TO_VIT, FitReport, fit_params, model_fields
from vit_jax.interop.readers import load_checkpoint_file

__all__ = ['POSEMB', 'HEAD', 'MAE_TO_VIT', 'CheckpointError', 'FitReport', 'load_checkpoint_file',
           'fit_params', 'model_fields', 'export_npz', 'export_timm_safetensors', 'timm_kwargs',
           'to_timm_state_dict']

"""Shared parts of the config files in configs/: the loop's keys and argument parsing.

A config file's `get_config(arg)` takes 'key=value' pairs separated by commas, e.g.
`configs/mae_pretrain.py:model=L/16,data=imagenet2012`, or a single word such as
`demo`. Every key of a config is read by the code (tests/test_main.py checks it, nested
keys included).
"""

import importlib.util
import os

import ml_collections

from vit_jax import data, interop, objectives, optim


VARIANTS = ('demo',)  # the bare words a config file's :ARG accepts


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (configs/FILE.py), unlocked."""
  spec = importlib.util.spec_from_file_location(
      '_vit_jax_config_' + os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, *, variants: tuple = VARIANTS,
              **defaults) -> ml_collections.ConfigDict:
  """'model=B/16,data=imagenet2012' -> ConfigDict; a bare word 'demo' -> variant='demo'.

  Only the keys given in `defaults` are accepted, with their types, and only the bare
  words in `variants`.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      key, value = 'variant', key
      if value not in variants:
        raise ValueError(f'Unknown config argument {value!r} in {arg!r}: a bare word names a '
                         f'variant, one of {variants}; other arguments are key=value with '
                         f'keys {sorted(k for k in defaults if k != "variant")}.')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.')
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ('1', 'true', 'yes')
    elif isinstance(default, (int, float)):
      value = type(default)(value)
    parsed[key] = value
  return ml_collections.ConfigDict(parsed)


# Parameters, optimizer state and EMA weights split over the `data` axis (FSDP, ZeRO-3):
# each device stores and updates 1/N of them; the train and eval steps gather the
# parameters whole once per step (vit_jax/train.py), so the gradient all-reduce becomes a
# reduce-scatter and an all-gather of the same bytes. Same losses as data parallelism
# (tests/test_train.py). The paper recipes use it: the AdamW update of replicated
# parameters is memory-bound, and pre-flight of MAE-L/16 on TPU v4 at 64 images per chip
# gave 162.2 ms per step replicated, 137.0 ms with only the optimizer state split
# (ZeRO-1) and 126.1 ms (8.62 GiB instead of 11.28) with this (docs/preflight.md).
FSDP_OVER_DATA = [('.*', 'fsdp:data')]
# Their mesh: on several TPU slices, one replica of the split state per slice, so that
# only the gradient all-reduce crosses the slow network between slices; on one slice,
# the `data` axis alone (`replica` has size 1). See vit_jax/sharding.py.
PAPER_MESH = [('replica', 'slices'), ('data', -1)]


def base_config(objective: str = 'classification') -> ml_collections.ConfigDict:
  """The keys every config has, with defaults for one machine, and those `objective` reads.

  objective: 'mae', 'classification' or 'linear_probe' (see vit_jax/objectives.py, whose
    CONFIG_KEYS say which keys each adds: label smoothing and mixup for classifiers, the
    number of reconstructions drawn at the end for MAE).
  """
  config = ml_collections.ConfigDict()
  config.objective = objective
  config.model_name = 'ViT-B/16'  # see vit_jax.models.get_model
  config.model = ml_collections.ConfigDict()  # field overrides for get_model
  config.data = data.default_data_config()
  config.global_batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 1.0
  config.total_steps = 0  # > 0 overrides num_epochs
  config.grad_accum_steps = 1
  config.optim = optim.default_optim_config()
  config.seed = 0
  # Initialise from a checkpoint (fine-tuning): an Orbax workdir/step folder, or a
  # .npz/.safetensors/.pth file (see vit_jax/interop/). Regexes match parameter paths.
  config.init = ml_collections.ConfigDict(dict(
      path='',
      reinit=('head/.*',),  # keep these freshly initialised (a new head)
      allow_missing=('fc_norm/.*', 'head/.*', 'pre_logits/.*'),  # may be absent from the file
      ignore_unexpected=(),  # entries of the file that the model does not use
  ))
  # Sharding: the mesh axes, and (regex, rule) pairs for parameters and optimizer
  # state ('replicate' or 'fsdp:AXIS'), see vit_jax/sharding.py.
  config.mesh = [('data', -1)]
  config.sharding_rules = [('.*', 'replicate')]  # or FSDP_OVER_DATA
  config.log_every_steps = 50
  config.eval_every_steps = 0  # 0: evaluate at the end only
  # Probe-free measures of the frozen features at each evaluation (vit_jax/fewshot.py):
  # few-shot linear accuracy with these shots per class (the ViT paper's: (1, 5, 10, 25))
  # as eval/fewshot_<k>shot, and k-NN accuracy with this k (0: off; 20 is the usual
  # monitor of MAE pretraining) as eval/knn_top1. Both fit on the images of train_split
  # ('': data.train_split), read with the evaluation transform, and score the eval split.
  # Few-shot accuracy is the mean over `draws` draws of shots, seeded fewshot.seed +
  # 1000 * config.seed, + 1, ...: each run seed draws its own shots.
  config.fewshot = ml_collections.ConfigDict(dict(
      shots=(), knn_k=0, train_split='', l2_reg=2.0**10, seed=0, draws=3))
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.keep_checkpoint_every_steps = 0  # > 0: also keep every such step
  # (first, last): a jax.profiler trace of these steps into workdir/tensorboard, for
  # TensorBoard's profile plugin; () for none.
  config.profile_steps = ()
  config.update(objectives.objective_class(objective).CONFIG_KEYS)
  return config


# The demo: the built-in Fashion-MNIST subset and a small ViT (patch 4 on 28x28, 49 patches)
# that trains in minutes on a laptop CPU.
DEMO_ENCODER = dict(image_size=28, channels=1, width=128, depth=4, num_heads=4, mlp_dim=512)
DEMO_DECODER = dict(decoder_width=64, decoder_depth=2, decoder_num_heads=4, decoder_mlp_dim=256)


def use_demo_data(config: ml_collections.ConfigDict) -> None:
  config.data.name = data.DEMO_DATASET
  config.data.mean, config.data.std = (0.286,), (0.353,)  # of Fashion-MNIST's pixels
  config.data.eval_crop_fraction = 1.0
  config.global_batch_size = 256
  config.eval_batch_size = 400  # 5 batches for the 2,000 test images, 8 devices divide it


# TFDS names of the evaluation split where it is not 'test' (ImageNet's 'test' is unlabelled).
EVAL_SPLITS = {'imagenet2012': 'validation', 'imagenet2012_subset': 'validation',
               'imagenette': 'validation'}


def use_dataset(config: ml_collections.ConfigDict, name: str, *,
                imagenet_preprocessing: bool) -> None:
  """A paper variant's dataset: its evaluation split and, for the MAE recipes, ImageNet's
  mean/std and bicubic resizing (torchvision's Normalize and interpolation=3)."""
  config.data.name = name
  config.data.eval_split = EVAL_SPLITS.get(name, 'test')
  if imagenet_preprocessing:
    config.data.mean, config.data.std = data.IMAGENET_MEAN, data.IMAGENET_STD
    config.data.interpolation = 'bicubic'


def mae_finetune_init() -> ml_collections.ConfigDict:
  """config.init for a classifier initialised from an MAE (Orbax workdir or official .pth):
  interop.MAE_TO_VIT's regexes."""
  return ml_collections.ConfigDict(dict(path='', **interop.MAE_TO_VIT))

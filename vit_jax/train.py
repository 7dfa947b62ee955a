"""The training loop, for every objective (see objectives.py).

Sections, top to bottom: checks and set-up; model, optimizer and sharded state; the
jitted steps; resume or initialise; the loop (log, evaluate, checkpoint, stop on
SIGTERM). The same code runs on one CPU, on 8 simulated devices and on a pod: batches
are global arrays split over the mesh, and jit with explicit shardings does the rest.
"""

import dataclasses
import functools
import json
import math
import re
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from vit_jax import (checkpoint, data, fewshot, interop, metrics, models, objectives, optim,
                     sharding)


def num_train_steps(config, num_train_examples: int) -> tuple[int, float]:
  """(total optimizer steps, steps per epoch) from total_steps or num_epochs."""
  steps_per_epoch = num_train_examples / config.global_batch_size
  epoch_steps = math.ceil(config.num_epochs * steps_per_epoch)
  total = config.total_steps or epoch_steps
  if total <= 0:
    raise ValueError(f'The run has no steps: total_steps={config.total_steps}, '
                     f'num_epochs={config.num_epochs}.')
  return total, steps_per_epoch


def check_loop_keys(config, workdir: str = '') -> None:
  """Intervals and counts that must be positive, regexes that must compile, paths that
  must exist: refused here rather than hours into a run. init.path need not exist for a
  run that resumes from its own checkpoints in `workdir` (it is not read again)."""
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'grad_accum_steps', 'global_batch_size', 'eval_batch_size'):
    if config[key] < 1:
      raise ValueError(f'{key}={config[key]} must be at least 1.')
  for key in ('eval_every_steps', 'keep_checkpoint_every_steps', 'total_steps'):
    if config[key] < 0:
      raise ValueError(f'{key}={config[key]} must be 0 (off) or positive.')
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
    raise ValueError(f'profile_steps={profile} must be () or (first, last) with '
                     '1 <= first <= last, e.g. (10, 12).')
  for key in ('reinit', 'allow_missing', 'ignore_unexpected'):
    for pattern in config.init[key]:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'init.{key}: {pattern!r} is not a regex ({e}).') from None
  if (config.init.path and not epath.Path(config.init.path).exists()
      and not (workdir and checkpoint.has_saved_steps(workdir))):
    raise ValueError(f'init.path={config.init.path!r} does not exist.')


class FeatureProbe:
  """config.fewshot at each evaluation: few-shot linear and k-NN accuracy of the frozen
  features (vit_jax.fewshot), fit on the images of fewshot.train_split and scored on the
  eval split, both read with the evaluation transform. Every process computes the same
  numbers from the gathered features."""

  def __init__(self, config, model, objective, mesh, info):
    probe = config.fewshot
    self.shots = tuple(int(k) for k in probe.shots)
    self.knn_k = int(probe.knn_k)
    self.train_split = probe.train_split or config.data.train_split
    self.l2_reg = float(probe.l2_reg)
    self.draws = int(probe.get('draws', fewshot.DRAWS))
    self.seed = int(probe.seed)
    self.first_seed = fewshot.first_draw_seed(self.seed, int(config.seed))
    if (any(k < 1 for k in self.shots) or self.knn_k < 0 or self.l2_reg < 0
        or not 1 <= self.draws <= fewshot.SEEDS_PER_RUN):
      raise ValueError(f'fewshot: shots={self.shots} must be positive, draws={self.draws} '
                       f'within 1-{fewshot.SEEDS_PER_RUN}, '
                       f'knn_k={self.knn_k} 0 (off) or positive and l2_reg={self.l2_reg} '
                       'non-negative; e.g. --config.fewshot.shots="(1, 5, 10, 25)" '
                       '--config.fewshot.knn_k=20.')
    self.enabled = bool(self.shots or self.knn_k)
    self.config, self.model, self.mesh = config, model, mesh
    self.num_classes = info.num_classes
    if self.enabled:  # the split exists and can hold the shots (each class: at eval)
      size = info.split_size(self.train_split)
      if self.shots and size < max(self.shots) * info.num_classes:
        raise ValueError(f'fewshot.train_split={self.train_split!r} has {size} images, fewer '
                         f'than {max(self.shots)} shots for each of {info.num_classes} '
                         'classes; give a larger split or fewer shots.')
    self.features = jax.jit(lambda params, model_state, images: objective.features(
        model, {'params': params, **model_state}, images))

  def _features(self, params, model_state, split):
    """(features, labels) of every example of `split`, on every process."""
    features, labels = [], []
    for batch in data.eval_iterator(self.config.data, global_batch_size=self.config.eval_batch_size,
                                    mesh=self.mesh, image_size=self.model.image_size,
                                    channels=self.model.channels, split=split):
      f, label, mask = multihost_utils.process_allgather(
          (self.features(params, model_state, batch['image']), batch['label'], batch['mask']),
          tiled=True)
      keep = np.asarray(mask) > 0
      features.append(np.asarray(f)[keep])
      labels.append(np.asarray(label)[keep])
    return np.concatenate(features), np.concatenate(labels)

  def evaluate(self, prefix: str, params, model_state) -> dict:
    if not self.enabled:
      return {}
    train = self._features(params, model_state, self.train_split)
    test = self._features(params, model_state, None)
    results = {}
    for shots in self.shots:
      results[f'{prefix}/fewshot_{shots}shot'] = fewshot.fewshot_accuracy(
          *train, *test, shots=shots, num_classes=self.num_classes, l2_reg=self.l2_reg,
          seed=self.first_seed, draws=self.draws)
    if self.knn_k:
      results[f'{prefix}/knn_top1'] = fewshot.knn_accuracy(
          *train, *test, num_classes=self.num_classes, k=self.knn_k)
    return results


def check_micro_batches(config, mesh) -> None:
  micro = config.global_batch_size // max(config.grad_accum_steps, 1)
  if config.global_batch_size % config.grad_accum_steps or micro % mesh.devices.size:
    raise ValueError(f'global_batch_size={config.global_batch_size} split into '
                     f'grad_accum_steps={config.grad_accum_steps} micro-batches gives '
                     f'{config.global_batch_size / config.grad_accum_steps:g} examples, not a '
                     f'multiple of the {mesh.devices.size} devices.')


def split_micro_batches(batch, num_micro: int):
  """(B, ...) -> (num_micro, B/num_micro, ...), micro-batch i = examples i, i+k, i+2k, ...

  Strided so that every micro-batch keeps its share on every device (devices hold
  contiguous blocks of the batch).
  """
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1),
      batch)


class Preemption:
  """A preemption notice (SIGTERM) becomes 'save and stop' at a step all processes agree on.

  One process: a Python SIGTERM handler sets a flag. Several processes: JAX's
  preemption sync manager (started by jax.distributed.initialize) catches SIGTERM on any
  process and picks the next step that every process reaches; `reached` is then True
  on all of them at that same step.
  """

  def __init__(self):
    self.requested = False
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call once per step, on every process."""
    if self.multiprocess:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if not self.multiprocess:
      signal.signal(signal.SIGTERM, self._previous)


def write_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / 'config.json'  # also gs://
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists() and path.read_text() != text:
    print(f'Note: the config differs from the one in {path}; writing the new one.')
  path.write_text(text)


@dataclasses.dataclass
class Steps:
  """The jitted functions of a run and the layout of its train state."""
  init: Callable  # () -> fresh state from config.seed, sharded
  make_state: Callable  # variables -> state (fresh optimizer), jit it with out_shardings
  train: Callable  # (state, batch) -> (state, metrics); donates state
  eval: Callable  # (params, model_state, batch) -> summed metrics
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_shardings: Any


def build_steps(config, model, objective, mesh, schedule) -> Steps:
  """Optimizer, sharded state layout and jitted steps for `model` under `objective`."""
  root_key = jax.random.key(config.seed)
  init_key, step_key, eval_key = jax.random.split(root_key, 3)
  init_variables = functools.partial(models.init_variables, model)

  abstract_variables = jax.eval_shape(init_variables, init_key)
  tx = optim.make_optimizer(config.optim, abstract_variables['params'], schedule,
                            trainable=objective.trainable)

  def make_state(variables):
    variables = dict(variables)
    params = variables.pop('params')
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'model_state': variables,
            'ema_params': params if config.optim.ema_decay else {}}

  abstract_state = jax.eval_shape(lambda k: make_state(init_variables(k)), init_key)
  state_shardings = sharding.tree_shardings(abstract_state, config.sharding_rules, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  # FSDP stores parameters split over devices; the step gathers them whole before use.
  # Left to itself, XLA's sharding propagation split activations like the parameters
  # instead (MAE-L/16 with FSDP over 64 TPU v4 chips: 139 GiB of temporaries per chip).
  gather = jax.tree.map(lambda _: replicated, abstract_state['params'])

  def loss_and_grads(params, model_state, batch, key):
    def loss_fn(params):
      params = jax.lax.with_sharding_constraint(params, gather)
      return objective.train_loss(model, {'params': params, **model_state}, batch, key)
    (_, (step_metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, step_metrics, {**model_state, **updates}

  def train_step(state, batch):
    key = jax.random.fold_in(step_key, state['step'])
    params = state['params']
    if config.grad_accum_steps == 1:
      grads, step_metrics, model_state = loss_and_grads(params, state['model_state'], batch, key)
    else:
      def accumulate(carry, xs):
        grad_sum, metric_sum, model_state = carry
        micro_batch, index = xs
        micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_sharding)
        grads, step_metrics, model_state = loss_and_grads(
            params, model_state, micro_batch, jax.random.fold_in(key, index))
        return (jax.tree.map(jnp.add, grad_sum, grads),
                jax.tree.map(jnp.add, metric_sum, step_metrics), model_state), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      metric_zeros = {'loss': jnp.zeros((), jnp.float32)}
      (grads, step_metrics, model_state), _ = jax.lax.scan(
          accumulate, (zeros, metric_zeros, state['model_state']),
          (split_micro_batches(batch, config.grad_accum_steps),
           jnp.arange(config.grad_accum_steps)))
      grads = jax.tree.map(lambda g: g / config.grad_accum_steps, grads)
      step_metrics = jax.tree.map(lambda m: m / config.grad_accum_steps, step_metrics)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    params = optax.apply_updates(params, updates)
    ema = state['ema_params']
    if config.optim.ema_decay:
      decay = config.optim.ema_decay
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'model_state': model_state, 'ema_params': ema}
    step_metrics = {f'train/{k}': v for k, v in step_metrics.items()}
    step_metrics |= {'train/grad_norm': optax.global_norm(grads),
                     'train/lr': schedule(state['step'])}
    return new_state, step_metrics

  def eval_step(params, model_state, batch):
    params = jax.lax.with_sharding_constraint(params, gather)
    return objective.eval_sums(model, {'params': params, **model_state}, batch, eval_key)

  init = jax.jit(lambda: make_state(init_variables(init_key)), out_shardings=state_shardings)
  return Steps(
      init=init, make_state=make_state,
      train=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval=jax.jit(eval_step, out_shardings=replicated),
      abstract_state=abstract_state, state_shardings=state_shardings)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart_from_scratch: bool = False) -> dict:
  """Trains and evaluates as the config says; resumes from workdir. Returns final metrics.

  `restart_from_scratch`: start at step 0 when the workdir's checkpoints all fail to read
  back (without it that is an error; see checkpoint.Checkpointer.restore_latest)."""
  # ---------------------------------------------------------------- checks and set-up
  # Everything that can be wrong with the config is found here, before any compile.
  check_loop_keys(config, workdir)
  objective = objectives.get_objective(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.global_batch_size, mesh, 'global_batch_size')
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  check_micro_batches(config, mesh)
  data.ensure_prepared(config.data)
  info = data.dataset_info(config.data)
  model = models.from_config(config, **objective.model_overrides(info.num_classes))
  data.check_dataset(config.data, info, image_size=model.image_size, channels=model.channels)
  total_steps, steps_per_epoch = num_train_steps(config, info.split_size(config.data.train_split))
  probe = FeatureProbe(config, model, objective, mesh, info)

  # ------------------------------------------- model, optimizer and sharded train state
  schedule = optim.learning_rate(config.optim, config.global_batch_size, total_steps,
                                 steps_per_epoch)
  steps = build_steps(config, model, objective, mesh, schedule)
  # init.path: read and checked against the model before any compile; not read again by a
  # run that resumes from its own checkpoints (a restart after each preemption).
  check_initial = functools.partial(checkpoint.check_initial_params, config.init, model,
                                    steps.abstract_state['params'])
  initial = None
  if config.init.path and not checkpoint.has_saved_steps(workdir):
    initial = check_initial()
  # Only now: bad input leaves the workdir as it was.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)

  def evaluate(state) -> dict:
    results = {}
    weights = [('eval', state['params'])]
    if config.optim.ema_decay:
      weights.append(('eval_ema', state['ema_params']))
    for prefix, params in weights:
      sums = None
      for batch in data.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                      mesh=mesh, image_size=model.image_size,
                                      channels=model.channels):
        batch_sums = jax.device_get(steps.eval(params, state['model_state'], batch))
        sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
      results |= {f'{prefix}/{k}': v for k, v in objectives.summarize_eval(sums).items()}
      results |= probe.evaluate(prefix, params, state['model_state'])
    return results

  # -------------------------------------------------------- resume, or initialise
  checkpoints = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                        keep_every=config.keep_checkpoint_every_steps)
  train_iter = data.train_iterator(config.data, global_batch_size=config.global_batch_size,
                                   mesh=mesh, image_size=model.image_size,
                                   channels=model.channels, seed=config.seed)
  progress_print = print if jax.process_index() == 0 else (lambda *a, **k: None)
  restored = checkpoints.restore_latest(steps.abstract_state, log=progress_print,
                                        restart_from_scratch=restart_from_scratch)
  if restored:
    start_step, state, data_state = restored
    train_iter.set_state(data_state)
    progress_print(f'Resumed from {checkpoints.directory}/{start_step}.')
  else:
    start_step = 0
    state = steps.init()
    if config.init.path:  # (read here when every checkpoint failed and the run restarts)
      state = load_initial_params(config, model, state, steps, initial or check_initial(),
                                  progress_print)
  del initial  # the host copy of init.path's arrays
  writer = metrics.MetricWriter(workdir, resume_step=start_step)

  # ------------------------------------------------------------------------- the loop
  compile_start = time.perf_counter()
  first_batch = next(train_iter)
  compiled_step = steps.train.lower(state, first_batch).compile()
  flops_per_step, flops_source = metrics.step_flops(
      compiled_step, model, config.objective, config.global_batch_size,
      accumulation=config.grad_accum_steps > 1, num_devices=mesh.devices.size)
  peak, peak_source = metrics.peak_flops_per_device(model.dtype)
  progress = metrics.Progress(total_steps=total_steps, global_batch_size=config.global_batch_size,
                              flops_per_step=flops_per_step, peak_flops=peak * mesh.devices.size,
                              start_step=start_step)
  progress.print(f'{config.model_name} ({objective.__class__.__name__}) on '
                 f'{mesh.devices.size} {jax.devices()[0].platform} device(s), mesh '
                 f'{dict(mesh.shape)}; {total_steps} steps of {config.global_batch_size}; '
                 f'step compiled in {time.perf_counter() - compile_start:.1f}s, '
                 f'{flops_per_step / 1e9:.2f} GFLOP per step ({flops_source}), '
                 f'peak from {peak_source}.')
  preemption = Preemption()
  profiler = metrics.StepProfiler(workdir, config.profile_steps)
  pending = []  # (step, metrics on device) since the last log
  in_flight = None  # the metrics of the step dispatched last
  final = {}
  step = start_step
  batch = first_batch
  error = None  # what ends the loop, if anything
  try:
    while step < total_steps:
      if batch is None:
        batch = next(train_iter)
      profiler.start(step + 1)
      state, step_metrics = compiled_step(state, batch)
      # At most two steps in flight: the host waits for the step before this one. Without
      # it the host ran up to a whole logging interval ahead of the device (50 steps, 70 s,
      # seen on CPU), and a SIGTERM was acted on only after all of them, while a
      # preemption's grace period is about 30 s. One queued step keeps the device busy.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
      in_flight = step_metrics
      batch = None
      step += 1
      profiler.stop(step, step_metrics)
      pending.append((step, step_metrics))
      is_last = step == total_steps
      stop = preemption.reached(step)
      if step % config.log_every_steps == 0 or is_last or stop:
        scalars = summarize_train(pending, checkpoints.latest_step())
        pending = []
        scalars |= progress.measure(step)
        writer.write(step, scalars)
        progress.print(progress.line(step, scalars))
      # Save before evaluating: a preemption's grace period is short, and a failing
      # evaluation must not cost the last steps.
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        if pending:
          summarize_train(pending, checkpoints.latest_step())  # never save a NaN state
        checkpoints.save(step, state, train_iter.get_state())
      checkpoints.check()  # a failed background save stops the run here, at once
      if stop and not is_last:
        checkpoints.wait()
        progress.print(f'SIGTERM: saved step {step} to {checkpoints.directory}; exiting. '
                       'Run the same command to resume.')
        break
      if (config.eval_every_steps and step % config.eval_every_steps == 0) or is_last:
        eval_start = time.perf_counter()
        final = evaluate(state)
        progress.exclude(time.perf_counter() - eval_start)  # images/s counts training only
        writer.write(step, final)
        progress.print(f'step {step}: ' + ', '.join(
            f'{k} {v:.4f}' for k, v in final.items() if not k.endswith('count')))
    if step < total_steps:  # stopped by SIGTERM
      return {'step': step, 'preempted': 1.0}
    if not final:  # resumed a finished run: evaluate what it left
      final = evaluate(state)
    note = objective.finish(model, mesh, state, workdir, writer)
    if note:
      progress.print(note)
  except metrics.WorkdirUnwritable as e:
    error = checkpoints.stop_for(e)
    raise error from None
  except BaseException as e:  # pylint: disable=broad-except  (re-raised)
    error = e
    raise
  finally:
    profiler.close()
    preemption.close()
    checkpoints.close()
    try:  # nothing more is sent where the workdir is what failed
      writer.close(upload=not isinstance(error, checkpoint.CheckpointFailure))
    except metrics.WorkdirUnwritable as e:
      if error is None:  # else the error on its way out says what stopped the run
        raise checkpoints.stop_for(e) from None
  return final | {'step': step}


def summarize_train(pending, last_checkpoint) -> dict:
  """Means of the pending step metrics; stops the run on a NaN or inf loss or gradient."""
  values = jax.device_get([m for _, m in pending])
  for (step, _), step_values in zip(pending, values):
    for name in ('train/loss', 'train/grad_norm'):
      value = float(step_values[name])
      if not np.isfinite(value):
        raise FloatingPointError(
            f'{name} is {value} at step {step}; stopping. The last checkpoint (step '
            f'{last_checkpoint}) was written before it; lower the learning rate or check '
            'the data, then rerun to resume from it.')
  return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def load_initial_params(config, model, state, steps: Steps, initial, log):
  """Replaces freshly initialised parameters with `initial` = (source, params) of
  config.init.path (checkpoint.check_initial_params), adapted."""
  source, loaded = initial
  # Gathered, not device_get: with FSDP across hosts no process holds every shard.
  fresh, model_state = multihost_utils.process_allgather(
      (state['params'], state['model_state']), tiled=True)
  params, report = interop.fit_params(
      loaded, fresh, reinit=tuple(config.init.reinit),
      allow_missing=tuple(config.init.allow_missing),
      ignore_unexpected=tuple(config.init.ignore_unexpected),
      new_grid=getattr(model, 'grid', None), source=config.init.path)
  log(f'Initialised from {source}: {report}')
  variables = {'params': params, **model_state}
  return jax.jit(steps.make_state, out_shardings=steps.state_shardings)(variables)


# Data keys added after runs were written, with what those runs did: image_folder 1.1.0
# composited transparent pixels onto white at preparation.
DATA_KEYS_OF_OLDER_RUNS = {'transparent_background': 'white'}


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json; data keys it predates get DATA_KEYS_OF_OLDER_RUNS' values,
  else their defaults, so that tools read a run of any age as it ran."""
  config = ml_collections.ConfigDict(
      json.loads((epath.Path(workdir) / 'config.json').read_text()))
  if 'data' in config:
    stored = config.data.to_dict()
    config.data = data.default_data_config()
    config.data.update({k: v for k, v in DATA_KEYS_OF_OLDER_RUNS.items() if k not in stored})
    config.data.update(stored)
  return config

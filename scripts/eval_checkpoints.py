r"""Few-shot linear and k-NN accuracy of every kept checkpoint of a run, against its hours.

  python scripts/eval_checkpoints.py --workdir=runs/mae_vs_scratch/pretrain/base \
      --output=docs/results/headline/pretraining_checkpoints.json

For each step folder of WORKDIR/checkpoints: the frozen features of the run's model (an
MAE encoder's class token, a classifier's pre-logits; `Objective.features`), the
few-shot linear accuracy (--shots per class from the training split) and the k-NN
accuracy (--knn_k) on the evaluation split, both as `vit_jax.fewshot` computes them at a
run's evaluations (`config.fewshot`), here for checkpoints already written, so the
curve of a pretraining run that did not monitor them can be drawn afterwards. The hours
are the run's training up to the checkpoint (metrics.training_seconds: step time times
steps, without the compile and the evaluations). The data split and the preprocessing
are the run's (config.json); --eval_split and --train_split override.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import platform  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir with kept checkpoints.')
_SHOTS = flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'Few-shot images per class.')
_KNN_K = flags.DEFINE_integer('knn_k', 20, 'Neighbours of the k-NN classifier (0: off).')
_TRAIN_SPLIT = flags.DEFINE_string('train_split', '', "Split the shots and neighbours come "
                                   "from ('': the run's data.train_split).")
_EVAL_SPLIT = flags.DEFINE_string('eval_split', '', "Split scored ('': the run's eval split).")
_STEPS = flags.DEFINE_list('steps', [], 'Only these steps (default: every kept one).')
_OUTPUT = flags.DEFINE_string('output', '', 'Write the rows here as JSON.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  platform.skip_absent_tpu()  # as vit_jax.main: no libtpu start-up notes without a TPU
  platform.use_every_cpu_core()
  platform.hide_notes_that_are_not_problems()
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from vit_jax import checkpoint, data, metrics, models, objectives, sharding, train

  workdir = _WORKDIR.value
  config = train.load_config_json(workdir)
  with config.unlocked():
    config.fewshot.shots = tuple(int(k) for k in _SHOTS.value)
    config.fewshot.knn_k = _KNN_K.value
    config.fewshot.train_split = _TRAIN_SPLIT.value
    if _EVAL_SPLIT.value:
      config.data.eval_split = _EVAL_SPLIT.value
  steps = checkpoint.saved_steps(workdir)
  if _STEPS.value:
    wanted = [int(s) for s in _STEPS.value]
    missing = sorted(set(wanted) - set(steps))
    if missing:
      raise app.UsageError(f'--steps: {missing} are not checkpoints of {workdir} '
                           f'(kept: {steps}).')
    steps = wanted
  if not steps:
    raise app.UsageError(f'{workdir}/checkpoints holds no step folder.')
  objective = objectives.get_objective(config)
  mesh = sharding.make_mesh(config.mesh)
  info = data.dataset_info(config.data)
  model = models.from_config(config, **objective.model_overrides(info.num_classes))
  probe = train.FeatureProbe(config, model, objective, mesh, info)
  logged = metrics.training_seconds(metrics.read_metrics(workdir))
  rows = []
  for step in steps:
    start = time.perf_counter()
    _, variables = checkpoint.load_params(os.path.join(workdir, 'checkpoints', str(step)),
                                          model_state=True)
    params = variables.pop('params')
    results = jax.device_get(probe.evaluate('eval', params, variables))
    row = {'step': step, 'epoch': step * config.global_batch_size
           / info.split_size(config.data.train_split),
           # Between two logged steps, by linear interpolation.
           'train_hours': metrics.seconds_at(logged, step) / 3600,
           **{k: float(v) for k, v in results.items()}}
    rows.append(row)
    print(json.dumps(row) + f'  ({time.perf_counter() - start:.0f} s)', flush=True)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump({'workdir': workdir, 'train_split': probe.train_split,
                 'eval_split': config.data.eval_split, 'knn_k': probe.knn_k,
                 'shots': list(probe.shots), 'fewshot_draws': probe.draws,
                 'fewshot_seed': probe.seed, 'fewshot_l2_reg': probe.l2_reg,
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)

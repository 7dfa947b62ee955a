#!/usr/bin/env bash
# The main job on the built-in data (Fashion-MNIST test images, shipped in the package):
# MAE pretraining, then fine-tuning a classifier from it. With COMPARE=1 it also trains
# the same classifier from scratch for the same steps (without layer-wise decay).
#
#   PYTHON=.venv/bin/python bash scripts/demo.sh        # RUNS=DIR puts the workdirs elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
runs=${RUNS:-runs}
start=$(date +%s)

"$python" -m vit_jax.main --config=configs/mae_pretrain.py:demo --workdir="$runs/mae_demo"
"$python" -m vit_jax.main --config=configs/mae_finetune.py:demo --workdir="$runs/finetune_demo" \
  --config.init.path="$runs/mae_demo"
if [ "${COMPARE:-0}" = 1 ]; then
  # Layer-wise decay would hold back the lower blocks of a random start: off for scratch.
  "$python" -m vit_jax.main --config=configs/mae_finetune.py:demo --workdir="$runs/scratch_demo" \
    --config.optim.layer_decay=1.0
fi

"$python" - "$runs" "$(( $(date +%s) - start ))" <<'PY'
import json, os, sys
runs, seconds = sys.argv[1], int(sys.argv[2])
def last_eval(workdir):
  rows = [json.loads(l) for l in open(os.path.join(runs, workdir, 'metrics.jsonl'))]
  return [r for r in rows if 'eval/count' in r][-1]
mae, finetune = last_eval('mae_demo'), last_eval('finetune_demo')
print(f'\nDone in {seconds // 60} min {seconds % 60} s.')
print(f'MAE pretraining: eval reconstruction loss {mae["eval/loss"]:.4f} (step {mae["step"]}).')
print(f'Fine-tuned from it: top-1 {finetune["eval/top1"]:.2%}, top-5 {finetune["eval/top5"]:.2%} '
      f'on {int(finetune["eval/count"])} test images (step {finetune["step"]}).')
if os.path.exists(os.path.join(runs, 'scratch_demo', 'metrics.jsonl')):
  scratch = last_eval('scratch_demo')
  print(f'Same classifier from scratch: top-1 {scratch["eval/top1"]:.2%}.')
print(f'Reconstructions: {os.path.join(runs, "mae_demo", "reconstructions.png")}')
print(f'TensorBoard: tensorboard --logdir {runs}   (metrics also in {runs}/*/metrics.jsonl)')
PY

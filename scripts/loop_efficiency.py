r"""The training loop's speed against its step's speed alone, for the studies' recipes.

  python scripts/loop_efficiency.py --variants=mae,finetune,probe --steps=200 \
      --output=docs/results/loop_efficiency.json

For each variant of configs/fashion_mnist.py (the full Fashion-MNIST, prepared with
`python scripts/prepare_dataset.py --dataset=fashion_mnist`):
  - the step alone: scripts/benchmark.py on the variant's config (a synthetic batch
    placed as the loop places its batches; the best of 10 timed steps);
  - the loop: vit_jax.main on the real data for --steps steps in a temporary workdir (no
    evaluation or checkpoint until the last step); its images/s is the median of the
    logged intervals after the first (which holds the compile);
and their ratio. The loop pays for what the step alone does not: reading, decoding and
augmenting the images, moving them into global arrays, the host's work between steps,
logging. Run it with nothing else on the machine; it prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_alone(config: str) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    output = os.path.join(tmp, 'rows.jsonl')
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'),
                    f'--config={config}', '--num_classes=10', '--steps=10', '--warmup=3',
                    f'--output={output}'], check=True, capture_output=True, text=True)
    with open(output) as f:
      return json.loads(f.readline())['images_per_s']


def loop(config: str, steps: int, log_every: int) -> tuple[float, list[float]]:
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--config={config}',
                    f'--workdir={workdir}', f'--config.total_steps={steps}',
                    f'--config.log_every_steps={log_every}', '--config.eval_every_steps=0',
                    f'--config.checkpoint_every_steps={steps}'],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [row['perf/images_per_sec'] for row in map(json.loads, f)
               if 'perf/images_per_sec' in row]
  return statistics.median(rates[1:]), rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='mae,finetune,probe')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--log_every', type=int, default=25)
  parser.add_argument('--output', default='')
  args = parser.parse_args()
  results = []
  for variant in args.variants.split(','):
    config = f'{ROOT}/configs/fashion_mnist.py:{variant}'
    alone = step_alone(config)
    median, rates = loop(config, args.steps, args.log_every)
    results.append({'variant': variant, 'step_alone_images_per_s': alone,
                    'loop_images_per_s': median, 'loop_intervals': rates,
                    'ratio': median / alone})
    print(f'{variant}: step alone {alone:.0f} images/s, loop {median:.0f} '
          f'({median / alone:.0%})', flush=True)
  print('\n| recipe | step alone (images/s) | loop (images/s) | loop / step |')
  print('|---|---|---|---|')
  for r in results:
    print(f'| fashion_mnist.py:{r["variant"]} | {r["step_alone_images_per_s"]:.0f} | '
          f'{r["loop_images_per_s"]:.0f} | {r["ratio"]:.0%} |')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()

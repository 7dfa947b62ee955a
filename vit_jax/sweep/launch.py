"""Cluster launch lines for a sweep: SLURM job arrays and TPU-VM commands."""

import shlex

from vit_jax.sweep.grid import Member


def launch_lines(members: list[Member]) -> str:
  """A SLURM script (one job array per stage, each after the previous stage succeeded)
  and the TPU-VM lines (one run after another on every worker), in dependency order."""
  stages = list(dict.fromkeys(m.stage.name for m in members))
  out = ['#!/usr/bin/env bash',
         '# SLURM: run this on the login node. One job array per stage; a stage starts when',
         '# the previous one succeeded. Add your #SBATCH lines (partition, GPUs, time).',
         'set -euo pipefail', 'previous=""']
  for stage in stages:
    stage_members = [m for m in members if m.stage.name == stage]
    out += ['previous=$(sbatch --parsable ${previous:+--dependency=afterok:$previous} <<\'EOF\'',
            '#!/usr/bin/env bash', f'#SBATCH --job-name={stage}',
            f'#SBATCH --array=0-{len(stage_members) - 1}', 'case $SLURM_ARRAY_TASK_ID in']
    out += [f'  {i}) srun {shlex.join(m.command())} ;;' for i, m in enumerate(stage_members)]
    out += ['esac', 'EOF', ')', f'echo "{stage}: job $previous"']
  out += ['', '# TPU VM (a pod slice): each run on all workers at once, one run after another.',
          '# Set TPU_NAME and ZONE; the workdir must be one every worker sees.']
  for m in members:
    out.append('gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
               f'--command={shlex.quote("cd vit_jax && " + shlex.join(m.command()))}')
  return '\n'.join(out)

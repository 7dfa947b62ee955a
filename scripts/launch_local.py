r"""Starts N JAX processes on this machine, M CPU devices each: a pod launch on a laptop.

  python scripts/launch_local.py --num_processes=2 --devices_per_process=4 -- \
      python -m vit_jax.main --config=configs/mae_pretrain.py:demo --workdir=runs/mp

Each process gets VIT_JAX_COORDINATOR / VIT_JAX_NUM_PROCESSES / VIT_JAX_PROCESS_ID (read
by vit_jax.main), JAX_PLATFORMS=cpu and XLA_FLAGS with the device count. Output lines
are prefixed with the process id. If one process fails, the others are stopped and the
launcher exits with its code, its last line saying that the same command resumes. The launcher prints each child's pid, so a test can send
one of them SIGTERM, as a preemption notice reaches one host of a pod.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def relay(stream, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    sys.stdout.write(f'{prefix}{line}')
    sys.stdout.flush()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--port', type=int, default=0, help='Coordinator port; 0 picks one.')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='The command every process runs, after --.')
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('Give the command to run after --.')
  port = args.port or free_port()
  children = []
  for process_id in range(args.num_processes):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices_per_process}',
               VIT_JAX_COORDINATOR=f'localhost:{port}',
               VIT_JAX_NUM_PROCESSES=str(args.num_processes),
               VIT_JAX_PROCESS_ID=str(process_id))
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    print(f'[launch] process {process_id} pid {child.pid}', flush=True)
    threading.Thread(target=relay, args=(child.stdout, f'[{process_id}] '), daemon=True).start()
    children.append(child)

  # The launcher itself forwards SIGTERM/SIGINT to every process.
  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  exit_code = 0
  while any(child.poll() is None for child in children):
    for process_id, child in enumerate(children):
      code = child.poll()
      if code not in (None, 0) and exit_code == 0:
        exit_code = code
        print(f'[launch] process {process_id} failed with exit code {code}; stopping the others.',
              flush=True)
        # SIGKILL: a SIGTERM would start a preemption save that waits for the dead process.
        for other in children:
          if other.poll() is None:
            other.kill()
    time.sleep(0.2)
  for process_id, child in enumerate(children):
    if child.returncode and not exit_code:
      exit_code = child.returncode
  time.sleep(0.3)  # let the relay threads print the last lines
  if exit_code:  # the last line of the log: what happened and what to do
    print(f'[launch] a process was lost (exit code {exit_code}; negative: killed by that '
          'signal). Run the same command to resume from the last checkpoint that every '
          'process completed.', flush=True)
  return exit_code


if __name__ == '__main__':
  sys.exit(main())

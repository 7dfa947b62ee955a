"""Metrics out: `metrics.jsonl`, TensorBoard events, a progress line; throughput and MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step, with
`step` and names like `train/loss`, `eval/top1`. On resume, lines of steps after the
restored checkpoint (logged by the interrupted run) are dropped, so the file reads as
one uninterrupted run.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vit_jax import checkpoint, models

# Dense peak FLOP/s per chip for the compute dtype, from the datasheets (H100 and H200:
# the SXM parts). float32 on these GPUs is the TF32 tensor-core peak: XLA's default
# matmul precision runs float32 matmuls in TF32 there.
PEAK_FLOPS = {
    ('H100', 'bfloat16'): 989e12, ('H100', 'float32'): 494e12,
    ('H200', 'bfloat16'): 989e12, ('H200', 'float32'): 494e12,
    ('A100', 'bfloat16'): 312e12, ('A100', 'float32'): 156e12,
    ('TPU v4', 'bfloat16'): 275e12, ('TPU v5 lite', 'bfloat16'): 197e12,
    ('TPU v5p', 'bfloat16'): 459e12, ('TPU v6 lite', 'bfloat16'): 918e12,
}


def measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a float32 size x size matmul on the default backend (best of `repeats`).

  This is the CPU's 'peak': what XLA reaches on the largest dense kernel.
  """
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops_per_device(dtype: str = 'float32') -> tuple[float, str]:
  """(FLOP/s, where the number comes from) for one device of the default backend."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    # The simulated devices share the machine's cores: the peak of one device is the
    # machine's measured rate divided among them.
    rate = measured_matmul_flops() / jax.local_device_count()
    return rate, 'measured f32 matmul'
  kind = device.device_kind
  for (name, peak_dtype), peak in PEAK_FLOPS.items():
    if name in kind and peak_dtype == jnp.dtype(dtype).name:
      return peak, f'datasheet {name} {peak_dtype}'
  return float('nan'), f'unknown peak for {kind}'


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled function, per device, from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


# Model FLOPs by hand (MFU's numerator, as in the papers and PaLM).


def block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of one Transformer block on `tokens` tokens of one example."""
  projections = 2 * tokens * width * (4 * width)  # query, key, value, out
  attention = 2 * (2 * tokens * tokens * width)  # scores q.k, and the weighted sum of values
  mlp = 2 * (2 * tokens * width * mlp_dim)
  return projections + attention + mlp


def _head_flops(model) -> int:
  """Forward FLOPs of a ViT after the encoder: attention pooling, pre_logits, head."""
  width = model.width
  tokens = int(np.prod(model.grid)) + model.num_prefix_tokens
  flops = 0
  if model.pool == 'map':
    # One probe query attends to every token, then a LayerNorm and an MLP on it.
    flops += 2 * width * width + 2 * tokens * width * 2 * width  # q; k and v
    flops += 2 * 2 * tokens * width + 2 * width * width  # scores, values; out
    flops += 2 * 2 * width * model.mlp_dim
  if model.representation_size:
    flops += 2 * width * model.representation_size
  if model.num_classes:
    flops += 2 * _head_features(model) * model.num_classes
  return flops


def _head_features(model) -> int:
  """Inputs of a ViT's `head`: the pre-logits if any, else the width."""
  return model.representation_size or model.width


def forward_flops(model) -> int:
  """Forward matmul FLOPs for one example of a ViT or MAE (vit_jax.models), by hand.

  Counts multiply-adds as 2 FLOPs and only the matmuls: patch embedding, attention
  projections, scores and weighted values, MLP, head (and for MAE the decoder
  embedding and the pixel prediction). Norms, softmax, GELU and the loss are left out,
  as in the papers' and PaLM's MFU convention.
  """
  num_patches = int(np.prod(model.grid))
  patch_dim = model.patch_size**2 * model.channels
  if isinstance(model, models.MAE):
    visible = int(num_patches * (1 - model.mask_ratio))
    encoder_tokens, decoder_tokens = visible + 1, num_patches + 1  # + class token
    return (2 * visible * patch_dim * model.width  # only the visible patches are embedded
            + model.depth * block_flops(encoder_tokens, model.width, model.mlp_dim)
            + 2 * encoder_tokens * model.width * model.decoder_width  # decoder_embed
            + model.decoder_depth * block_flops(decoder_tokens, model.decoder_width,
                                                model.decoder_mlp_dim)
            + 2 * decoder_tokens * model.decoder_width * patch_dim)  # decoder_pred
  tokens = num_patches + model.num_prefix_tokens
  return (2 * num_patches * patch_dim * model.width
          + model.depth * block_flops(tokens, model.width, model.mlp_dim)
          + _head_flops(model))


def train_flops(model, objective: str) -> int:
  """Training FLOPs for one example: 3x forward (backward = 2x forward).

  A linear probe stops gradients just below its head: the forward pass, plus the head's
  weight gradient (no gradient flows to its input).
  """
  if objective == 'linear_probe':
    return forward_flops(model) + 2 * _head_features(model) * model.num_classes
  return 3 * forward_flops(model)


def step_flops(compiled, model, objective: str, global_batch_size: int, *,
               accumulation: bool, num_devices: int) -> tuple[float, str]:
  """(FLOPs of one training step on all devices, where the count comes from) for MFU.

  XLA's count of the compiled step where it sees the model's FLOPs and no more; the
  count by hand where it would not: it counts the body of a loop once (scanned blocks,
  accumulated micro-batches), counts rematerialised forward passes again, and counts
  nothing for cuDNN's fused attention.
  """
  hidden = []
  if model.scan:
    hidden.append('scan')
  if accumulation:
    hidden.append('gradient accumulation')
  if model.remat_policy != 'none':
    hidden.append('remat')
  if models.ops.use_cudnn_attention(model.dtype, model.width // model.num_heads, model.ops):
    hidden.append('cuDNN attention')
  if hidden:
    return (float(train_flops(model, objective) * global_batch_size),
            f'counted by hand: XLA miscounts a step with {" and ".join(hidden)}')
  return compiled_flops(compiled) * num_devices, "XLA's count of the compiled step"


class WorkdirUnwritable(OSError):
  """A file of the workdir could not be written, after the storage library's retries."""

  def __init__(self, path, error: BaseException):
    self.path = str(path)
    super().__init__(f'Writing {self.path} failed ({checkpoint.error_reason(error)})')


class TensorBoard:
  """tensorboardX's SummaryWriter into workdir/tensorboard.

  For a bucket (gs://) the events are written to local disk and the event file is copied
  to the bucket at each flush through etils.epath (gcsfs), as tensorboardX's own bucket
  writer re-uploads its whole buffer at each flush. So every file of a run but the
  checkpoints goes through one library and one retry policy (gcsfs's), and a bucket that
  has gone away fails the flush in this thread, where the run reports it in one line,
  instead of in tensorboardX's writer thread and its exit handler (which retried for
  minutes there)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.remote = epath.Path(workdir) / 'tensorboard' if checkpoint.is_remote(workdir) else None
    self.local = (tempfile.mkdtemp(prefix='vit_jax_tensorboard') if self.remote
                  else os.path.join(workdir, 'tensorboard'))
    self.writer = SummaryWriter(self.local)
    self.closed = False

  def flush(self) -> None:
    self.writer.flush()
    if self.remote is None:
      return
    for name in os.listdir(self.local):
      path = os.path.join(self.local, name)
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          contents = f.read()
        try:
          (self.remote / name).write_bytes(contents)
        except Exception as e:  # pylint: disable=broad-except
          raise WorkdirUnwritable(self.remote / name, e) from e

  def close(self, *, upload: bool = True) -> None:
    """Flushes and closes (once); `upload=False` after the workdir failed: nothing is sent."""
    if self.closed:
      return
    self.closed = True
    self.writer.close()
    if self.remote is not None:
      try:
        if upload:
          self.flush()
      finally:
        shutil.rmtree(self.local, ignore_errors=True)


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only).

  A write that fails (a full disk, a bucket that stays unreachable after gcsfs's retries)
  raises WorkdirUnwritable; after it, closing writes nothing more."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    # Buckets (gs://) cannot append: the lines are kept and the file rewritten.
    self.lines = [] if checkpoint.is_remote(workdir) else None
    self.tensorboard = None
    self.failed = False
    if not self.enabled:
      return
    if resume_step is not None and self.path.exists():
      kept = [line + '\n' for line in self.path.read_text().splitlines()
              if (step := _step_of(line)) is not None and step <= resume_step]
      self.path.write_text(''.join(kept))
      if self.lines is not None:
        self.lines = kept
    self.tensorboard = TensorBoard(workdir)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({'step': int(step), **scalars}) + '\n'
    with self._reporting(self.path):
      if self.lines is None:
        with self.path.open('a') as f:
          f.write(line)
      else:
        self.lines.append(line)
        self.path.write_text(''.join(self.lines))
    for name, value in scalars.items():
      self.tensorboard.writer.add_scalar(name, value, step)
    with self._reporting(self.tensorboard.local):
      self.tensorboard.flush()

  def write_image(self, step: int, name: str, image) -> None:
    """An image for TensorBoard's Images tab: uint8 (H, W, 3), or a PNG file's path."""
    if not self.enabled:
      return
    self.tensorboard.writer.add_image(name, image_array(image), int(step), dataformats='HWC')
    with self._reporting(self.tensorboard.local):
      self.tensorboard.flush()

  @contextlib.contextmanager
  def _reporting(self, path):
    try:
      yield
    except WorkdirUnwritable:
      self.failed = True
      raise
    except Exception as e:  # pylint: disable=broad-except
      self.failed = True
      raise WorkdirUnwritable(path, e) from e

  def close(self, *, upload: bool = True) -> None:
    """Closes TensorBoard's writer; `upload=False`: sends nothing more to a bucket."""
    if self.tensorboard is not None:
      tensorboard, self.tensorboard = self.tensorboard, None
      with self._reporting(tensorboard.local):
        tensorboard.close(upload=upload and not self.failed)


def image_array(image) -> np.ndarray:
  """uint8 (H, W, 3) of an array (grey (H, W) repeated) or an image file (also gs://)."""
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with epath.Path(image).open('rb') as f, Image.open(f) as opened:
      image = np.asarray(opened.convert('RGB'))
  image = np.asarray(image, np.uint8)
  return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def write_images(workdir: str, step: int, images: dict) -> None:
  """Adds {name: image} to workdir/tensorboard at `step`, outside a training run (the
  analyses, predictions): TensorBoard shows them beside the run's own."""
  tensorboard = TensorBoard(workdir)
  for name, image in images.items():
    tensorboard.writer.add_image(name, image_array(image), int(step), dataformats='HWC')
  tensorboard.close()


def _step_of(line: str) -> int | None:
  """The step of a metrics line; None for a line cut short by a killed process."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  text = (epath.Path(workdir) / 'metrics.jsonl').read_text()
  return [json.loads(line) for line in text.splitlines()]


def training_seconds(rows: list[dict]) -> list[tuple[int, float]]:
  """(step, seconds of training up to it), from step 0 and at each logged training row:
  the sum of each logging interval's step time times its steps. The loop leaves its
  compile and its evaluations out of the step time (Progress.exclude); the host's work
  between steps, checkpoint saves included, is in it."""
  previous, seconds, out = 0, 0.0, [(0, 0.0)]
  for r in rows:
    if 'train/loss' not in r:
      continue
    if 'perf/step_time' in r:
      seconds += r['perf/step_time'] * (r['step'] - previous)
    previous = r['step']
    out.append((r['step'], seconds))
  return out


def seconds_at(logged: list[tuple[int, float]], step: int) -> float:
  """Training seconds up to `step`, interpolated between the steps of training_seconds."""
  return float(np.interp(step, *zip(*logged)))


class Progress:
  """Throughput, MFU and time left between log steps, and the line a person reads."""

  def __init__(self, *, total_steps: int, global_batch_size: int, flops_per_step: float,
               peak_flops: float, start_step: int):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.flops_per_step = flops_per_step  # for all devices together
    self.peak_flops = peak_flops  # for all devices together
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.enabled = jax.process_index() == 0

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    steps = step - self.last_step
    seconds = max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    if steps <= 0:
      return {}
    step_time = seconds / steps
    return {'perf/images_per_sec': self.global_batch_size / step_time,
            'perf/step_time': step_time,
            'perf/mfu': self.flops_per_step / step_time / self.peak_flops,
            # Constant within a run; with `step` it gives the compute spent so far.
            'perf/flops_per_step': self.flops_per_step}

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of work between steps (an evaluation) out of the step time."""
    self.last_time += seconds

  def line(self, step: int, scalars: dict) -> str:
    parts = [f'step {step}/{self.total_steps}']
    for name, fmt in (('train/loss', 'loss {:.4f}'), ('train/lr', 'lr {:.2e}'),
                      ('perf/images_per_sec', '{:.0f} img/s'), ('perf/mfu', 'MFU {:.1%}')):
      if name in scalars and np.isfinite(scalars[name]):
        parts.append(fmt.format(scalars[name]))
    if 'perf/step_time' in scalars:
      left = int(scalars['perf/step_time'] * (self.total_steps - step))
      parts.append(f'{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left')
    return ' | '.join(parts)

  def print(self, message: str) -> None:
    if self.enabled:
      print(message, file=sys.stdout, flush=True)


class StepProfiler:
  """A `jax.profiler` trace of steps first..last (as counted in the progress line) on
  process 0, into workdir/tensorboard/plugins/profile/ where TensorBoard's profile plugin
  (tensorboard-plugin-profile) reads it."""

  def __init__(self, workdir: str, steps):
    self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
    self.enabled = bool(steps) and jax.process_index() == 0
    self.destination = epath.Path(workdir) / 'tensorboard'
    # The profiler writes local files only; a gs:// workdir gets a copy when it stops.
    self.directory = (tempfile.mkdtemp(prefix='profile') if checkpoint.is_remote(workdir)
                      else str(self.destination))
    self.active = False

  def start(self, step: int) -> None:
    """Call before running step `step` (1 for the first step of a run)."""
    if self.enabled and not self.active and self.first <= step <= self.last:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def stop(self, step: int, outputs) -> None:
    """Call after step `step` with its outputs: ends the trace after the last step."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.enabled = False
      if str(self.destination) != self.directory:
        for folder, _, files in os.walk(self.directory):
          target = self.destination / os.path.relpath(folder, self.directory)
          target.mkdir(parents=True, exist_ok=True)
          for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
              (target / name).write_bytes(f.read())

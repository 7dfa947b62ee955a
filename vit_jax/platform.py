"""What a command starts with: JAX's backends, chosen before JAX starts any, and which
notes of other libraries it shows.

libtpu (requirements-tpu.txt) is installed for the pre-flight, which compiles for TPU
topologies on a machine without a TPU. Installed, it makes every JAX program try to open
a TPU at start-up; where there is none, libtpu prints errors about TPU_WORKER_HOSTNAMES
and a 'Source Location Trace' to stderr before JAX falls back to the CPU. They point at
no problem, so our commands leave the TPU backend out where no TPU chip is attached and
the user has not chosen the platforms (JAX_PLATFORMS, or JAX_FORCE_TPU_INIT).
"""

import logging
import os

# Warnings of other libraries that point at no problem of the run: TFDS recommends OpenCV
# for decoding (PIL does it; the pipeline's threads overlap it), and notes that an image
# folder has a builder configuration of its own (which is how image_folder works).
NOT_A_PROBLEM = ('OpenCV is not installed', 'Using custom data configuration')


def tpu_backend_is_pointless() -> bool:
  """libtpu is installed, no TPU chip is attached, and nothing says to use it anyway."""
  if os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
    return False
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec('libtpu') is None and not os.environ.get('TPU_LIBRARY_PATH'):
    return False
  try:  # JAX's own check (PCI devices of Google's TPU vendor id), as its TPU start-up does.
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    gpu = hardware_utils.has_visible_nvidia_gpu()
  except Exception:  # pylint: disable=broad-except  (moved in another JAX: change nothing)
    return False
  return chips == 0 and not gpu


def _backends_may_change() -> bool:
  """Whether JAX's backends have not started yet (the first jax.devices() or computation
  starts them); False where this JAX does not say (then nothing is changed)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return not xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def skip_absent_tpu() -> None:
  """Leaves the TPU backend out where it is pointless; does nothing once JAX's backends
  have started."""
  if not tpu_backend_is_pointless() or not _backends_may_change():
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')


def cpu_device_count(cores: int) -> int:
  """JAX CPU devices for `cores` cores: the largest power of two not above it, so that
  the configs' batch sizes (powers of two) divide among them."""
  return 1 << (max(cores, 1).bit_length() - 1)


def use_every_cpu_core() -> int | None:
  """One JAX CPU device per core (cpu_device_count), unless the user chose a count
  (JAX_NUM_CPU_DEVICES, or XLA_FLAGS' --xla_force_host_platform_device_count) or JAX's
  backends have started. Returns the count set, or None.

  JAX gives the CPU one device by default, and one device's step does not use two cores
  fully: on a 2-core machine two devices ran the step 1.18-1.40 times faster (MAE
  pretraining 587 -> 821 images/s, fine-tuning 289 -> 344, the same losses). Only the CPU
  backend is changed: on a GPU or TPU host the accelerator stays the default backend."""
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if jax.config.jax_num_cpu_devices != -1 or not _backends_may_change():
    return None
  count = cpu_device_count(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                           else os.cpu_count() or 1)
  jax.config.update('jax_num_cpu_devices', count)
  return count


class DropMessages(logging.Filter):
  """Drops log records whose message starts with one of `prefixes`."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record):
    return not record.getMessage().startswith(self.prefixes)


def hide_notes_that_are_not_problems() -> None:
  """Drops NOT_A_PROBLEM warnings from absl's log (where TFDS writes them)."""
  logging.getLogger('absl').addFilter(DropMessages(NOT_A_PROBLEM))

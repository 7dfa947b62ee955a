"""Faults a long run meets and bad input a new user types, each injected and its outcome
asserted: a corrupt or unfinished newest checkpoint, no usable checkpoint, a full disk
during a save, unknown keys and files on the command line, image folders as users make
them. The README's claims about bad input are tested here.
"""

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_main import (ROOT, demo_config, env8, losses, main_command, run_in_process,
                             tiny_flags)
from vit_jax import checkpoint, data, train
from vit_jax.data import builders, datasets, pipeline

TOTAL_STEPS = 8


def fault_config(data_dir):
  """A tiny MAE that saves every 2 steps and keeps 2 checkpoints (6 and 8 at the end); the
  same run as FAULT_FLAGS on the command line."""
  config = demo_config('mae_pretrain', data_dir, total_steps=TOTAL_STEPS)
  config.global_batch_size = 32
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.reconstructions = 0
  return config


FAULT_FLAGS = tiny_flags(None, total_steps=TOTAL_STEPS) + [
    '--config.keep_checkpoints=2', '--config.reconstructions=0']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir):
  """An uninterrupted run: its workdir (checkpoints 6 and 8) and its losses."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  result = train.train_and_evaluate(fault_config(data_dir), str(workdir))
  assert result['step'] == TOTAL_STEPS
  expected = losses(workdir)
  assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))
  return workdir, expected


def copy_of(straight_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run[0], workdir)
  return workdir


def array_data_files(step_dir):
  # Every data file of the state: which file holds which array is Orbax's choice, and a
  # step folder may also hold data files its manifest no longer names (one file alone
  # was read back without an error now and then in the suite).
  return [os.path.join(root, name) for root, _, names in os.walk(step_dir / 'state')
          for name in names if os.sep + 'd' + os.sep in os.path.join(root, name)]


def truncate_array_file(step_dir):
  for path in array_data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def random_bytes_in_array_file(step_dir):
  rng = np.random.default_rng(0)
  for path in array_data_files(step_dir):
    noise = rng.integers(0, 256, os.path.getsize(path), dtype=np.uint8)
    with open(path, 'wb') as f:
      f.write(noise.tobytes())


def empty_data_metadata(step_dir):
  open(step_dir / 'data' / 'metadata', 'w').close()


def half_written_state_metadata(step_dir):
  path = step_dir / 'state' / '_METADATA'
  text = path.read_bytes()
  path.write_bytes(text[:len(text) // 2])


def tree(directory):
  return sorted((os.path.relpath(root, directory), sorted(names))
                for root, _, names in os.walk(directory))


@pytest.mark.parametrize('corrupt', [truncate_array_file, random_bytes_in_array_file,
                                     empty_data_metadata, half_written_state_metadata])
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_resumes_exactly(
    corrupt, straight, data_dir, tmp_path, capsys):
  workdir = copy_of(straight, tmp_path)
  corrupt(workdir / 'checkpoints' / str(TOTAL_STEPS))
  capsys.readouterr()
  result = train.train_and_evaluate(fault_config(data_dir), str(workdir))
  output = capsys.readouterr().out
  warnings = [line for line in output.splitlines() if line.startswith('Warning:')]
  assert len(warnings) == 1, output
  assert f'skipped checkpoint {workdir}/checkpoints/{TOTAL_STEPS} (' in warnings[0]
  assert f'moved it to {workdir}/checkpoints_skipped/{TOTAL_STEPS}' in warnings[0]
  assert f'Resumed from {workdir}/checkpoints/6.' in output
  assert result['step'] == TOTAL_STEPS
  # Steps 7 and 8 were trained again, and their losses are those of the uninterrupted run.
  assert losses(workdir) == straight[1]
  assert sorted(os.listdir(workdir / 'checkpoints_skipped')) == [str(TOTAL_STEPS)]
  assert {'6', '8'} <= set(os.listdir(workdir / 'checkpoints'))


def test_an_unfinished_save_is_named_and_the_previous_checkpoint_resumes(
    straight, data_dir, tmp_path, capsys):
  workdir = copy_of(straight, tmp_path)
  # What a process killed while writing leaves: Orbax's temporary folder of the step.
  os.rename(workdir / 'checkpoints' / '8', workdir / 'checkpoints' / '8.orbax-checkpoint-tmp')
  capsys.readouterr()
  train.train_and_evaluate(fault_config(data_dir), str(workdir))
  output = capsys.readouterr().out
  warnings = [line for line in output.splitlines() if line.startswith('Warning:')]
  assert warnings == [f'Warning: skipped {workdir}/checkpoints/8.orbax-checkpoint-tmp: a save '
                      'that never finished (the process died, or lost the workdir, while '
                      'writing it); Orbax removes it.']
  assert f'Resumed from {workdir}/checkpoints/6.' in output
  assert losses(workdir) == straight[1]


def test_no_usable_checkpoint_stops_until_told_to_restart(straight, data_dir, tmp_path):
  workdir = copy_of(straight, tmp_path)
  truncate_array_file(workdir / 'checkpoints' / '6')
  empty_data_metadata(workdir / 'checkpoints' / '8')
  before = tree(workdir)
  with pytest.raises(checkpoint.CheckpointFailure) as error:
    train.train_and_evaluate(fault_config(data_dir), str(workdir))
  message = str(error.value)
  assert '\n' not in message
  assert f'No checkpoint in {workdir}/checkpoints reads back: step 8: ' in message
  assert '; step 6: ' in message and '--restart_from_scratch' in message
  assert tree(workdir) == before  # nothing moved, nothing written
  result = train.train_and_evaluate(fault_config(data_dir), str(workdir),
                                    restart_from_scratch=True)
  assert result['step'] == TOTAL_STEPS
  assert sorted(os.listdir(workdir / 'checkpoints_skipped')) == ['6', '8']
  assert losses(workdir) == straight[1]  # from step 0, the same run again


def fail_saves_of_step(monkeypatch, step):
  """Makes the background part of the save of `step` fail as a full disk does."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if os.path.basename(os.fspath(self.get_final())) == str(step):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await original(self, *args, **kwargs)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)


def test_a_failed_save_stops_the_run_at_once_and_a_rerun_resumes_exactly(
    straight, data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  with monkeypatch.context() as patch:
    fail_saves_of_step(patch, 4)
    with pytest.raises(checkpoint.CheckpointFailure) as error:
      train.train_and_evaluate(fault_config(data_dir), str(workdir))
  message = str(error.value)
  assert message.startswith(f'Saving checkpoint 4 to {workdir}/checkpoints failed (OSError: '
                            '[Errno 28] No space left on device); ')
  assert f'MiB free in the workdir {workdir}.' in message
  assert 'The last good checkpoint is step 2;' in message
  # Saves are asynchronous, so steps 5 and 6 may have run while step 4 was being written;
  # the run stopped at the latest when step 6's save began, and saved nothing after 2.
  assert 4 <= max(losses(workdir)) <= 6
  assert [d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()] == ['2']
  result = train.train_and_evaluate(fault_config(data_dir), str(workdir))
  assert result['step'] == TOTAL_STEPS
  assert losses(workdir) == straight[1]


def du(path, page=4096):
  """Bytes that `path` takes on a tmpfs: each file in whole pages, each folder one page.

  Not the apparent size (a checkpoint is many small files) and not `du` here (a
  compressing file system reports less than a tmpfs will need)."""
  total = 0
  for root, _, names in os.walk(path):
    total += page
    for name in names:
      total += -(-os.path.getsize(os.path.join(root, name)) // page) * page
  return total


@pytest.fixture
def small_tmpfs(tmp_path, straight):
  """A tmpfs that holds the run's logs and one and a half of its checkpoints: the first
  save fits, the second overflows. Sized from the straight run's own files, since a
  checkpoint's size on disk is Orbax's choice and differs between machines."""
  checkpoints = straight[0] / 'checkpoints'
  one_checkpoint = max(du(checkpoints / d) for d in os.listdir(checkpoints) if d.isdigit())
  size_kib = (du(straight[0]) - du(checkpoints) + int(1.5 * one_checkpoint)) // 1024 + 64
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_kib}k', 'tmpfs',
                            str(mount_point)], capture_output=True, check=False).returncode == 0
  if not mounted:
    pytest.skip('mounting a tmpfs needs root')
  # Some sandboxes accept the size option and do not enforce it.
  probe = mount_point / 'probe'
  try:
    with open(probe, 'wb') as f:
      f.write(b'\0' * (size_kib + 1024) * 1024)
    enforced = False
  except OSError:
    enforced = True
  probe.unlink(missing_ok=True)
  if not enforced:
    subprocess.run(['umount', str(mount_point)], check=False)
    pytest.skip(f'this machine does not enforce a tmpfs size of {size_kib} KiB')
  yield mount_point
  subprocess.run(['umount', str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_gives_one_line_and_more_space_resumes_exactly(
    straight, data_dir, small_tmpfs):
  """The real thing: a workdir volume that fits one checkpoint of the tiny MAE, not two."""
  workdir = small_tmpfs / 'run'
  command = main_command('mae_pretrain.py:demo', workdir, FAULT_FLAGS)
  result = subprocess.run(command, env=env8(data_dir), cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  # Which save overflows depends on when Orbax deletes the oldest checkpoint, and on how
  # a machine's tmpfs counts a checkpoint's pages: on one CI machine the first save did
  # not fit. Both outcomes must say what was kept and how to go on.
  found = re.fullmatch(
      rf'Error: Saving checkpoint (\d+) to {workdir}/checkpoints failed \(.*'
      r'(?:No space left on device|RESOURCE_EXHAUSTED).*\); '
      rf'(\d+\.\d) MiB free in the workdir {workdir}\. Stopped: nothing after this is '
      r'saved\. (?:The last good checkpoint is step (\d+); free space \(or move the '
      r'workdir\) and run the same command to resume from it\.|No checkpoint of this run '
      r'was saved; free space \(or move the workdir\) and run the same command to start '
      r'it again\.)', errors[0])
  assert found, errors[0]
  failed, free = int(found[1]), float(found[2])
  good = int(found[3]) if found[3] else None
  assert free < 1.0
  steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  if good is None:
    assert failed == 2 and not steps  # the first save
  else:
    assert good == failed - 2 and max(steps) == good
  assert max(losses(workdir)) <= failed + 2  # stopped at the latest at the next save
  subprocess.run(['mount', '-o', 'remount,size=64m', str(small_tmpfs)], check=True)
  subprocess.run(command, env=env8(data_dir), cwd=ROOT, capture_output=True, check=True,
                 timeout=600)
  assert losses(workdir) == straight[1]


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_warning_line_on_the_command_line(straight, data_dir,
                                                                      tmp_path):
  workdir = copy_of(straight, tmp_path)
  truncate_array_file(workdir / 'checkpoints' / '8')
  command = main_command('mae_pretrain.py:demo', workdir, FAULT_FLAGS)
  result = subprocess.run(command, env=env8(data_dir), cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output[-3000:]
  assert [line for line in output.splitlines() if 'Warning' in line or 'Error' in line] == [
      line for line in result.stdout.splitlines() if line.startswith('Warning: skipped checkpoint')]
  assert len([line for line in result.stdout.splitlines() if line.startswith('Warning:')]) == 1
  assert losses(workdir) == straight[1]


# ---------------------------------------------------------------------------------------
# Bad input on the command line: exit status, one `Error:` line, no traceback, and the
# workdir left as it was.

BAD_COMMAND_LINES = [
    ('vit_scratch.py:demo', ['--config.nonexistent=1'], 2,
     '--config.nonexistent: configs/vit_scratch.py:demo has no such key;'),
    ('vit_scratch.py:demo', ['--config.data.nme=x'], 2,
     'did you mean --config.data.name?'),
    ('vit_scratch.py:demo', ['--config.model.nonexistent=1'], 1,
     "unknown model field(s) ['nonexistent']"),
    ('no_such_file.py:demo', [], 2, "there is no file '"),
    ('vit_scratch.py:bogus', [], 2, "Unknown config argument 'bogus'"),
    ('vit_scratch.py:demo', ['--config.data.name=image_folder',
                             '--config.data.source_dir=/nonexistent/photos'], 1,
     "Dataset 'image_folder' is not prepared in data_dir"),
    ('vit_scratch.py', [], 1, "Dataset 'imagenet2012' is not prepared"),
    ('vit_scratch.py:demo', ['--config.init.path=/nonexistent.npz'], 1,
     "init.path='/nonexistent.npz' does not exist"),
    # Every field of get_model is overridable, set by the config file or not: the model
    # is built with these two, and the run gets as far as the split check after it.
    ('vit_scratch.py:demo', ['--config.model.drop_path=0.2', '--config.model.dtype=bfloat16',
                             '--config.data.eval_split=nosuch'], 1,
     "data.eval_split='nosuch' is not a split of 'fashion_mnist_t10k'"),
]


def test_a_run_that_resumes_does_not_need_its_init_path(tmp_path, data_dir):
  """init.path is read once, at step 0: a run resuming from its own checkpoints starts even
  where the checkpoint it began from is gone (a sweep's pretraining workdir, lost)."""
  config = demo_config('mae_finetune', data_dir)
  config.init.path = str(tmp_path / 'pretrain')
  workdir = tmp_path / 'finetune'
  with pytest.raises(ValueError, match=r"init.path='.*pretrain' does not exist"):
    train.check_loop_keys(config, str(workdir))
  (workdir / 'checkpoints' / '200').mkdir(parents=True)
  train.check_loop_keys(config, str(workdir))


@pytest.mark.parametrize('config,flags,status,expected', BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_error_line(config, flags, status, expected, tmp_path,
                                              data_dir):
  workdir = tmp_path / 'workdir'
  command = main_command(config, workdir, flags)
  command[3] = command[3].replace(f'{ROOT}/configs/', 'configs/')  # as a user types it
  result = subprocess.run(command, env=env8(data_dir), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == status, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('Error: '), result.stderr[-3000:]
  assert expected in lines[0]
  assert not workdir.exists()


def test_a_checkpoint_that_is_not_one_is_refused_before_compiling(
    straight, data_dir, tmp_path, monkeypatch):
  not_a_checkpoint = tmp_path / 'notes'
  not_a_checkpoint.mkdir()
  (not_a_checkpoint / 'readme.txt').write_text('hello')
  wrong_size = demo_config('mae_finetune', data_dir)
  wrong_size.model.width = 48
  not_one = demo_config('mae_finetune', data_dir)
  not_one.init.path = str(not_a_checkpoint)
  wrong_size.init.path = str(straight[0])

  def no_compile(*args, **kwargs):
    raise AssertionError('the train state was set up: the error should come before')
  monkeypatch.setattr(checkpoint, 'Checkpointer', no_compile)
  with pytest.raises(ValueError, match='no Orbax checkpoint found'):
    train.train_and_evaluate(not_one, str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'does not fit the model: shapes differ'):
    train.train_and_evaluate(wrong_size, str(tmp_path / 'b'))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


# ---------------------------------------------------------------------------------------
# Image folders as users make them.


def write_images(folder, classes, *, per_class=6, size=(32, 32), mode='RGB'):
  rng = np.random.default_rng(0)
  for c, name in enumerate(classes):
    os.makedirs(folder / name, exist_ok=True)
    for i in range(per_class):
      pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
      pixels[..., c % 3] = 250
      Image.fromarray(pixels).convert(mode).save(folder / name / f'{i}.png')


def folder_config(data_dir, source_dir, **overrides):
  config = data.default_data_config()
  config.update(dict(name='image_folder', data_dir=str(data_dir), source_dir=str(source_dir),
                     **overrides))
  return config


def test_a_single_image_folder_says_how_to_hold_out_an_eval_split(tmp_path):
  write_images(tmp_path / 'photos', ('ant', 'bee', 'cat', 'dog'), per_class=10)
  datasets.prepare('image_folder', str(tmp_path / 'tfds'), source_dir=str(tmp_path / 'photos'))
  config = folder_config(tmp_path / 'tfds', tmp_path / 'photos')
  info = data.dataset_info(config)
  with pytest.raises(ValueError) as error:
    data.check_dataset(config, info, image_size=32, channels=3)
  message = str(error.value)
  assert message.startswith("data.eval_split='test' is not a split of 'image_folder'")
  assert "--config.data.train_split='train[:90%]' --config.data.eval_split='train[90%:]'" in (
      message)
  # The fix it gives works, and the held-out slice mixes the classes as it says.
  config.update(dict(train_split='train[:75%]', eval_split='train[75%:]'))
  data.check_dataset(config, info, image_size=32, channels=3)
  held_out = datasets.open_split(config, 'train[75%:]')
  labels = [int(held_out.source[i]['label']) for i in range(len(held_out.source))]
  assert len(labels) == 10 and len(set(labels)) >= 3


def test_colour_images_into_a_grayscale_model_are_refused_and_sizes_are_noted(tmp_path,
                                                                              capsys):
  write_images(tmp_path / 'photos' / 'train', ('a', 'b'))
  write_images(tmp_path / 'photos' / 'test', ('a', 'b'), per_class=2)
  datasets.prepare('image_folder', str(tmp_path / 'tfds'), source_dir=str(tmp_path / 'photos'))
  config = folder_config(tmp_path / 'tfds', tmp_path / 'photos')
  info = data.dataset_info(config)
  assert info.image_shape == (32, 32, 3)  # one size for all: recorded
  with pytest.raises(ValueError, match=r"holds colour images \(3 channels\) but the model takes "
                     r'channels=1.*--config.model.channels=3'):
    data.check_dataset(config, info, image_size=28, channels=1)
  capsys.readouterr()
  data.check_dataset(config, info, image_size=28, channels=3)
  assert capsys.readouterr().out.strip() == (
      "Note: 'image_folder' stores 32x32 images and the model takes 28x28: they are resized "
      '(--config.model.image_size=32 trains at the stored size).')


@pytest.mark.parametrize('background, level, flat_level',
                         [('gray', 128, 128), ('white', 255, 255), ('black', 0, 0),
                          ('contrast', 255, 0)])  # dark (luma 124) glyph, light glyph
def test_transparency_is_kept_and_composited_when_read(tmp_path, background, level, flat_level):
  # An icon folder: one RGBA file (a colour stored under its transparent half) and a
  # palette PNG with a transparent colour; the dataset keeps alpha (4 channels), and
  # reading composites it onto data.transparent_background.
  root = tmp_path / 'icons'
  for name in ('a', 'b'):
    (root / name).mkdir(parents=True)
  pixels = np.zeros((4, 4, 4), np.uint8)
  pixels[..., :3] = (10, 200, 30)  # colour stored under the transparent pixels
  pixels[:2, :, 3] = 255  # top half opaque, bottom half transparent
  pixels[2:, :, 3] = 0
  pixels[0, 0, 3] = 51  # one pixel 20% opaque
  Image.fromarray(pixels, 'RGBA').save(root / 'a' / 'icon.png')
  palette = Image.new('P', (4, 4), 1)
  palette.putpalette([0, 0, 0, 250, 250, 250])
  palette.paste(0, (0, 2, 4, 4))
  palette.save(root / 'b' / 'icon.png', transparency=0)  # colour 0 (black) transparent
  layout = builders.scan_image_folder(str(root))
  assert layout.channels == 4
  encoded = builders.encode_for_dataset(str(root / 'b' / 'icon.png'), channels=4)
  stored = np.asarray(Image.open(io.BytesIO(encoded)))
  assert stored.shape == (4, 4, 4)
  assert (stored[2:, :, 3] == 0).all() and (stored[:2, :, 3] == 255).all()

  datasets.prepare('image_folder', str(tmp_path / 'tfds'), source_dir=str(root))
  config = folder_config(tmp_path / 'tfds', root, eval_crop_fraction=1.0,
                         transparent_background=background)
  assert data.dataset_info(config).image_shape == (4, 4, 4)
  batch = pipeline.eval_batches(config, local_batch_size=2, image_size=4, channels=3,
                                split='train', process_index=0, process_count=1)[0]
  images = np.round(batch['image'] * 0.5 * 255 + 0.5 * 255).astype(int)  # mean = std = 0.5
  by_label = dict(zip(batch['label'].tolist(), images))
  icon, flat = by_label[0], by_label[1]
  assert (icon[1] == (10, 200, 30)).all() and (icon[2:] == level).all()
  assert (icon[0, 0] == np.round(np.array([10, 200, 30]) * 0.2 + level * 0.8)).all()
  assert (flat[:2] == 250).all() and (flat[2:] == flat_level).all()


def test_a_grayscale_folder_with_transparency_stays_grayscale(tmp_path):
  root = tmp_path / 'icons'
  for name in ('a', 'b'):
    (root / name).mkdir(parents=True)
    grey_alpha = np.zeros((4, 4, 2), np.uint8)
    grey_alpha[..., 0], grey_alpha[:2, :, 1] = 255, 255  # white glyph on the top half
    Image.fromarray(grey_alpha, 'LA').save(root / name / 'icon.png')
  assert builders.scan_image_folder(str(root)).channels == 2
  datasets.prepare('image_folder', str(tmp_path / 'tfds'), source_dir=str(root))
  config = folder_config(tmp_path / 'tfds', root, eval_crop_fraction=1.0, eval_split='train',
                         transparent_background='gray')
  info = data.dataset_info(config)
  assert info.image_shape == (4, 4, 2)
  data.check_dataset(config, info, image_size=4, channels=1)  # grayscale: accepted
  batch = pipeline.eval_batches(config, local_batch_size=2, image_size=4, channels=1,
                                split='train', process_index=0, process_count=1)[0]
  assert batch['image'].shape == (2, 4, 4, 1)
  levels = np.round(batch['image'][0, :, 0, 0] * 0.5 * 255 + 0.5 * 255)
  assert levels.tolist() == [255, 255, 128, 128]  # the glyph, then the grey background


def test_an_empty_class_folder_is_refused(tmp_path):
  write_images(tmp_path / 'photos', ('ant', 'bee'))
  (tmp_path / 'photos' / 'cat').mkdir()
  with pytest.raises(ValueError, match=r"class folder\(s\) \['cat'\] of .* hold no image file"):
    builders.scan_image_folder(str(tmp_path / 'photos'))


def white_glyph_icons(root, per_class: int, seed: int) -> None:
  """ROOT/{train,test}/{circle,bar}/*.png: pure white glyphs on transparent pixels (black
  underneath), as light icon sets are; composited onto white they are blank."""
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import make_icons  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for split, count in (('train', per_class), ('test', per_class // 2)):
    for shape in ('circle', 'bar'):
      folder = root / split / shape
      folder.mkdir(parents=True)
      for index in range(count):
        rgba = np.zeros((32, 32, 4), np.uint8)
        rgba[..., 3] = make_icons.glyph_mask(shape, rng)
        rgba[..., :3] = np.where(rgba[..., 3:] > 0, 255, 0)
        Image.fromarray(rgba, 'RGBA').save(folder / f'{index:03d}.png')


def test_transparent_icons_train_at_least_as_well_as_before(tmp_path):
  # Before (image_folder 1.1.0) transparency was composited onto white at preparation:
  # white icons became blank images and nothing could be learned. The default background
  # keeps them visible; 'white' reproduces what training saw before.
  white_glyph_icons(tmp_path / 'icons', per_class=64, seed=0)
  datasets.prepare('image_folder', str(tmp_path / 'tfds'), source_dir=str(tmp_path / 'icons'))
  top1 = {}
  for background in ('white', data.default_data_config().transparent_background):
    config = demo_config('vit_scratch', str(tmp_path / 'tfds'), total_steps=40)
    config.data.update(dict(name='image_folder', source_dir=str(tmp_path / 'icons'),
                            eval_split='test', transparent_background=background,
                            mean=(0.5,), std=(0.5,)))
    config.model.update(dict(image_size=16, channels=3))
    config.global_batch_size = 32
    final = run_in_process(config, tmp_path / background)
    top1[background] = final['eval/top1']
  assert top1['white'] == 0.5  # blank images: one class for all, half of them right
  assert top1[data.default_data_config().transparent_background] >= 0.8, top1


@pytest.mark.slow
def test_the_soak_script_kills_resumes_and_checks(tmp_path):
  # A short soak: the mechanics (samples, SIGKILL and resume, the checks, the figures).
  # The 30-minute measurement is in docs/soak.md.
  workdir = tmp_path / 'soak'
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'soak.py'),
                           f'--workdir={workdir}', '--minutes=1.2', '--sample_seconds=3',
                           '--checkpoint_every_steps=20'],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
                          capture_output=True, text=True, timeout=400)
  summary = json.loads((workdir / 'soak.json').read_text())
  assert summary['exit_code_after_sigterm'] == 0, result.stdout[-2000:]
  assert sorted(summary['processes']) == ['process 1', 'process 2']  # killed, then resumed
  assert 'Resumed from' in (workdir / 'soak_log.txt').read_text()
  assert summary['duplicates'] == 0 and summary['gaps'] == 0
  # Every 10th step, and the step the final SIGTERM saved at.
  last = summary['last_step']
  assert summary['logged_steps'] == last // 10 + (last % 10 > 0) > 1
  assert summary['checkpoints_max'] <= 4
  assert (workdir / 'soak.png').stat().st_size > 10_000
  rows = (workdir / 'soak.csv').read_text().splitlines()
  assert rows[0] == 'seconds,process,rss_mib,open_files,checkpoints,workdir_mib,last_step'
  assert len(rows) > 10
  # Exit status 1 exactly when a check failed (a minute is too short for the memory one).
  assert result.returncode == (1 if summary['failures'] else 0), result.stdout[-2000:]

"""A checkpoint the disk cannot take stops the run at its save, before any
byte of it is written; the same check runs before the first save.

The free space is simulated (`disk_space.free_bytes` patched); the real full
disk (a small tmpfs) is a row of tests/test_interruptions.py.
"""

import os

import ml_collections
import numpy as np
import pytest

from vit_jax.checkpoints import train_checkpoint
from vit_jax.guards import disk_space

STATE = {
    'params': {
        'w': np.ones((64, 64), np.float32)
    },
    'opt_state': {
        'm': np.zeros((64, 64), np.float32)
    }
}


def _folders(directory):
  return sorted(os.listdir(directory))


def test_save_refused_at_its_step_when_the_disk_cannot_take_it(
    tmp_path, monkeypatch):
  ckpts = train_checkpoint.TrainCheckpoints(str(tmp_path))
  try:
    ckpts.save(10, STATE)
    ckpts.wait_until_finished()
    size = disk_space.tree_bytes(os.path.join(ckpts.directory, '10'))
    assert size >= 2 * 64 * 64 * 4
    monkeypatch.setattr(disk_space, 'free_bytes', lambda path: size - 1)
    with pytest.raises(disk_space.DiskSpaceError) as error:
      ckpts.save(20, STATE)
    text = str(error.value)
    assert 'Checkpoint step 20 cannot be written' in text
    assert 'the disk is full' in text
    assert 'The newest intact checkpoint is step 10' in text
    assert 'one checkpoint of this run takes about' in text
    # Nothing of step 20 was started, not even orbax's temporary folder.
    assert _folders(ckpts.directory) == ['10']
    monkeypatch.setattr(disk_space, 'free_bytes', lambda path: size)
    ckpts.save(20, STATE)  # room again: the same call saves
    ckpts.wait_until_finished()
    assert ckpts.complete_steps() == [10, 20]
  finally:
    ckpts.close()


def test_room_for_the_first_save_is_checked_before_training(
    tmp_path, monkeypatch):
  ckpts = train_checkpoint.TrainCheckpoints(str(tmp_path))
  config = ml_collections.ConfigDict(dict(checkpoint_every=50, total_steps=120))
  try:
    need = sum(
        x.nbytes for x in (STATE['params']['w'], STATE['opt_state']['m']))
    monkeypatch.setattr(disk_space, 'free_bytes', lambda path: need - 1)
    with pytest.raises(disk_space.DiskSpaceError) as error:
      ckpts.check_room(STATE, 0, config)
    assert 'Checkpoint step 50 cannot be written' in str(error.value)
    assert 'No checkpoint was saved before it' in str(error.value)
    monkeypatch.setattr(disk_space, 'free_bytes', lambda path: need)
    ckpts.check_room(STATE, 0, config)  # enough room: no error
  finally:
    ckpts.close()

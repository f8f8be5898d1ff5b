"""Which checkpoint a run resumes from, and into which layout.

Steps read into the runner's restore template, whatever device count,
process count or parallelism saved them; an unreadable step is moved aside
and the one before it is tried.
"""

from typing import Any, Optional, Tuple

from absl import logging

from vit_jax.checkpoints import train_checkpoint


def restore_newest(ckpts: train_checkpoint.TrainCheckpoints,
                   template: Any) -> Tuple[Optional[Any], int]:
  """(state, step) of the newest readable step, else (None, 0).

  Raises ValueError if that step was saved for another model or optimizer.
  """
  for step in reversed(ckpts.all_steps()):
    restored = restore_step(ckpts, step, template)
    if restored is not None:
      return restored, step
  return None, 0


def restore_step(ckpts: train_checkpoint.TrainCheckpoints, step: int,
                 template: Any) -> Optional[Any]:
  """`step` read into `template`, or None if unreadable (then moved aside).

  Raises ValueError if the step was saved for another model or optimizer.
  """
  try:
    saved = ckpts.saved_shapes(step)
  except Exception as e:  # pylint: disable=broad-except
    return _set_aside(ckpts, step, f'its metadata: {type(e).__name__}')
  mismatch = train_checkpoint.tree_mismatch(saved, template)
  if mismatch:
    raise ValueError(
        f'Cannot resume from step {step} in {ckpts.directory}: {mismatch}. '
        'Use a new --workdir, or the config the run was started with.')
  try:
    return ckpts.restore(step, template)
  except (ValueError, KeyError, TypeError, OSError) as e:
    return _set_aside(ckpts, step, f'{type(e).__name__}: {str(e)[:200]}')


def _set_aside(ckpts: train_checkpoint.TrainCheckpoints, step: int,
               error: str) -> None:
  """Moves the unreadable `step` aside, with a warning that says where."""
  moved = ckpts.move_aside(step)
  message = (f'Checkpoint step {step} in {ckpts.directory} cannot be read '
             f'({error}); it was moved to {moved} and the run resumes from '
             'the newest step before it.')
  logging.warning('%s', message)

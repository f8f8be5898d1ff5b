"""Where the main job's time goes: its train step by micro-batch size, and its
input pipeline per example or per batch.

Command:

  python -m bench.main_job_parts

Prints (1) the wall and CPU time of the train step of `configs/embedded.py`
for 256 images at accum_steps 1, 2, 4 and 8 (micro-batches of 256 ... 32),
the variants interleaved and the best of several rounds kept; (2) the CPU
time the embedded digits' tf.data pipeline spends per batch of 256, example
by example and a batch at a time (`input_pipeline._train_batches`), for the
'affine' and 'none' augmentations. docs/main_job.md has its output.
"""

import argparse
import os
import sys
import time

from bench import machine


def step_times(accum_steps, rounds: int):
  """{accum_steps: (wall ms, cpu ms)} of one train step of 256 images."""
  # pylint: disable=g-import-not-at-top
  import flax.jax_utils
  import jax
  import numpy as np

  from configs import embedded
  from vit_jax import train
  from vit_jax.training import optim
  # pylint: enable=g-import-not-at-top
  steps = {}
  for a in accum_steps:
    config = embedded.get_config()
    config.accum_steps = a
    model = train.create_model(config, 10)
    tx, _ = optim.make_optimizer(config)
    state, mask = train._fresh_state(
        config,
        model,
        tx,  # pylint: disable=protected-access
        load_pretrained=False)
    runner = train.make_runner(config, model, tx, mask, state['params'])
    rng = np.random.RandomState(0)
    batch = next(
        flax.jax_utils.prefetch_to_device(
            iter([{
                'image': rng.uniform(-1, 1, (1, 256, 28, 28, 3)).astype('f4'),
                'label': np.eye(10, dtype='f4')[rng.randint(0, 10, (1, 256))]
            }]), 1))
    steps[a] = [
        runner,
        list(runner.place(state['params'], state['opt_state'])), batch
    ]
  key = jax.random.PRNGKey(0)
  best = {a: (float('inf'), float('inf')) for a in accum_steps}
  for _ in range(rounds):
    for a, (runner, state, batch) in steps.items():
      t, c = time.time(), time.process_time()
      for _ in range(5):
        state[0], state[1], loss = runner.step(state[0], state[1], batch, key)
      jax.block_until_ready(loss)
      wall, cpu = (time.time() - t) / 5e-3, (time.process_time() - c) / 5e-3
      best[a] = (min(best[a][0], wall), min(best[a][1], cpu))
  return best


def pipeline_cpu(kind: str, batched: bool, batches: int = 60) -> float:
  """CPU ms per batch of 256 of the digits' train pipeline."""
  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline
  from vit_jax.data import embedded_mnist
  # pylint: enable=g-import-not-at-top
  src = embedded_mnist.make_source('train', 0, 1)
  augment = input_pipeline.Augment(kind, shift_pad=3, rotate=15, zoom=0.15)
  ds = input_pipeline._numbered_train_stream(src, None, 0, first=0)  # pylint: disable=protected-access
  ds = input_pipeline._train_batches(  # pylint: disable=protected-access
      ds,
      src, (28, 28),
      augment,
      0, (0, 1),
      256,
      batched=batched)
  it = ds.as_numpy_iterator()
  next(it)
  c = time.process_time()
  for _ in range(batches):
    next(it)
  return (time.process_time() - c) / batches * 1e3


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--rounds', type=int, default=6)
  args = p.parse_args(argv)
  print('command: python -m bench.main_job_parts ' +
        ' '.join(sys.argv[1:] if argv is None else argv))
  print(f'machine: {machine.cpu_description()}')
  print('\ntrain step of 256 images (configs/embedded.py), best of '
        f'{args.rounds} rounds')
  print('accum_steps  micro-batch  wall ms  CPU ms  images/s')
  for a, (wall, cpu) in step_times((1, 2, 4, 8), args.rounds).items():
    print(f'{a:>11}  {256 // a:>11}  {wall:7.1f}  {cpu:6.1f}  '
          f'{256e3 / wall:8,.0f}')
  print('\ninput pipeline, CPU ms per batch of 256 (embedded digits)')
  print('augment  example by example  a batch at a time')
  for kind in ('affine', 'none'):
    print(f'{kind:7}  {pipeline_cpu(kind, False):17.1f}  '
          f'{pipeline_cpu(kind, True):17.1f}')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())

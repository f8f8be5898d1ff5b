"""Step time with a train-state checkpoint every N steps: synchronous
saves against asynchronous ones.

The sharded (FSDP) train step of `vit_jax.train.make_runner` on forced CPU
devices, with `train_checkpoint.TrainCheckpoints.save` every `--every`
steps: either waiting for each save to reach the disk (synchronous, what the
train loop did before saves were asynchronous) or not (the train loop now:
the next steps run while the files are written). The model is chosen so
that one save takes longer than one step. Prints the command, the machine,
the times and the ratio; nothing is asserted.

  python -m bench.checkpoint_save --devices 4 --hidden 256 --layers 8
"""

import argparse
import os
import shutil
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
      '--devices',
      type=int,
      default=4,
      help='forced CPU devices (XLA_FLAGS), unless already set')
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--batch', type=int, default=16, help='global batch')
  p.add_argument('--steps', type=int, default=40)
  p.add_argument('--every', type=int, default=5, help='save every N steps')
  p.add_argument(
      '--workdir',
      default=None,
      help='where to write (default: a temporary folder)')
  return p.parse_args(argv)


def _setup(args):
  """(runner, params, opt_state, batch) of the FSDP step."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import embedded  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = embedded.get_digits_config()
  config.model = embedded.get_model_config()
  config.model.hidden_size = args.hidden
  config.model.transformer.mlp_dim = 4 * args.hidden
  config.model.transformer.num_layers = args.layers
  config.parallelism = 'fsdp'
  config.batch = args.batch
  model = train.create_model(config, 10)
  tx, _ = optim.make_optimizer(config)
  params = train.init_params(model, config, load_pretrained=False)
  runner = train.make_runner(config, model, tx, None, params)
  params, opt_state = runner.place(params, tx.init(params))
  rng = np.random.RandomState(0)
  batch = sharding.shard_batch(
      {
          'image':
              rng.uniform(-1, 1, (args.batch, 28, 28, 3)).astype(np.float32),
          'label':
              np.eye(10, dtype=np.float32)[rng.randint(0, 10, args.batch)],
      }, runner.mesh)
  return runner, params, opt_state, batch


def _run(args, runner, state, batch, folder, mode):
  """Seconds per step over `args.steps` steps; `mode`: 'none' (no saves),
  'sync' or 'async'. The last save's wait is included."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = train_checkpoint.TrainCheckpoints(folder)
  key = jax.random.PRNGKey(0)
  params, opt_state = state
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    params, opt_state, _ = runner.step(params, opt_state, batch, key)
    if mode != 'none' and step % args.every == 0:
      ckpts.save(step, {
          'params': params,
          'opt_state': opt_state
      }, runner.saved_state)
      if mode == 'sync':
        ckpts.wait_until_finished()
  jax.block_until_ready(params)
  ckpts.wait_until_finished()
  seconds = (time.perf_counter() - start) / args.steps
  ckpts.close()
  return seconds, (params, opt_state)


def _one_save(runner, state, folder):
  """Seconds of one save, written to the disk."""
  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = train_checkpoint.TrainCheckpoints(folder)
  start = time.perf_counter()
  ckpts.save(1, {'params': state[0], 'opt_state': state[1]}, runner.saved_state)
  ckpts.wait_until_finished()
  seconds = time.perf_counter() - start
  ckpts.close()
  return seconds


def main(argv=None):
  args = parse_args(argv)
  from bench import machine  # pylint: disable=g-import-not-at-top
  machine.force_cpu_devices(args.devices)
  import jax  # pylint: disable=g-import-not-at-top
  machine.print_header('bench.checkpoint_save', argv)
  root = args.workdir or tempfile.mkdtemp(prefix='bench_ckpt_')
  runner, params, opt_state, batch = _setup(args)
  state_bytes = sum(
      x.nbytes for x in jax.tree_util.tree_leaves((params, opt_state)))
  warm = args.steps, args.every
  args.steps, args.every = 2, 1  # compile the step, warm the save path
  _, state = _run(args, runner, (params, opt_state), batch,
                  os.path.join(root, 'warm'), 'async')
  args.steps, args.every = warm
  one_step, state = _run(args, runner, state, batch, os.path.join(root, 'none'),
                         'none')
  save_s = _one_save(runner, state, os.path.join(root, 'one'))
  print(f'train state {state_bytes / 2**20:.1f} MiB; one step '
        f'{one_step * 1e3:.0f} ms, one save {save_s * 1e3:.0f} ms; a save '
        f'every {args.every} of {args.steps} steps')
  times = {}
  for mode in ('sync', 'async'):
    times[mode], state = _run(args, runner, state, batch,
                              os.path.join(root, mode), mode)
    print(f'{mode:>5}: {times[mode] * 1e3:.0f} ms per step '
          f'({times[mode] / one_step:.2f}x the step without saves)')
  print(f'synchronous / asynchronous step time: '
        f'{times["sync"] / times["async"]:.2f}')
  if args.workdir is None:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()

"""Per-device memory of the sharded train step: parameters, optimizer state
and activations, as XLA's compiler counts them.

For each model, the train step of `vit_jax.train.make_runner` with
`config.parallelism='fsdp'` (the step a run of `python -m vit_jax.main`
executes) is lowered and compiled on forced CPU devices for each data x fsdp
mesh, with abstract inputs (`jax.ShapeDtypeStruct`s carrying the runner's
shardings): nothing of the model is allocated. The recipe is the
pre-training one of configs/imagenet21k.py (AdamW, float32 moments,
gradient clipping, 21,843 sigmoid classes, dropout 0.1, a representation
layer), at `--image-size` and `--per-device` images per device.

Per device, in MiB:
  params   the parameter shards this device holds (from the shardings);
  opt      its optimizer-state shards (Adam's two moments, the step count);
  args     `memory_analysis().argument_size_in_bytes`: params, optimizer
           state, this device's share of the batch and the key;
  temp     `temp_size_in_bytes`: what the step allocates beside its inputs
           and outputs (activations kept for the backward pass, gradients,
           gathered parameters, XLA's workspace);
  peak     args + outputs - aliased (the donated params and optimizer state
           are written in place) + temp: what the step needs at most.

Prints the command, the machine and the table; writes nothing.

  python -m bench.memory_scaling --devices 8 --meshes 8x1,2x4,1x8 \\
      --models b16:32,l16:32,h14:16,g14:8
"""

import argparse
import time

MiB = 2**20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
      '--devices',
      type=int,
      default=8,
      help='forced CPU devices (XLA_FLAGS), unless already set')
  p.add_argument(
      '--meshes',
      default='8x1,2x4,1x8',
      help='data x fsdp meshes, comma-separated')
  p.add_argument(
      '--models',
      default='b16:32,l16:32,h14:16,g14:8',
      help='<short model name>:<images per device>, ...')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument(
      '--num-classes',
      type=int,
      default=21_843,
      help='head size (default: ImageNet-21k)')
  p.add_argument(
      '--dtype',
      default='float32',
      help="the model's compute dtype (config.model.dtype)")
  p.add_argument(
      '--remat',
      default='none',
      help='config.model.remat_policy of the encoder blocks')
  p.add_argument(
      '--scan',
      action='store_true',
      help='encoder blocks under nn.scan (config.model.scan)')
  p.add_argument('--accum-steps', type=int, default=1)
  p.add_argument(
      '--min-shard-size',
      type=int,
      default=None,
      help='config.fsdp_min_shard_size (default: the config\'s)')
  return p.parse_args(argv)


def parse_meshes(text):
  """'8x1,1x8' -> [(8, 1), (1, 8)]."""
  return [tuple(int(n) for n in m.split('x')) for m in text.split(',') if m]


def parse_models(text):
  """'b16:32,h14:8' -> [('b16', 32), ('h14', 8)]."""
  models = []
  for item in filter(None, text.split(',')):
    name, _, batch = item.partition(':')
    models.append((name, int(batch or 8)))
  return models


def make_config(model, per_device, mesh, args):
  """configs/imagenet21k.py's config of `model` for one measurement."""
  from configs import imagenet21k  # pylint: disable=g-import-not-at-top
  config = imagenet21k.get_config(model)
  data, fsdp = mesh
  config.pp.crop = args.image_size
  config.batch = per_device * data * fsdp
  config.accum_steps = args.accum_steps
  config.parallelism = 'fsdp'
  if args.min_shard_size is not None:
    config.fsdp_min_shard_size = args.min_shard_size
  config.mesh.data, config.mesh.fsdp = data, fsdp
  with config.model.unlocked():
    config.model.dtype = args.dtype
    config.model.remat_policy = args.remat
    config.model.scan = args.scan
  return config


def shard_bytes(shapes, shardings):
  """Bytes one device holds of a pytree of shapes placed by `shardings`
  (device 0's; every FSDP shard has the same size)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for x, s in zip(
      jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
  return total


def tree_bytes(shapes):
  """Bytes of a whole pytree of shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(
      x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def abstract_step(config, num_classes):
  """(runner, abstract (params, opt_state, batch, key)) of `config`: shapes
  with the runner's shardings, nothing allocated."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import device_mesh  # pylint: disable=g-import-not-at-top
  from vit_jax.training import optim  # pylint: disable=g-import-not-at-top
  model = train.create_model(config, num_classes)
  tx, _ = optim.make_optimizer(config)
  size = config.pp.crop
  params = flax.core.unfreeze(
      jax.eval_shape(lambda: model.init(
          jax.random.PRNGKey(0), jnp.zeros([1, size, size, 3]), train=False))
      ['params'])
  runner = train.make_runner(config, model, tx, None, params)
  opt_state = jax.eval_shape(tx.init, params)
  place = lambda tree, shardings: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)
  mesh = runner.mesh
  rows = NamedSharding(mesh, P(device_mesh.batch_axes(mesh, None)))
  batch = {
      'image':
          jax.ShapeDtypeStruct((config.batch, size, size, 3),
                               jnp.float32,
                               sharding=rows),
      'label':
          jax.ShapeDtypeStruct((config.batch, num_classes),
                               jnp.float32,
                               sharding=rows)
  }
  key = jax.ShapeDtypeStruct((2,),
                             jnp.uint32,
                             sharding=NamedSharding(mesh, P()))
  return runner, (place(params, runner.param_shardings),
                  place(opt_state, runner.opt_shardings), batch, key)


def measure(model, per_device, mesh, args):
  """One row: per-device bytes of the compiled step of `model` on `mesh`
  ((data, fsdp)) at `per_device` images per device."""
  config = make_config(model, per_device, mesh, args)
  runner, (params, opt_state, batch,
           key) = abstract_step(config, args.num_classes)
  start = time.perf_counter()
  # The jitted step FsdpRunner.step calls.
  step = runner._update  # pylint: disable=protected-access
  compiled = step.lower(params, opt_state, batch, key).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  row = dict(
      model=config.model_name,
      per_device=per_device,
      mesh=mesh,
      num_params=sum(x.size for x in _leaves(params)),
      params_total=tree_bytes(params),
      opt_total=tree_bytes(opt_state),
      params=shard_bytes(params, runner.param_shardings),
      opt=shard_bytes(opt_state, runner.opt_shardings),
      args=memory.argument_size_in_bytes,
      outputs=memory.output_size_in_bytes,
      aliased=memory.alias_size_in_bytes,
      temp=memory.temp_size_in_bytes,
      compile_s=compile_s)
  row['peak'] = row['args'] + row['outputs'] - row['aliased'] + row['temp']
  return row


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)


COLUMNS = ('params', 'opt', 'args', 'temp', 'peak')


def format_table(rows):
  """The rows as a Markdown table, sizes per device in MiB."""
  head = ('| model | params | images/device | data x fsdp | ' +
          ' | '.join(f'{c} MiB' for c in COLUMNS) + ' | compile s |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    sizes = ' | '.join(f'{r[c] / MiB:,.0f}' for c in COLUMNS)
    lines.append(
        f'| {r["model"]} | {r["num_params"] / 1e6:,.0f}M | {r["per_device"]} '
        f'| {r["mesh"][0]} x {r["mesh"][1]} | {sizes} | '
        f'{r["compile_s"]:.0f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  from bench import machine  # pylint: disable=g-import-not-at-top
  machine.force_cpu_devices(args.devices)
  machine.print_header('bench.memory_scaling', argv)
  print(
      f'{args.image_size}x{args.image_size} images, {args.num_classes} '
      f'classes, AdamW (float32 moments), model dtype {args.dtype}, '
      f'remat {args.remat}, scan {args.scan}, accum_steps '
      f'{args.accum_steps}; per device, MiB',
      flush=True)
  rows = []
  for model, per_device in parse_models(args.models):
    for mesh in parse_meshes(args.meshes):
      rows.append(measure(model, per_device, mesh, args))
      print(
          f'  {rows[-1]["model"]} {mesh[0]}x{mesh[1]}: '
          f'{rows[-1]["compile_s"]:.0f} s to compile',
          flush=True)
  print(format_table(rows))


if __name__ == '__main__':
  main()

"""Inference speed of a zoo model: the original's `inference_time` trainer.

  python -m vit_jax.main --config=vit_jax/configs/inference_time.py
      --workdir=W --config.batch=B --config.image_size=S

Logs images/s per device and writes `imgs_sec_core_{min,max,mean,std}` to
TensorBoard events in the workdir.
"""

import functools
import time
from typing import Dict

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models


def _check(config: ml_collections.ConfigDict) -> None:
  for name in ('batch', 'num_classes', 'image_size'):
    if not config.get(name) or config[name] <= 0:
      raise ValueError(f'inference_time needs --config.{name} > 0 (got '
                       f'{config.get(name)}).')
  if config.batch % jax.local_device_count():
    raise ValueError(f'config.batch={config.batch} is not divisible by the '
                     f'{jax.local_device_count()} local devices.')


def inference_time(config: ml_collections.ConfigDict,
                   workdir: str) -> Dict[str, float]:
  """Times inference of `config.model_name`; writes images/s to `workdir`.

  `config.batch` is global over the local devices; `initial_steps` untimed
  calls come before `steps` timed ones. Returns the scalars written.
  """
  _check(config)
  model = models.get_model(config.model_name, num_classes=config.num_classes)
  size = config.image_size
  devices = jax.local_device_count()
  # Parameters are initialised once on the host, then replicated.
  params = jax.jit(
      functools.partial(model.init, train=False),
      backend='cpu')(jax.random.PRNGKey(0), jnp.ones([1, size, size,
                                                      3]))['params']
  params_repl = flax.jax_utils.replicate(params)
  infer_repl = jax.pmap(functools.partial(model.apply, train=False))
  images = jnp.ones([devices, config.batch // devices, size, size, 3])

  # clu's writers import Keras (through TensorBoard's hparams plugin): only
  # here, not whenever vit_jax.train is imported.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, asynchronous=False)
  writer.write_hparams(config.to_dict())

  def infer():
    infer_repl({'params': params_repl}, images).block_until_ready()

  logging.info('Compiling and running %d untimed inferences...',
               config.initial_steps)
  infer()
  for _ in range(config.initial_steps):
    infer()
  times = []
  for _ in range(config.steps):
    t0 = time.perf_counter()
    infer()
    times.append(time.perf_counter() - t0)
  imgs_sec_core = config.batch / devices / np.array(times)
  scalars = {
      f'imgs_sec_core_{stat}': float(getattr(imgs_sec_core, stat)())
      for stat in ('min', 'max', 'mean', 'std')
  }
  for name, value in scalars.items():
    logging.info('%s=%f', name, value)
  writer.write_scalars(0, scalars)
  writer.flush()
  writer.close()
  return scalars

"""The original `vit_jax`'s base config, with its field names and defaults.

Code and command lines written for the original (`vit_jax/configs/vit.py`,
`augreg.py`, `mixer_base16_cifar10.py`) build on this module; their configs
run through the same `vit_jax.train.train_and_evaluate` as this project's own
(top-level `configs/`), which translates this shape with
`vit_jax.run_config.original_configs.to_project_config`. The fields:

  pretrained_dir     folder of the pre-trained `.npz` files; the checkpoint is
                     `{pretrained_dir}/{model.model_name}.npz` (released ones:
                     gs://vit_models/imagenet21k, gs://mixer_models/...).
  dataset            a TFDS name, or a folder `{train,test}/<class>/<file>`.
  tfds_manual_dir    hand-downloaded files for TFDS (e.g. ImageNet).
  tfds_data_dir      the tensorflow_datasets directory.
  total_steps        updates in the run (the dataset presets set it).
  grad_norm_clip     global-norm clip of the gradients.
  optim_dtype        dtype of the momentum ('bfloat16' or 'float32').
  accum_steps        micro-batches per device batch (saves memory).
  batch, batch_eval  global train and eval batch sizes.
  shuffle_buffer     examples in the shuffle buffer.
  eval_every         test accuracy every so many steps.
  progress_every     progress line and train metrics every so many steps.
  checkpoint_every   train-state checkpoint every so many steps (0: at the
                     end only).
  prefetch           batches put on the devices ahead of time.
  base_lr            peak learning rate (SGD with momentum 0.9).
  decay_type         'cosine' or 'linear'.
  warmup_steps       linear warmup from 0.
  trainer            'train', or 'inference_time' (vit_jax.inference_time).
  model              a ConfigDict of `vit_jax.configs.models`.
  model_type         'ViT' or 'Mixer'. The original's train reads it with a
                     default of 'ViT' and its mixer config sets it, which a
                     locked config only allows when the field exists: so it
                     is a field here (the module is picked by the model's
                     fields either way).
  model_or_filename  AugReg only (augreg.py): a model (`R_Ti_16`) or the
                     stem of one of its files.
  pp                 `train` / `test` splits, `crop` (the resolution) and
                     `resize` (accepted; this project's pipeline resizes
                     straight to `crop`).

Fields the command line may set while their value is None are typed
placeholders, so `--config.tfds_manual_dir=DIR` works.
"""

import copy
from typing import Any, Dict, Iterable, Tuple, Union

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  """The locked base config; the original's fields and defaults."""
  config = ml_collections.ConfigDict()
  config.pretrained_dir = '.'
  config.tfds_manual_dir = placeholder(str)
  config.tfds_data_dir = placeholder(str)
  config.total_steps = placeholder(int)
  config.grad_norm_clip = 1.0
  config.optim_dtype = 'bfloat16'
  config.accum_steps = 8
  config.batch = 512
  config.batch_eval = 512
  config.shuffle_buffer = 50_000
  config.eval_every = 100
  config.progress_every = 10
  config.checkpoint_every = 1_000
  config.prefetch = 2
  config.base_lr = 0.03
  config.decay_type = 'cosine'
  config.warmup_steps = 500
  config.trainer = 'train'
  config.model = None
  config.model_type = 'ViT'
  config.model_or_filename = placeholder(str)
  config.dataset = None  # Set by `with_dataset` or on the command line.
  config.pp = None  # Set by `with_dataset`.
  return config.lock()


def _preset(total_steps: int, train: str, test: str, crop: int = 384):
  return ml_collections.ConfigDict({
      'total_steps':
          total_steps,
      'pp':
          ml_collections.ConfigDict({
              'train': train,
              'test': test,
              'crop': crop
          })
  })


# The fine-tuning presets; a part of each train split is held out.
DATASET_PRESETS = {
    'cifar10': _preset(10_000, 'train[:98%]', 'test'),
    'cifar100': _preset(10_000, 'train[:98%]', 'test'),
    'imagenet2012': _preset(20_000, 'train[:99%]', 'validation'),
}


def with_dataset(config: ml_collections.ConfigDict,
                 dataset: str) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with `dataset` and its DATASET_PRESETS."""
  if dataset not in DATASET_PRESETS:
    raise ValueError(f'No preset for dataset {dataset!r}; the presets are '
                     f'{", ".join(sorted(DATASET_PRESETS))}.')
  # Deep copies: the typed placeholders stay overridable, and changing the
  # result's pp leaves the presets alone.
  config = copy.deepcopy(config).unlock()
  config.dataset = dataset
  config.update(copy.deepcopy(DATASET_PRESETS[dataset]))
  return config


def flatten(
    config: Union[ml_collections.ConfigDict, Dict[str, Any]],
    prefix: Tuple[str, ...] = ('config',)
) -> Iterable[Tuple[str, Any]]:
  """(`config.a.b`, value) of every leaf of `config`, e.g. for sweeps."""
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from flatten(value, prefix + (key,))
    else:
      yield '.'.join(prefix + (key,)), value

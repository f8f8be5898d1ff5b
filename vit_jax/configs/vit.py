r"""Fine-tunes a ViT from the zoo on a dataset preset (the original's config).

  python -m vit_jax.main --workdir=/tmp/vit \
      --config=vit_jax/configs/vit.py:b16,cifar10 \
      --config.pretrained_dir=/path/to/imagenet21k

The argument is `<model>,<dataset>`: `<model>` names a getter
`vit_jax.configs.models.get_<model>_config` (b16, l16, r50_b16, mixer_b16,
testing, ...) or of this project's `project_models` (g14, bit_r50x1, ...),
`<dataset>` a key of `common.DATASET_PRESETS` (cifar10,
cifar100, imagenet2012). The checkpoint is
`{pretrained_dir}/{model_name}.npz`, e.g. the released `ViT-B_16.npz` of
gs://vit_models/imagenet21k (a gs:// directory is read directly). Expected
results: docs/paper.md "Reproducing the paper at scale" (the same recipe as
this project's configs/finetune.py).
"""

from vit_jax.configs import common
from vit_jax.configs import models
from vit_jax.configs import project_models

_GETTERS = (models, project_models)


def model_names():
  """The `<model>` arguments: every `get_<model>_config` of the zoo."""
  return sorted(name[len('get_'):-len('_config')]
                for module in _GETTERS
                for name in dir(module)
                if name.startswith('get_') and name.endswith('_config'))


def model_config(model):
  """The zoo config of `<model>` (`get_<model>_config()`), unlocked."""
  getter = f'get_{model}_config'
  module = next(m for m in _GETTERS if hasattr(m, getter))
  return getattr(module, getter)()


def get_config(model_dataset):
  """The fine-tuning config of `<model>,<dataset>`, e.g. 'b16,cifar10'."""
  model, _, dataset = model_dataset.partition(',')
  if model not in model_names() or dataset not in common.DATASET_PRESETS:
    raise ValueError(
        f'vit.py takes "<model>,<dataset>" (e.g. vit.py:b16,cifar10); got '
        f'{model_dataset!r}. Models: {", ".join(model_names())}. Datasets: '
        f'{", ".join(sorted(common.DATASET_PRESETS))}.')
  config = common.with_dataset(common.get_config(), dataset)
  config.model = model_config(model)
  if (model, dataset) == ('b16', 'cifar10'):
    config.base_lr = 0.01
  return config

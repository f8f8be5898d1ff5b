"""Pre-training -> fine-tuning, offline, step 3: fine-tune at a higher resolution.

  python -m vit_jax.main --config=configs/embedded_finetune.py:/tmp/ViT-mnist_7.npz \\
      --workdir=/tmp/mnist_ft

(see configs/embedded_pretrain.py for steps 1 and 2). Without the argument
the file is `<pretrained_dir>/<model_name>.npz` = `./ViT-mnist_7.npz`, the
original's convention. `vit_jax.checkpoint.load_pretrained` adapts it: the
4x4 grid of position embeddings (28x28 images, 7x7 patches) is resampled to
6x6 for 42x42 images, `pre_logits` is dropped (representation_size=None, as
the paper fine-tunes) and the head starts at zero. The recipe is the paper's
fine-tuning one scaled down: SGD with momentum 0.9, gradient clip 1, no
weight decay, warmup then cosine decay.

Expected result (2-core CPU, jax 0.10.2), from the checkpoint of
configs/embedded_pretrain.py (0.962): 0.959 test accuracy after 300 steps.
The same config from scratch (--config.pretrained_dir=) reaches 0.507 in
these 300 steps: the pre-trained weights, not the short fine-tuning, do the
work. From the masked-patch-prediction checkpoint of configs/embedded_mpp.py
it reaches 0.483: at this scale that pre-training does not help.
"""

from vit_jax.configs import experiments

embedded = experiments.sibling(__file__, 'embedded')


def get_config(pretrained_path: str = ''):
  """Returns the fine-tuning config; the argument is the pre-trained .npz."""
  config = embedded.get_digits_config()
  config.model.representation_size = None
  config.model.posemb = 'learn'  # as pre-trained
  if pretrained_path:
    config.pretrained_path = pretrained_path
  else:
    config.pretrained_dir = '.'
  config.pp.crop = 42
  config.pp.shift_pad = 3  # 2 pixels at 28x28, rescaled
  config.optimizer = 'sgd_momentum'
  config.optim_dtype = 'bfloat16'
  config.weight_decay = 0.0
  config.base_lr = 0.01
  config.total_steps = 300
  config.warmup_steps = 30
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0
  config.log_every = 50
  config.eval_every = 100
  config.checkpoint_every = 100
  return config

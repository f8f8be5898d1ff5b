"""Self-supervised pre-training by masked patch prediction, offline (Sec. 4.6).

The paper's masked patch prediction (vit_jax/masked_patch.py) in miniature
on the embedded digits, then fine-tuning like any pre-trained model:

  python -m vit_jax.main --config=configs/embedded_mpp.py --workdir=/tmp/mnist_mpp
  python -m vit_jax.export --workdir=/tmp/mnist_mpp --output=/tmp/ViT-mnist_7_mpp.npz
  python -m vit_jax.main --config=configs/embedded_finetune.py:/tmp/ViT-mnist_7_mpp.npz \\
      --workdir=/tmp/mnist_mpp_ft

The labels are never used in pre-training: 50% of the patch embeddings are
corrupted (80% [mask], 10% another patch, 10% kept) and the model predicts
each corrupted patch's 3-bit mean colour (512 classes; grey digits use only
8 of them). The "test accuracy" it reports is the mean-colour accuracy on
the corrupted patches of the test digits. As in the paper there is no
representation layer; the model has learned position embeddings so that
fine-tuning at 42x42 resamples them. Adam with decoupled weight decay, as
the paper's pre-training.

Expected result: see README "Results of this code" (the command above, 2
CPU cores).
"""

from configs import embedded


def get_config():
  """Returns the masked-patch-prediction pre-training config."""
  config = embedded.get_config()
  config.objective = 'mpp'
  config.model.posemb = 'learn'
  config.model.representation_size = None
  config.pp.augment = 'shift'
  config.weight_decay = 0.05
  config.base_lr = 1e-3
  config.total_steps = 1_000
  config.warmup_steps = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  return config

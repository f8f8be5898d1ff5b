"""Self-supervised pre-training by masked patch prediction, offline (Sec. 4.6).

The paper's masked patch prediction (vit_jax/models_mpp.py) in miniature
on the embedded digits, then fine-tuning like any pre-trained model:

  python -m vit_jax.main --config=configs/embedded_mpp.py --workdir=/tmp/mnist_mpp
  python -m vit_jax.checkpoints.export --workdir=/tmp/mnist_mpp --output=/tmp/ViT-mnist_7_mpp.npz
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

Expected result (the commands above, 2-core CPU, jax 0.10.2): mean-colour
accuracy 0.700 on the corrupted test patches after 1,000 steps (predicting
the most common colour bin everywhere gives 0.633; the loss falls from
ln 512 = 6.24 to 0.83); fine-tuning from it at 42x42 reaches 0.483 test
accuracy after 300 steps, against 0.507 from scratch and 0.959 from the
supervised pre-training of configs/embedded_pretrain.py. On 28x28 grey
digits the 3-bit mean colour of a 7x7 patch is mostly "black" and has only
8 grey levels, so this pretext task teaches little; the paper's gain (79.9%
on ImageNet for ViT-B/16, +2% over scratch) needs natural images at scale.
"""

from vit_jax.configs import experiments

embedded = experiments.sibling(__file__, 'embedded')


def get_config():
  """Returns the masked-patch-prediction pre-training config."""
  config = embedded.get_digits_config()
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

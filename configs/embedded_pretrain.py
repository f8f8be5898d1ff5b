"""Pre-training -> fine-tuning, offline, step 1: pre-train with a representation layer.

The paper's pipeline (pre-train on ImageNet-21k, fine-tune at a higher
resolution with a new head; Sec. 3.2 and 4.1) in miniature on the embedded
MNIST digits, so it runs anywhere without network:

  python -m vit_jax.main --config=configs/embedded_pretrain.py --workdir=/tmp/mnist_pre
  python -m vit_jax.checkpoints.export --workdir=/tmp/mnist_pre --output=/tmp/ViT-mnist_7.npz
  python -m vit_jax.main --config=configs/embedded_finetune.py:/tmp/ViT-mnist_7.npz \\
      --workdir=/tmp/mnist_ft

As for ImageNet-21k (configs/imagenet21k.py) the model has a tanh
representation layer (`pre_logits`, size = hidden) and trains with Adam and
decoupled weight decay at the low resolution, here 28x28 (a 4x4 grid of 7x7
patches). Step 3 fine-tunes at 42x42 (6x6 grid): position embeddings
resampled, `pre_logits` dropped, a fresh zero head.

Expected result (measured with the three commands above, 2-core CPU, jax
0.10.2): 0.962 test accuracy after the 1,000 pre-training
steps (few-shot linear probes on its pre-logits at step 1,000, with
--config.fewshot.every_steps=1000: 1-shot 0.953, 5-shot 0.960, 10-shot
0.963, 25-shot 0.962, mean of 3 seeds); then 0.959 after fine-tuning at
42x42 for 300 steps (configs/embedded_finetune.py), where the same
fine-tuning run from scratch (--config.pretrained_dir=) reaches 0.507.
"""

from vit_jax.configs import experiments

embedded = experiments.sibling(__file__, 'embedded')


def get_config():
  """Returns the pre-training config."""
  config = embedded.get_digits_config()
  config.model.representation_size = config.model.hidden_size
  # Learned position embeddings, as the paper's: they are what fine-tuning
  # at another resolution resamples.
  config.model.posemb = 'learn'
  # The paper's pre-training regularisation (Table 3: 0.03-0.1), not the
  # main job's strong 0.5, which is tuned for the final accuracy of a
  # from-scratch run and leaves features that fine-tune worse.
  config.weight_decay = 0.05
  config.total_steps = 1_000
  return config

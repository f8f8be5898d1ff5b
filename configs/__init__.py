"""Experiment configs for `python -m vit_jax.main --config=configs/<file>.py`."""

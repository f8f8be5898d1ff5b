"""The run config: every check before data is read, and the original vit_jax
config shape translated.
"""

"""Parameter trees below `vit_jax.checkpoint`: nesting, the `.npz` naming
schemes, scanned layouts, position-embedding grids.
"""

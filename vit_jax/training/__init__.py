"""The train step's parts: objectives, optimizers, trainable masks, the sharded
step, orbax checkpoints, progress and the multi-process supervisor.
"""

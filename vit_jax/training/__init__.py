"""The train step's parts: objectives, optimizers, masks, EMA, guards."""

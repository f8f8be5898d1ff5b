"""Evaluating a trained model: loading it from a workdir or a checkpoint, class
names, few-shot linear probes.
"""

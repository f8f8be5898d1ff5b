"""Side tools: weights to and from Hugging Face and torchvision, workdir
export, the checkpoint command line.
"""

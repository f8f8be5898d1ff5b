"""Data sources below the input pipeline: paths, image folders, TFDS."""

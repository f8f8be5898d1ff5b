"""Data sources below the input pipeline: paths, image folders, TFDS, the
embedded digits, dataset checks."""

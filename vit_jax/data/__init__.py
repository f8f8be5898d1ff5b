"""Data below the input pipeline: local and gs:// paths, image-folder splits,
the run's dataset report.
"""

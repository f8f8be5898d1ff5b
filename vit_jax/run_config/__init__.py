"""The run config: checks before data is read; the original's shape."""

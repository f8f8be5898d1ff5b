"""What guards a run: stop signals, workdir lock, disk and memory checks."""

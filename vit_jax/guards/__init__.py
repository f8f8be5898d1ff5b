"""What guards a run: stop signals, the workdir lock, disk space and
memory checks."""

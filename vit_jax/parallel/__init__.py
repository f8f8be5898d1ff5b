"""Data parallelism: runners, device meshes, the sharded step and the
multi-process supervisor."""

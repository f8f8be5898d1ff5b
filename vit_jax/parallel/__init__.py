"""Parallel training: the pmap and FSDP runners, device meshes, the sharded
step and the multi-process supervisor."""

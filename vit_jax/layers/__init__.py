"""Model building blocks: attention, block stacks, bf16 matmuls, checks."""

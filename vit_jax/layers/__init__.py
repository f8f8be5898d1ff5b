"""Model building blocks: the attention functions and bf16 matmuls with f32
accumulation.
"""

"""The paper's figures drawn from a model (attention, embeddings, position
similarity).
"""

"""The building blocks: sharded linear layers and norms, attention kinds, rotary embeddings, MoE."""

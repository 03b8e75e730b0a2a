"""The on-disk cache: frames, embeddings, records and frame claims."""

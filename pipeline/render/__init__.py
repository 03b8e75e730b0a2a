"""Rendering: models, the diffusers pipelines, and the loop that feeds them batches."""

"""Planning: a scene expanded into per-frame recipes and their cache keys (no torch)."""

"""Outputs: MP4/GIF/PNG writers, the records beside them, plots and previews (no torch)."""

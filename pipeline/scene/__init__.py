"""Scene files: the pydantic schema, loading with located problems, and the rules a scene must keep."""

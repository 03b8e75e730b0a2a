"""``python -m pipeline SCENE ...`` works like ``python render.py SCENE ...``."""

from pipeline.cli import main

main()

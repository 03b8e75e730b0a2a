#!/usr/bin/env python3
"""Render a scene file: ``python render.py scenes/dog_cat.yaml`` (``--help`` for options).

On a fresh clone the first run sets the project up (``pipeline.bootstrap``: ``setup.sh`` once, then
the command goes on inside ``.venv``); in an environment that already has the dependencies it just runs.
"""

from pipeline.bootstrap import ensure

if __name__ == "__main__":
    ensure()

    from pipeline.cli import main  # only once the dependencies are there

    main()

#!/usr/bin/env python3
"""Render a scene file: ``python render.py scenes/dog_cat.yaml`` (``--help`` for options)."""

from pipeline.cli import main

if __name__ == "__main__":
    main()

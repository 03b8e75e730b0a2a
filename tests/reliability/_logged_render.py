"""``python tests/reliability/_logged_render.py LOG SCENE [OPTIONS]``: ``render.py SCENE [OPTIONS]`` that
also appends one line ``<frame key> <pid>`` to LOG for every frame this process stores.

The log is written from the public API's progress callback (``pipeline.cli.main(progress=...)``), which
hears of each frame the moment it is stored: the reliability tests count renders across processes and
kills with it, without any test hook inside the program.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.cli import main
from tests.reliability._util import frame_logger

if __name__ == "__main__":
    main(sys.argv[2:], progress=frame_logger(Path(sys.argv[1])))

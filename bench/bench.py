"""``python -m bench.bench`` from a checkout, kept for the commands in bench/NOTES.md: the benchmark itself is
``mosaic_core.bench.engine`` (``mosaic bench engine``)."""

from __future__ import annotations

import sys

from mosaic_core.bench.engine import main

if __name__ == "__main__":
    sys.exit(main())

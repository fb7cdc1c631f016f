"""``python -m bench.side_by_side --switch small-pass-kernels``, under the name session 29's notes use."""

from __future__ import annotations

import sys

from bench.side_by_side import main

if __name__ == "__main__":
    raise SystemExit(main(["--switch", "small-pass-kernels", *sys.argv[1:]]))

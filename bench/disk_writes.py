"""How fast this machine can make cluster records durable: CRC-32 and write+fsync of record-sized files.

    python -m bench.disk_writes --dir DIR [--mib 58] [--files 16] [--threads 1,4]

A record of an 8-frame cluster of the qwen2.5-vl-7b shape is about 58 MiB (7.2 MB of KV a frame). Each thread
count writes ``--files`` files of random bytes the way ``mosaic_core.durable`` does (CRC-32 of the bytes, write,
fsync, rename) and reports GB/s over all threads; the files are deleted afterwards. 64 cameras at 1 fps seal
about 0.46 GB a second.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _write(path: Path, data: memoryview) -> None:
    zlib.crc32(data)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="a folder on the disk the data directory would use")
    parser.add_argument("--mib", type=int, default=58)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--threads", default="1,4")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    data = memoryview(os.urandom(args.mib << 20))
    started = time.perf_counter()
    for _ in range(4):
        zlib.crc32(data)
    report = {"file_mib": args.mib, "crc32_gbs": 4 * len(data) / (time.perf_counter() - started) / 1e9}
    for threads in [int(t) for t in args.threads.split(",")]:
        paths = [args.dir / f"record-{threads}-{i}.mkv" for i in range(args.files)]
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: _write(p, data), paths))
        elapsed = time.perf_counter() - started
        report[f"write_fsync_gbs_{threads}_threads"] = args.files * len(data) / elapsed / 1e9
        for path in paths:
            path.unlink()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

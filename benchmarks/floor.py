"""The I/O floor: read every input byte once, write the output's bytes once. No arithmetic.

Run as `python -m benchmarks.floor OUT_BYTES OUT_FOLDER INPUT_FOLDER...` in its own process, so
the harness measures it exactly like the merge tools.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHUNK = 16 << 20


def main(argv: list[str]) -> None:
    out_bytes, out, inputs = int(argv[0]), Path(argv[1]), [Path(p) for p in argv[2:]]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for folder in inputs:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    out.mkdir(parents=True)
    with open(out / "model.safetensors", "wb", buffering=0) as f:
        left = out_bytes
        while left:
            left -= f.write(view[: min(left, CHUNK)])
        os.fsync(f.fileno())


if __name__ == "__main__":
    main(sys.argv[1:])

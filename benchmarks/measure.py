"""`python -m benchmarks.measure LOG sync|nosync CMD...` runs CMD and prints its wall time, CPU time and peak RSS as JSON on the last line.

A separate small process, so the child's peak RSS is its own: a child forked from the harness
(which has torch loaded) would inherit the harness's resident size as its starting peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> None:
    log, sync = argv[0], argv[1] == "sync"
    with open(log, "w") as lf:
        start = time.perf_counter()
        proc = subprocess.Popen(argv[2:], stdout=lf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        ran = time.perf_counter() - start
        if sync:
            os.sync()
        wall = time.perf_counter() - start
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "ran": ran,
                      "cpu": usage.ru_utime + usage.ru_stime, "rss_kb": usage.ru_maxrss}))


if __name__ == "__main__":
    main(sys.argv[1:])

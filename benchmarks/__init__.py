"""Merge speed and memory against mergekit and the I/O floor (`make bench`), and the fusion cost
(`make bench-fusion`).

Every runner's process inherits OMP_WAIT_POLICY=PASSIVE (unless set), as `merge-lab` itself sets it:
torch threads that spin while they wait are several times slower on shared cores, and every
runner (mergekit included) should be timed under the same setting."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""Merge speed and memory against mergekit and the I/O floor (`make bench`)."""

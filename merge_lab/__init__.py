"""merge_lab: merge and fuse language models."""

__version__ = "0.1.0"

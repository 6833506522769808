"""`python -m merge_lab` runs the CLI."""

from merge_lab.cli import main

main()

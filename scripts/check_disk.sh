#!/bin/sh
# Fails early, with what to do, when the folder's filesystem cannot hold the install.
# Usage: check_disk.sh FOLDER MEGABYTES   (a fresh .venv with the CPU torch measured 2.0 GB)
set -u
dir=$1
need_mb=$2
mkdir -p "$dir"
free_mb=$(df -Pm "$dir" | awk 'NR == 2 { print $4 }')
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "error: setup needs about $need_mb MB free for $dir, and its filesystem has $free_mb MB." >&2
    echo "  Free some space (or point VENV= at a larger disk: make test VENV=/big/disk/venv), then rerun." >&2
    exit 1
fi
exit 0

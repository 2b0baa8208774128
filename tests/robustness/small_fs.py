"""A real, small file system for full-disk tests: a tmpfs of a few MiB mounted on a temporary folder
(needs root / CAP_SYS_ADMIN, which the CI machines have); `fill` takes all its free space."""

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kib: int):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"FULL-DISK TEST NOT RUN: cannot mount a tmpfs ({done.stderr.strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path, *, leave: int = 0) -> Path:
    """Write a ballast file until the file system is full (keeping ``leave`` bytes free); returns it."""
    ballast = folder / "ballast.bin"
    with open(ballast, "wb", buffering=0) as f:
        block = b"\0" * 65536
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                break
            try:
                f.write(block[: max(1, min(len(block), free - leave))])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return ballast

"""Atomic writes (cubcam.cams.files): a write killed half-way leaves a temporary file that the next write in its
folder removes, but never one that a live process is still writing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cubcam.cams.files import write_bytes


def partial_of(folder: Path, target: str, pid: int) -> Path:
    """A temporary file as a writer ``pid`` leaves it when killed mid-write."""
    path = folder / f".{target}.{pid}-k3x9q2.partial"
    path.write_bytes(b"half a checkpoint")
    return path


def test_a_killed_writer_s_partial_file_goes_at_the_next_write_a_live_one_s_stays(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # that process has exited: its pid names no process (barring reuse, rare)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = partial_of(tmp_path, "best-epoch=1.ckpt", dead)
        busy = partial_of(tmp_path, "best-epoch=2.ckpt", live.pid)
        foreign = tmp_path / ".notes.txt.partial"  # not a name cubcam writes: not ours to remove
        foreign.write_bytes(b"x")
        write_bytes(tmp_path / "last.ckpt", b"checkpoint")
        assert not stale.exists() and busy.exists() and foreign.exists()
        assert (tmp_path / "last.ckpt").read_bytes() == b"checkpoint"
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".partial") == sorted([busy.name, foreign.name])
    finally:
        live.kill()
        live.wait()

"""Atomic writes: permissions as a plain open() gives them, without touching the process umask."""

from __future__ import annotations

import os
import stat

import pytest

from convscope._io import atomic_path, save_json


def test_atomic_file_gets_the_umask_permissions_without_toggling_the_umask(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def no_umask(_mask):    # os.umask sets the process-wide mask: another thread may create files meanwhile
            raise AssertionError("atomic_path changed the process umask")

        monkeypatch.setattr(os, "umask", no_umask)
        save_json({"a": 1}, tmp_path / "x.json")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

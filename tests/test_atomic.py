"""Outputs appear whole or not at all."""

import pytest

from femursr.atomic import atomic_dir, atomic_file, write_tsv


def test_atomic_file_and_dir_on_success(tmp_path):
    with atomic_file(tmp_path / "a.txt") as t:
        t.write_text("x")
        assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "a.txt").read_text() == "x"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    with atomic_dir(tmp_path / "d") as t:
        (t / "new").write_text("new")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]


def test_nothing_left_on_error(tmp_path):
    (tmp_path / "keep.tsv").write_text("previous\n")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "keep.tsv") as t:
            t.write_text("half")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "dir") as t:
            (t / "part").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tsv"]
    assert (tmp_path / "keep.tsv").read_text() == "previous\n"


def test_write_tsv(tmp_path):
    import pandas as pd

    write_tsv(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.tsv")
    assert (tmp_path / "t.tsv").read_text() == "a\n1\n2\n"

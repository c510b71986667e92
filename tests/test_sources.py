"""Image sources: files, folders, ``skimage:`` names and ``;`` lists as sorted files; the LQ naming rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from xswinir.sources import (
    SKIMAGE_FILES,
    SKIMAGE_SETS,
    absolute_source,
    lq_candidates,
    resolve_image_files,
    skimage_data_dir,
)


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # the scan looks at names only; nothing is decoded


def test_folder_scan_skips_hidden_files(tmp_path: Path) -> None:
    _touch(*(tmp_path / name for name in ("a.png", "._a.png", ".out.png.1234.tmp.png")))
    assert [p.name for p in resolve_image_files(tmp_path)] == ["a.png"]


def test_folders_are_searched_recursively_for_image_suffixes(tmp_path: Path) -> None:
    _touch(tmp_path / "b.JPG", tmp_path / "sub" / "a.webp", tmp_path / "a.png", tmp_path / "notes.txt")
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_image_files(tmp_path)] == [
        "a.png", "b.JPG", "sub/a.webp"]
    assert resolve_image_files(tmp_path / "a.png") == [tmp_path / "a.png"]


def test_lists_and_skimage_names(tmp_path: Path) -> None:
    _touch(tmp_path / "x" / "1.png", tmp_path / "y" / "2.png")
    files = resolve_image_files(f"{tmp_path / 'y'}; {tmp_path / 'x'};skimage:camera,val")
    assert files == [tmp_path / "y" / "2.png", tmp_path / "x" / "1.png", skimage_data_dir() / "camera.png",
                     *(skimage_data_dir() / SKIMAGE_FILES[name] for name in SKIMAGE_SETS["val"])]
    assert all(p.is_file() for p in files[2:])  # the names point at files the wheel ships


def test_missing_sources_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="'nope' is not an image shipped with scikit-image"):
        resolve_image_files("skimage:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_image_files(tmp_path / "missing")
    _touch(tmp_path / "empty" / "notes.txt")
    with pytest.raises(FileNotFoundError, match="holds no image files"):
        resolve_image_files(tmp_path / "empty")


def test_absolute_source_keeps_uris_and_skimage_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "a" / "1.png")
    monkeypatch.chdir(tmp_path)
    assert absolute_source("a;skimage:val;s3://bucket/shards;not_here") == \
        f"{tmp_path / 'a'};skimage:val;s3://bucket/shards;not_here"


def test_lq_candidates_follow_the_benchmark_naming() -> None:
    assert lq_candidates("sub/baby.png", 2) == ["babyx2", "baby_x2", "baby"]

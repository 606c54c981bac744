"""Large folders start fast: the image list of a folder is scanned once and cached, in the order of the
``sorted(rglob)`` scan it replaces, and scanned again when any folder in it changes."""

from pathlib import Path

import pytest

import ibot.data.datasets as datasets
from ibot.data.datasets import FileImageDataset, image_files


@pytest.fixture
def scans(tmp_path, monkeypatch):
    """Counts the real scans; the cache is this test's own."""
    monkeypatch.setattr(datasets, "CACHE", tmp_path / "cache")
    calls, real = [], datasets._scan
    monkeypatch.setattr(datasets, "_scan", lambda root: calls.append(root) or real(root))
    return calls


def _touch(root: Path, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _rglob(root: Path) -> list[str]:  # the scan the listing replaces
    return [str(p) for p in sorted(root.rglob("*")) if p.suffix.lower() in datasets.IMG_EXTENSIONS and p.is_file()]


def test_listing_matches_sorted_rglob_and_is_cached(tmp_path, scans):
    root = tmp_path / "imgs"
    _touch(root, ["a-b/1.png", "a/2.JPG", "a/b/3.png", "a.b/4.webp", "a/notes.txt", "z.png", "a/c/d/5.jpeg"])
    (root / "dir.png").mkdir()  # a folder named like an image is not an image
    assert image_files(root) == _rglob(root) and len(_rglob(root)) == 6
    assert image_files(root) == _rglob(root) and len(scans) == 1  # the second start reads the cache
    _touch(root, ["a/c/d/6.png"])  # a file added deep inside: its folder's mtime changes
    assert image_files(root) == _rglob(root) and len(_rglob(root)) == 7 and len(scans) == 2
    (root / "z.png").unlink()
    assert image_files(root) == _rglob(root) and len(scans) == 3


def test_imagefolder_uses_the_cached_class_lists(tmp_path, scans):
    root = tmp_path / "imgs"
    _touch(root, [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)])
    first = FileImageDataset(root)
    again = FileImageDataset(root)
    assert first.samples == again.samples and [s[1] for s in first.samples] == [0, 0, 0, 1, 1, 1]
    assert len(scans) == 2  # one per class folder, once

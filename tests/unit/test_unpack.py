"""Layer application on real files: whiteouts, opaque dirs, and hostile paths staying inside the tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.build.tarread import ArchiveError, TarLimits
from ember.build.unpack import Capacity, Tree
from tests.oci_images import Entry, compress, layer_tar

DISK = Capacity(1 << 20, "EMBER_DISK_GIB")
LIMITS = TarLimits(max_bytes=1 << 30, max_members=10_000, max_header=1 << 20, max_depth=64, max_file=1 << 30)


def write(tmp: Path, name: str, entries: list[Entry], how: str = "none") -> Path:
    data, _ = compress(layer_tar(entries), how)
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    return root


LOWER = [
    Entry("usr/", "dir"), Entry("usr/lib/", "dir"), Entry("usr/lib/old", data=b"old"),
    Entry("lib", "symlink", target="/usr/lib"), Entry("up", "symlink", target="../../../.."),
    Entry("gone", data=b"x"), Entry("keep", data=b"k"), Entry("opq/", "dir"), Entry("opq/old", data=b"o"),
    Entry("bin/", "dir"), Entry("bin/tool", data=b"#!", mode=0o4755),
]  # fmt: skip


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_layers_apply_with_whiteouts_and_opaque_dirs(tmp_path: Path, tree: Path, how: str) -> None:
    upper = [
        Entry(".wh.gone"), Entry("opq/.wh..wh..opq"), Entry("opq/new", data=b"n"), Entry("lib/via-link", data=b"v"),
        Entry("hard", "link", target="keep"), Entry(".wh.never-existed"), Entry("nodir/.wh.x"),
    ]  # fmt: skip
    with Tree(tree, LIMITS, capacity=DISK) as t:
        t.apply(write(tmp_path, "l1", LOWER, how))
        t.apply(write(tmp_path, "l2", upper, how))
    assert not (tree / "gone").exists() and (tree / "keep").read_bytes() == b"k"
    assert sorted(os.listdir(tree / "opq")) == ["new"]
    assert (tree / "usr/lib/via-link").read_bytes() == b"v"  # an absolute link resolves inside the tree
    assert os.stat(tree / "hard").st_ino == os.stat(tree / "keep").st_ino
    assert os.stat(tree / "bin/tool").st_mode & 0o7777 == 0o4755


def test_an_opaque_marker_keeps_what_its_own_layer_adds(tmp_path: Path, tree: Path) -> None:
    with Tree(tree, LIMITS, capacity=DISK) as t:
        t.apply(write(tmp_path, "l1", LOWER))
        t.apply(write(tmp_path, "l2", [Entry("opq/", "dir"), Entry("opq/mine", data=b"m"), Entry("opq/.wh..wh..opq")]))
    assert os.listdir(tree / "opq") == ["mine"]


def test_hostile_paths_stay_inside_the_tree(tmp_path: Path, tree: Path) -> None:
    hostile = [
        Entry("../escaped-dotdot", data=b"x"), Entry("/escaped-abs", data=b"x"), Entry("up/escaped-link", data=b"x"),
        Entry("lib/../../../escaped-mixed", data=b"x"), Entry("opq/..", data=b"not opq"),
        Entry("hl", "link", target="../../../../etc/passwd"),
    ]  # fmt: skip
    with Tree(tree, LIMITS, capacity=DISK) as t:
        t.apply(write(tmp_path, "l1", LOWER))
        with pytest.raises(ArchiveError):  # the hard link's target resolves to the tree's /etc/passwd: absent
            t.apply(write(tmp_path, "l2", hostile))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l1", "l2", "tree"]
    for name in ("escaped-dotdot", "escaped-abs", "escaped-link", "escaped-mixed"):
        assert (tree / name).read_bytes() == b"x"
    assert os.listdir(tree / "opq") == ["old"]  # "opq/.." names the root (skipped), not opq


def test_whiteout_of_the_parent_directory_is_refused(tmp_path: Path, tree: Path) -> None:
    with Tree(tree, LIMITS, capacity=DISK) as t, pytest.raises(ArchiveError, match="whiteout"):
        t.apply(write(tmp_path, "l1", [Entry("a/", "dir"), Entry("a/.wh..")]))
    assert tmp_path.exists()


def test_a_layer_larger_than_the_disk_is_refused(tmp_path: Path, tree: Path) -> None:
    with (
        Tree(tree, LIMITS, capacity=Capacity(1000, "EMBER_DISK_GIB")) as t,
        pytest.raises(ArchiveError, match="more than 1000 bytes"),
    ):
        t.apply(write(tmp_path, "big", [Entry("big", data=b"x" * 2000)], "zstd"))


def test_a_file_replaces_a_directory_and_a_link_replaces_a_file(tmp_path: Path, tree: Path) -> None:
    with Tree(tree, LIMITS, capacity=DISK) as t:
        t.apply(write(tmp_path, "l1", LOWER))
        t.apply(write(tmp_path, "l2", [Entry("opq", data=b"now a file"), Entry("keep", "symlink", target="gone")]))
    assert (tree / "opq").read_bytes() == b"now a file"
    assert os.readlink(tree / "keep") == "gone"


def test_a_corrupt_layer_is_a_layer_error(tmp_path: Path, tree: Path) -> None:
    path = write(tmp_path, "l1", LOWER, "gzip")
    path.write_bytes(path.read_bytes()[:200])
    with Tree(tree, LIMITS, capacity=DISK) as t, pytest.raises(ArchiveError):
        t.apply(path)

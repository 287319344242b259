"""Ember's tar reader and trees against hostile archives: escapes, bombs, deep trees, odd formats."""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import random
import stat
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from ember.build.context import BuildContext
from ember.build.dockerfile import DockerfileError
from ember.build.tarread import ArchiveError, Kind, TarLimits, is_tar, open_tar
from ember.build.unpack import Capacity, Tree, remove_tree

DISK = Capacity(1 << 20, "EMBER_DISK_GIB")
LIMITS = TarLimits(max_bytes=256 << 20, max_members=100_000, max_header=1 << 20, max_depth=64, max_file=64 << 20)
MiB = 1 << 20


def tar_bytes(add: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in add:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return i


def symlink_chain_tar(escape_to: str, dockerfile: bytes = b"FROM scratch\n") -> bytes:
    """CVE-2025-4517's archive: a symlink chain past PATH_MAX makes the data filter's realpath check
    pass, then ``escape`` leads to ancestors of the destination and ``escape/<escape_to>`` is written."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:
        members.append((info(os.path.join(path, comp), tarfile.DIRTYPE), None))
        members.append((info(os.path.join(path, step), tarfile.SYMTYPE, comp), None))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append((info(linkpath, tarfile.SYMTYPE, "../" * len(steps)), None))
    members.append((info("escape", tarfile.SYMTYPE, linkpath + "/.." * 3), None))
    members.append((info("escape/" + escape_to), b"written through the escape\n"))
    members.append((info("Dockerfile"), dockerfile))
    return tar_bytes(members)


def apply(root: Path, data: bytes, *, layer: bool, limits: TarLimits = LIMITS) -> None:
    with Tree(root, limits) as tree:
        tree.apply_stream(io.BytesIO(data), layer=layer)


@pytest.mark.parametrize("layer", [False, True])
def test_context_and_oci_archive_symlink_chain_cannot_escape(tmp_path: Path, layer: bool) -> None:
    outer = tmp_path / "a" / "b"
    root = outer / "context"
    root.mkdir(parents=True)
    apply(root, symlink_chain_tar("escaped-c1"), layer=layer)
    assert sorted(p.name for p in tmp_path.rglob("escaped-c1")) == ["escaped-c1"]
    assert (root / "escaped-c1").read_bytes() == b"written through the escape\n"  # it landed at the tree's root
    # and reading through the tree resolves the same way: inside
    with BuildContext(root, LIMITS) as ctx:
        assert ctx.dockerfile_text() == "FROM scratch\n"
        assert ctx.tree.read_bytes("escape/escaped-c1", 100) == b"written through the escape\n"


def test_a_hard_link_cannot_reach_outside(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    root = tmp_path / "ctx"
    root.mkdir()
    data = tar_bytes([(info("up", tarfile.SYMTYPE, "../.."), None), (info("hl", tarfile.LNKTYPE, "up/secret"), None)])
    with pytest.raises(ArchiveError):
        apply(root, data, layer=False)
    assert not (root / "hl").exists() and secret.stat().st_nlink == 1


def test_context_reads_never_follow_a_link_out(tmp_path: Path) -> None:
    secret = tmp_path / "host-file"
    secret.write_text("host secret")
    root = tmp_path / "ctx"
    root.mkdir()
    # links as a tenant's upload can hold them: to the host's directories, absolute and relative
    data = tar_bytes([
        (info("etc", tarfile.SYMTYPE, str(tmp_path)), None), (info("rel", tarfile.SYMTYPE, "../../.."), None),
        (info("Dockerfile", tarfile.SYMTYPE, str(secret)), None), (info("real"), b"inside"),
    ])  # fmt: skip
    apply(root, data, layer=False)
    with BuildContext(root, LIMITS) as ctx:
        with pytest.raises(Exception, match="Dockerfile"):
            ctx.dockerfile_text()  # resolves to <tree>/<tmp_path>/host-file: absent
        assert not ctx.exists("etc/host-file") and not ctx.exists("rel/host-file")
        assert ctx.exists("rel/real") and ctx.walk("rel") == ["rel"]  # a link is listed, never descended
        assert ctx.is_archive("etc") is False


def test_decompression_bombs_are_capped(tmp_path: Path) -> None:
    bomb = lzma.compress(tar_bytes([(info("zeros"), bytes(64 * MiB))]))
    assert len(bomb) < 64 * 1024
    small = TarLimits(**{**LIMITS.__dict__, "max_bytes": 16 * MiB})
    with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_BYTES"):
        apply(tmp_path, bomb, layer=False, limits=small)
    one_file = TarLimits(**{**LIMITS.__dict__, "max_file": 8 * MiB})
    with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_FILE_BYTES"):
        apply(tmp_path, bomb, layer=False, limits=one_file)


@pytest.mark.parametrize("flag", [b"x", b"L"])
def test_layer_pax_and_longname_header_bombs_are_refused(flag: bytes) -> None:
    """A 192 MiB extended header (a few hundred kB compressed) is refused before it is read."""
    size = 192 * MiB
    header = tarfile.TarInfo("././@LongLink" if flag == b"L" else "pax")
    header.type, header.size = flag, size
    head = header.tobuf(tarfile.USTAR_FORMAT)
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(head + bytes(size) + bytes(1024))
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_HEADER_BYTES"), open_tar(io.BytesIO(blob), LIMITS) as r:
            list(r)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"refusing the header cost {peak >> 20} MiB"


def test_extended_header_chains_and_global_headers_are_bounded() -> None:
    pax = tarfile.TarInfo("x")
    pax.type = tarfile.XHDTYPE
    record = b"20 comment=aaaaaaaa\n"
    pax.size = len(record)
    one = pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
    with pytest.raises(ArchiveError, match="in a row"), open_tar(io.BytesIO(one * 5000 + bytes(1024)), LIMITS) as r:
        list(r)  # a chain that tarfile follows by recursion
    glob = tarfile.TarInfo("g")
    glob.type = tarfile.XGLTYPE
    records = []
    for i in range(4):
        body = f"SCHILY.xattr.user.{i}={'a' * 400_000}\n"
        records.append(f"{len(body) + 7} {body}".encode())
    data = b""
    for rec in records:
        glob.size = len(rec)
        data += glob.tobuf(tarfile.USTAR_FORMAT) + rec + bytes(-len(rec) % 512)
    data += tar_bytes([(info("f"), b"x")])
    with pytest.raises(ArchiveError, match="global PAX"), open_tar(io.BytesIO(data), LIMITS) as r:
        list(r)


def test_layer_member_count_memory_is_bounded() -> None:
    """150 000 empty members in a few kB of zstd: counted, refused past the limit, no member list kept."""
    one = tarfile.TarInfo("e")
    one.type = tarfile.DIRTYPE
    block = one.tobuf(tarfile.USTAR_FORMAT)
    blob = zstandard.ZstdCompressor().compress(block * 150_000 + bytes(1024))
    assert len(blob) < 64 * 1024
    tracemalloc.start()
    try:
        with open_tar(io.BytesIO(blob), TarLimits(**{**LIMITS.__dict__, "max_members": 1_000_000})) as r:
            assert sum(1 for _ in r) == 150_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"reading 150 000 members kept {peak >> 20} MiB"
    with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_MEMBERS"), open_tar(io.BytesIO(blob), LIMITS) as r:
        list(r)


def test_deep_tree_whiteout_is_a_layer_error_and_tree_is_removed(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 1500)
    root = tmp_path / "tree"
    root.mkdir()
    with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_DEPTH"):
        apply(root, tar_bytes([(info(deep + "/f"), b"x"), (info(".wh.d"), b"")]), layer=True)
    # symlinks cannot build a deeper tree than the limit either: each link adds 40 levels
    chain = [(info("l0", tarfile.SYMTYPE, "/".join(["a"] * 40)), None)]
    chain += [(info(f"l{i}", tarfile.SYMTYPE, f"l{i - 1}/" + "/".join(["a"] * 40)), None) for i in range(1, 5)]
    with pytest.raises(ArchiveError, match="EMBER_TAR_MAX_DEPTH"):
        apply(root, tar_bytes([*chain, (info("l4/f"), b"x")]), layer=True)
    remove_tree(root)
    assert not root.exists()


def test_removal_is_iterative(tmp_path: Path) -> None:
    """A tree deeper than Python's recursion limit (shutil.rmtree raises RecursionError on it)."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("top", dir_fd=fd)
    cur = os.open("top", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    for _ in range(3000):
        os.mkdir("d", dir_fd=cur)
        open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=cur)).close()
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    os.close(fd)
    remove_tree(tmp_path / "top")
    assert not (tmp_path / "top").exists()


def test_gnu_ustar_and_pax_formats_read_alike(tmp_path: Path) -> None:
    long = "x" * 150 + "/" + "y" * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        members = [
            (info("dir/", tarfile.DIRTYPE), None),
            (info("dir/f"), b"data"),
            (info("lnk", tarfile.SYMTYPE, "dir/f"), None),
        ]
        if fmt != tarfile.USTAR_FORMAT:
            members.append((info(long), b"long"))
        with open_tar(io.BytesIO(tar_bytes(members, fmt)), LIMITS) as r:
            got = [(m.name, m.kind, r.read() if m.kind is Kind.FILE else b"") for m in r]
        want = [("dir", Kind.DIR, b""), ("dir/f", Kind.FILE, b"data"), ("lnk", Kind.SYMLINK, b"")]
        assert got == want + ([(long, Kind.FILE, b"long")] if fmt != tarfile.USTAR_FORMAT else [])


def test_special_owners_sparse_and_garbage_are_refused(tmp_path: Path) -> None:
    big_uid = info("f")
    big_uid.uid = 1 << 32
    with pytest.raises(ArchiveError, match="owner ids"), open_tar(io.BytesIO(tar_bytes([(big_uid, b"")])), LIMITS) as r:
        list(r)
    with pytest.raises(ArchiveError, match="checksum"), open_tar(io.BytesIO(b"not a tar" * 100), LIMITS) as r:
        list(r)
    assert not is_tar(io.BytesIO(b"#!/bin/sh\n" * 100), LIMITS)
    assert is_tar(io.BytesIO(lzma.compress(tar_bytes([(info("f"), b"x")]))), LIMITS)
    devices = tar_bytes([(info("dev", tarfile.CHRTYPE), None), (info("fifo", tarfile.FIFOTYPE), None)])
    apply(tmp_path, devices, layer=False)
    assert os.listdir(tmp_path) == []  # a context or OCI archive gets no device nodes on the host


def test_layer_device_nodes_setuid_and_xattrs_policy(tmp_path: Path) -> None:
    """Layers keep what an image needs (device nodes, set-id bits after chown, file capabilities and user.*
    xattrs), never other xattr namespaces; contexts and OCI archives get plain root-owned files only."""
    dev = info("dev/null", tarfile.CHRTYPE)
    dev.devmajor, dev.devminor, dev.mode = 1, 3, 0o666
    suid = info("bin/su")
    suid.uid, suid.gid, suid.mode = 0, 0, 0o4755
    owned = info("home/app/data")
    owned.uid, owned.gid, owned.mode = 1000, 1000, 0o2750
    owned.pax_headers = {"SCHILY.xattr.user.note": "kept", "SCHILY.xattr.trusted.evil": "dropped"}
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(dev, None), (suid, b"#!"), (owned, b"d")]
    data = tar_bytes(members)
    layer, plain = tmp_path / "layer", tmp_path / "plain"
    layer.mkdir()
    plain.mkdir()
    apply(layer, data, layer=True)
    apply(plain, data, layer=False)
    st = os.lstat(layer / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert os.stat(layer / "bin/su").st_mode & 0o7777 == 0o4755
    got = os.stat(layer / "home/app/data")
    assert (got.st_uid, got.st_gid, got.st_mode & 0o7777) == (1000, 1000, 0o2750)
    assert os.listxattr(layer / "home/app/data") == ["user.note"]
    assert not (plain / "dev/null").exists()
    got = os.stat(plain / "home/app/data")
    assert (got.st_uid, got.st_gid) == (0, 0) and os.listxattr(plain / "home/app/data") == []


def raw_header(fields: dict[str, bytes]) -> bytes:
    """One ustar header block with any bytes in its fields, and a correct checksum."""
    layout = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
              "mtime": (136, 12), "flag": (156, 1), "link": (157, 100), "magic": (257, 8),
              "devmajor": (329, 8), "devminor": (337, 8), "prefix": (345, 155)}  # fmt: skip
    block = bytearray(512)
    block[257:265] = b"ustar\x0000"
    for key, value in fields.items():
        start, width = layout[key]
        block[start : start + width] = value[:width].ljust(width, b"\0")
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def test_hostile_header_fields_fail_with_an_archive_error_only(tmp_path: Path) -> None:
    """Random values in every header field and PAX record (huge, negative, base-256, NULs, unknown types)
    are an ArchiveError: never a ValueError or OverflowError escaping as an internal error."""
    rng = random.Random(8)
    numbers = [
        b"",
        b"7777777",
        b"-1",
        b"99",
        b"\x80" + b"\xff" * 7,
        b"\xff" * 8,
        b"\x80\x00\x00\x01",
        b"1e9",
        b"0" * 11,
    ]
    names = [b"a", b"a/b/../../../c", b"/abs", b"..", b"x" * 100, b"dir/", b"a\xffb", b"\0hidden", b"."]
    records = [b"path=a\0b", b"mtime=1e400", b"mtime=nan", b"size=-5", b"uid=99999999999", b"linkpath=/etc/x",
               b"SCHILY.xattr.user.\0x=1", b"GNU.sparse.map=0,1", b"hdrcharset=BINARY", b"",
               b"size=18446744073709551616"]  # fmt: skip
    for i in range(600):
        data = b""
        for _ in range(rng.randint(1, 3)):
            flag = rng.choice([b"0", b"5", b"2", b"1", b"3", b"6", b"x", b"g", b"L", b"S", b"V", b"?"])
            body = b""
            if flag in (b"x", b"g"):
                rec = rng.choice(records)
                body = b"%d %s\n" % (len(rec) + 3 + len(str(len(rec))), rec)
            elif flag == b"L":
                body = rng.choice(names)
            elif flag == b"0":
                body = b"d" * rng.randint(0, 700)
            fields = {k: rng.choice(numbers) for k in ("mode", "uid", "gid", "mtime", "devmajor", "devminor")}
            size = rng.choice([b"%o" % len(body), rng.choice(numbers)])
            fields |= {"name": rng.choice(names), "flag": flag, "size": size, "link": rng.choice(names)}
            data += raw_header(fields) + body + bytes(-len(body) % 512)
        root = tmp_path / str(i)
        root.mkdir()
        with contextlib.suppress(ArchiveError):
            apply(root, data + bytes(1024), layer=bool(i % 2))
        remove_tree(root)


def test_a_dockerfile_with_a_nul_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_bytes(b'FROM scratch\nCOPY "a\0b" /\n')
    with BuildContext(tmp_path, LIMITS) as ctx, pytest.raises(DockerfileError, match="NUL"):
        ctx.dockerfile_text()


def pax_record(text: bytes) -> bytes:
    size = len(text) + 2
    size += len(str(size + len(str(size))))
    return b"%d %s\n" % (size, text)


def test_negative_sizes_and_ids_cannot_undercount_the_disk_cap(tmp_path: Path) -> None:
    """'-77777777777' in a size field subtracted 8 GiB from the bytes written, so a layer wrote past
    EMBER_DISK_GIB; a negative uid escaped as OverflowError. Numbers are octal digits and nothing else."""
    for field, value in (("size", b"-77777777777"), ("uid", b"-000005"), ("mode", b"+644"), ("size", b"1 2")):
        data = raw_header({"name": b"x", field: value}) + bytes(1024)
        with pytest.raises(ArchiveError, match="malformed"):
            apply(tmp_path, data, layer=True)
    big = raw_header({"name": b"big", "size": b"%o" % (3 << 20)}) + bytes(3 << 20) + bytes(1024)
    with Tree(tmp_path, LIMITS, capacity=DISK) as tree, pytest.raises(ArchiveError, match="EMBER_DISK_GIB"):
        tree.apply_stream(io.BytesIO(big), layer=True)


def test_a_huge_global_pax_header_does_not_tax_every_member() -> None:
    """One 1 MiB global header of 100 000 unknown keys used to be merged into every member (25 ms each)."""
    records = b"".join(pax_record(b"k%06d=v" % i) for i in range(1000))
    glob = raw_header({"name": b"g", "flag": b"g", "size": b"%o" % len(records)}) + records
    glob += bytes(-len(records) % 512)
    with pytest.raises(ArchiveError, match="more than 256 records"), open_tar(io.BytesIO(glob), LIMITS) as r:
        list(r)
    kept = pax_record(b"comment=ignored") + pax_record(b"SCHILY.xattr.user.k=vvvvv")
    glob = raw_header({"name": b"g", "flag": b"g", "size": b"%o" % len(kept)}) + kept + bytes(-len(kept) % 512)
    one = raw_header({"name": b"f", "size": b"0"})
    with open_tar(io.BytesIO(glob + one * 3 + bytes(1024)), LIMITS) as r:
        assert [m.xattrs for m in r] == [{"user.k": b"vvvvv"}] * 3  # unknown keys dropped, known ones applied


@pytest.mark.parametrize(("links", "match"), [(3, "walks more than 4096"), (2, "too many steps")])
def test_symlink_chains_cannot_make_every_member_expensive(tmp_path: Path, links: int, match: str) -> None:
    """Links whose targets are thousands of 'x/..' made each member's parent cost thousands of lookups
    (167 ms a member): one resolution and a whole archive each have a budget of path components."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(info("x", tarfile.DIRTYPE), None)]
    pad = "x/../" * 700
    members += [(info(f"l{i}", tarfile.SYMTYPE, pad + f"l{i + 1}"), None) for i in range(links - 1)]
    members.append((info(f"l{links - 1}", tarfile.SYMTYPE, pad + "x"), None))
    members += [(info(f"l0/f{i}"), b"") for i in range(2000)]
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=match):
        apply(tmp_path, tar_bytes(members, tarfile.GNU_FORMAT), layer=False)
    assert time.monotonic() - started < 10


def test_a_context_unpacks_to_at_most_its_capacity(tmp_path: Path) -> None:
    """A 257 KiB upload wrote 8 GiB (EMBER_TAR_MAX_BYTES) before: a context's files are capped like a disk."""
    bomb = zstandard.ZstdCompressor().compress(tar_bytes([(info("zeros"), bytes(4 * MiB))]))
    context = Capacity(2 * MiB, "EMBER_MAX_BUILD_CONTEXT_BYTES")
    with Tree(tmp_path, LIMITS, capacity=context) as tree, pytest.raises(ArchiveError, match="EMBER_MAX_BUILD"):
        tree.apply_stream(io.BytesIO(bomb), layer=False)

"""Hostile archives through a real daemon: context uploads, OCI archives, ADD, COPY --from and --chown.

Each input here is one a tenant (or a build VM the tenant controls) hands to the root
daemon; each used to escape, flood or hang it (security review C1, H7, M1).
"""

from __future__ import annotations

import io
import lzma
import secrets
import tarfile
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import ApiError, Client
from ember.sdk.core import build_request
from tests.conftest import TAR_MAX_BYTES, build
from tests.oci_images import Entry, Layout, compress, layer_tar
from tests.unit.test_tarread import info, symlink_chain_tar, tar_bytes

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]

CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]}}


def leftovers(settings: Settings) -> list[str]:
    """Scratch directories a build may make under the data dir (none may outlive it)."""
    return sorted(p.name for pattern in ("build-*", ".rootfs-*", ".layout-*") for p in settings.data_dir.glob(pattern))


def zero_bomb(size: int) -> bytes:
    """An xz tar of one file of ``size`` zero bytes: a few dozen kB."""
    return lzma.compress(tar_bytes([(info("zeros"), bytes(size))]), preset=0)


def test_context_and_oci_archive_symlink_chain_cannot_escape(client: Client, settings: Settings) -> None:
    marker = f"ember-c1-{secrets.token_hex(4)}"
    # the uploaded context itself (CVE-2025-4517's archive): escape -> three levels above the context
    chain = symlink_chain_tar(marker, b"FROBNICATE\n")
    with pytest.raises(ApiError) as err:
        list(client.stream(build_request("c1-context", chain)))
    assert err.value.status == 400 and "FROBNICATE" in str(err.value)  # unpacked (inside), then refused
    # the same archive as an oci-archive base in a context
    ctx = tar_bytes(
        [(info("image.tar"), symlink_chain_tar(marker)), (info("Dockerfile"), b"FROM oci-archive://image.tar\n")]
    )
    result = next(e["build"] for e in client.stream(build_request("c1-archive", ctx)) if "build" in e)
    assert result["state"] == "CREATE_FAILED" and "not an OCI image layout" in result["error"]
    for parent in (settings.data_dir, *settings.data_dir.parents):
        assert not (parent / marker).exists(), f"the archive wrote {parent / marker}"
    assert leftovers(settings) == []


def test_context_upload_decompression_bomb_is_capped(client: Client, settings: Settings) -> None:
    bomb = lzma.compress(
        tar_bytes([(info("Dockerfile"), b"FROM scratch\n"), (info("zeros"), bytes(TAR_MAX_BYTES))]), preset=0
    )
    assert len(bomb) < 256 * 1024
    with pytest.raises(ApiError) as err:
        list(client.stream(build_request("bomb", bomb)))
    assert err.value.status == 400 and "EMBER_TAR_MAX_BYTES" in str(err.value)
    assert leftovers(settings) == []


def test_oci_archive_with_a_deep_layer_fails_cleanly(client: Client, settings: Settings, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    deep = "/".join(["d"] * 1500)
    data, media_type = compress(layer_tar([Entry(deep + "/f", data=b"x"), Entry(".wh.d")]), "gzip")
    layout.tag(layout.image([(data, media_type)], CONFIG), "1")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for child in sorted((tmp_path / "layout").iterdir()):
            tar.add(child, arcname=child.name)
    ctx = tar_bytes(
        [(info("image.tar"), archive.getvalue()), (info("Dockerfile"), b"FROM oci-archive://image.tar:1\n")]
    )
    result = next(e["build"] for e in client.stream(build_request("deep", ctx)) if "build" in e)
    assert result["state"] == "CREATE_FAILED" and "EMBER_TAR_MAX_DEPTH" in result["error"], result
    assert leftovers(settings) == []


def test_context_links_out_are_resolved_inside(client: Client, settings: Settings, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hostetc").symlink_to("/etc")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY hostetc/hostname /stolen\n")
    result, _ = build(client, ctx, "links-out")
    assert result["state"] == "CREATE_FAILED" and "not in the build context" in result["error"], result


def test_chown_lookup_copy_from_and_add_are_size_bounded(client: Client, settings: Settings, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("x\n")
    # a guest's /etc/passwd of 2 MiB for COPY --chown (it was read whole into the daemon)
    (ctx / "Dockerfile").write_text(
        "FROM ember:debian-python3\n"
        "RUN head -c 2200000 /dev/zero | tr '\\0' x >> /etc/passwd\n"
        "COPY --chown=nobody f /f\n"
    )
    result, _ = build(client, ctx, "passwd-flood")
    assert result["state"] == "CREATE_FAILED" and "larger than 1048576 bytes" in result["error"], result
    # COPY --from of more than the cap (the build VM's tar stream was written to the host unbounded)
    (ctx / "Dockerfile").write_text(
        "FROM ember:debian-python3 AS big\n"
        f"RUN head -c {TAR_MAX_BYTES + (8 << 20)} /dev/zero > /big\n"
        "FROM ember:debian-python3\n"
        "COPY --from=big /big /big\n"
    )
    result, _ = build(client, ctx, "copy-from-flood")
    assert result["state"] == "CREATE_FAILED" and "COPY --from: the files are larger" in result["error"], result
    # ADD of a local archive that unpacks past the limit
    (ctx / "bomb.tar.xz").write_bytes(zero_bomb(TAR_MAX_BYTES + (1 << 20)))
    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nADD bomb.tar.xz /unpacked/\n")
    result, _ = build(client, ctx, "add-bomb")
    assert result["state"] == "CREATE_FAILED" and "EMBER_TAR_MAX_BYTES" in result["error"], result
    assert leftovers(settings) == []

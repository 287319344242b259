"""Code artifacts through file://: URIs, the confined host-file open, each tenant's scope, and every hostile zip
refused.

The same zips through s3:// against a real object store: tests/integration/test_aws_artifacts.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ember.aws import images
from ember.aws.artifacts import fetch_context
from ember.aws.errors import InternalServerException, ResourceNotFoundException, ValidationException
from ember.aws.operations import Call
from ember.build.service import DockerfileParser
from ember.build.unpack import remove_tree
from ember.config import Settings
from ember.tenancy.principal import Principal
from tests.zips import DOCKER, DOCKERFILE, HOSTILE, Raw, good_zip, raw_zip

ACCOUNT = "123456789012"  # the tenant's: its file:// artifacts lie in <root>/123456789012/
OTHER = "210987654321"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    (path / ACCOUNT).mkdir(parents=True)
    return path


@pytest.fixture
def home(root: Path) -> Path:
    return root / ACCOUNT


@pytest.fixture
def settings(tmp_path: Path, root: Path) -> Settings:
    return Settings(data_dir=tmp_path, aws_file_artifact_root=str(root), max_build_context_bytes=64 << 20,
                    tar_max_file_bytes=16 << 20)  # fmt: skip


async def fetch(settings: Settings, data: bytes, **overrides: Any) -> Path:
    root = Path(settings.aws_file_artifact_root)
    (root / ACCOUNT / "code.zip").write_bytes(data)
    into = root.parent / "context"
    into.mkdir(exist_ok=True)
    await fetch_context(f"file://{root}/{ACCOUNT}/code.zip", into=into, account=ACCOUNT,
                        settings=dataclasses.replace(settings, **overrides))  # fmt: skip
    return into


async def refused(settings: Settings, data: bytes, words: str, **overrides: Any) -> str:
    with pytest.raises(ValidationException) as caught:
        await fetch(settings, data, **overrides)
    message = caught.value.message
    assert words in message
    assert settings.aws_file_artifact_root not in message  # never a host path
    assert os.listdir(Path(settings.aws_file_artifact_root).parent / "context") == []  # nothing half-unpacked
    return message


async def test_a_zip_unpacks_into_a_build_context(settings: Settings, home: Path) -> None:
    (home / "code.zip").write_bytes(good_zip())
    into = home.parent.parent / "new" / "context"  # made if missing (its parent must exist)
    into.parent.mkdir()
    await fetch_context(f"file://{home}/code.zip", into=into, settings=settings, account=ACCOUNT)
    assert (into / "Dockerfile").read_bytes() == DOCKERFILE
    assert (into / "app.py").read_bytes() == b"print(42)\n"
    assert stat.S_IMODE(os.stat(into / "lib/run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(into / "app.py").st_mode) == 0o600  # zipfile's writestr default mode
    assert sorted(os.listdir(into)) == ["Dockerfile", "app.py", "lib"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_zips_are_refused_and_nothing_is_written(settings: Settings, case: str) -> None:
    make, words = HOSTILE[case]
    await refused(settings, make(), words)


async def test_the_end_record_may_not_declare_more_entries_than_allowed(settings: Settings) -> None:
    entries = [DOCKER, *(Raw(f"f{i}".encode(), b"x") for i in range(4))]
    await refused(settings, raw_zip(entries), "declares 5 entries", zip_max_entries=3)
    # an end record that lies about the count: the directory itself is counted too
    await refused(settings, raw_zip(entries, count=1), "holds 5 entries", zip_max_entries=3)


async def test_the_central_directory_is_bounded_before_it_is_read(settings: Settings) -> None:
    await refused(settings, raw_zip([DOCKER, Raw(b"n" * 600, b"x")]), "central directory of", zip_max_entries=2)


async def test_names_deeper_than_the_limit_are_refused(settings: Settings) -> None:
    await refused(settings, raw_zip([DOCKER, Raw(b"a/b/c/d", b"x")]), "deeper than 3", tar_max_depth=3)


async def test_the_unpacked_total_is_bounded(settings: Settings) -> None:
    files = [Raw(f"z{i}".encode(), bytes(300 << 10), deflate=True) for i in range(4)]  # each under the ratio floor
    await refused(settings, raw_zip([DOCKER, *files]), "unpacks to more than 1048576", max_build_context_bytes=1 << 20)


async def test_an_artifact_larger_than_the_context_limit_is_refused(settings: Settings) -> None:
    big = raw_zip([DOCKER, Raw(b"blob", os.urandom(2 << 20))])
    await refused(settings, big, "larger than the 1048576 bytes", max_build_context_bytes=1 << 20)


# ---- URIs and file:// ----------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("ftp://host/code.zip", "neither s3:// nor file://"),
        ("code.zip", "neither s3:// nor file://"),
        ("file:///etc/shadow", "under the directory"),
        ("s3://bucket/123456789012/../210987654321/k.zip", "plain"),
        ("s3://bucket/123456789012//k.zip", "plain"),
        ("file://evil.example/x.zip", "file:///PATH"),
        ("file:///a/../b.zip", "plain"),
        ("s3://bucket/123456789012/key.zip", "no object store"),
        ("file:///with space.zip", "without spaces"),
    ],
)
async def test_bad_uris_are_refused(settings: Settings, uri: str, words: str, tmp_path: Path) -> None:
    if words != "no object store":  # (a store nothing answers for: each is refused before it is asked)
        settings = dataclasses.replace(settings, s3_endpoint="http://127.0.0.1:1")
    with pytest.raises(ValidationException, match=words):
        await fetch_context(uri, into=tmp_path, settings=settings, account=ACCOUNT)


async def test_file_uris_are_off_unless_the_operator_sets_a_root(settings: Settings, home: Path) -> None:
    (home / "code.zip").write_bytes(good_zip())
    with pytest.raises(ValidationException, match="EMBER_AWS_FILE_ARTIFACT_ROOT"):
        await fetch_context(f"file://{home}/code.zip", into=home.parent, account=ACCOUNT,
                            settings=dataclasses.replace(settings, aws_file_artifact_root=""))  # fmt: skip


async def test_s3_buckets_and_keys_are_checked(settings: Settings, tmp_path: Path) -> None:
    configured = dataclasses.replace(settings, s3_endpoint="http://127.0.0.1:1")
    for uri in ("s3://UPPER/key", "s3://a/key", "s3://bucket", "s3://bucket/", "s3://b..c/key"):
        with pytest.raises(ValidationException, match=r"bucket name|must name an object"):
            await fetch_context(uri, into=tmp_path, settings=configured, account=ACCOUNT)


async def test_a_missing_file_is_not_found(settings: Settings, home: Path) -> None:
    for rel in ("nope.zip", "nodir/x.zip"):
        with pytest.raises(ResourceNotFoundException):
            await fetch_context(f"file://{home}/{rel}", into=home.parent, settings=settings, account=ACCOUNT)


# ---- each tenant's scope (EMBER_AWS_ARTIFACT_SCOPE) ----------------------------------------------------


async def not_found(settings: Settings, uri: str, into: Path) -> str:
    with pytest.raises(ResourceNotFoundException) as caught:
        await fetch_context(uri, into=into, settings=settings, account=ACCOUNT)
    assert os.listdir(into) == []
    return caught.value.message


async def test_another_accounts_files_answer_exactly_like_missing_ones(
    settings: Settings, root: Path, tmp_path: Path
) -> None:
    (root / OTHER).mkdir()
    for path in (root / OTHER / "code.zip", root / "code.zip", root / OTHER / ACCOUNT / "code.zip"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(good_zip())  # valid zips, none of them this tenant's
    into = tmp_path / "context"
    into.mkdir()
    missing = await not_found(settings, f"file://{root}/{ACCOUNT}/code.zip", into)
    assert f"folder {ACCOUNT} of the directory" in missing and str(root) not in missing
    for path in (f"{OTHER}/code.zip", "code.zip", f"{OTHER}/{ACCOUNT}/code.zip", ACCOUNT):
        assert await not_found(settings, f"file://{root}/{path}", into) == missing
    shared = dataclasses.replace(settings, aws_artifact_scope="shared")  # one tenant: the whole root is its
    for path in (f"{OTHER}/code.zip", "code.zip"):
        await fetch_context(f"file://{root}/{path}", into=into, settings=shared, account=ACCOUNT)
        assert (into / "Dockerfile").read_bytes() == DOCKERFILE
        remove_tree(into)


async def test_another_accounts_objects_are_never_asked_of_the_store(settings: Settings, tmp_path: Path) -> None:
    nobody = dataclasses.replace(settings, s3_endpoint="http://127.0.0.1:1")  # asking it would be a server error
    into = tmp_path / "context"
    into.mkdir()
    for key in (f"{OTHER}/code.zip", "code.zip", f"x/{ACCOUNT}/code.zip", f"{ACCOUNT}0/code.zip", ACCOUNT):
        message = await not_found(nobody, f"s3://bucket/{key}", into)
        assert message.endswith(f"this account's code artifacts go under s3://bucket/{ACCOUNT}/"), message
    shared = dataclasses.replace(nobody, aws_artifact_scope="shared")
    with pytest.raises(InternalServerException, match="did not answer"):  # asked: any object is the tenant's
        await fetch_context(f"s3://bucket/{OTHER}/code.zip", into=into, settings=shared, account=ACCOUNT)


async def test_an_unknown_scope_refuses_every_artifact(settings: Settings, home: Path) -> None:
    (home / "code.zip").write_bytes(good_zip())
    odd = dataclasses.replace(settings, aws_artifact_scope="Account")
    with pytest.raises(InternalServerException, match="EMBER_AWS_ARTIFACT_SCOPE"):
        await fetch_context(f"file://{home}/code.zip", into=home.parent / "c", settings=odd, account=ACCOUNT)
    with pytest.raises(InternalServerException, match="12-digit"):
        await fetch_context(f"file://{home}/code.zip", into=home.parent / "c", settings=settings, account="")


async def link_refused(settings: Settings, uri: str) -> None:
    into = Path(settings.aws_file_artifact_root).parent / "context"
    into.mkdir(exist_ok=True)
    with pytest.raises(ValidationException, match="symbolic link") as caught:
        await fetch_context(uri, into=into, settings=settings, account=ACCOUNT)
    assert "shadow" not in caught.value.message and os.listdir(into) == []


async def test_symlinks_under_the_root_are_never_followed(
    settings: Settings, root: Path, home: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "code.zip").write_bytes(good_zip())  # a valid zip the tenant must not reach
    (home / "escape.zip").symlink_to(outside / "code.zip")
    (home / "dir").symlink_to(outside)
    (home / "inside.zip").symlink_to("escape.zip")  # even one pointing inside the root
    await link_refused(settings, f"file://{home}/escape.zip")
    await link_refused(settings, f"file://{home}/dir/code.zip")
    await link_refused(settings, f"file://{home}/inside.zip")
    (root / OTHER).symlink_to(ACCOUNT)  # another account's folder: a link to this one's is still a link
    with pytest.raises(ResourceNotFoundException):
        await fetch_context(f"file://{root}/{OTHER}/escape.zip", into=tmp_path, settings=settings, account=ACCOUNT)
    await link_refused(dataclasses.replace(settings, aws_artifact_scope="shared"), f"file://{root}/{OTHER}/x.zip")


async def test_a_fifo_is_refused_without_being_opened(settings: Settings, home: Path) -> None:
    fifo = home / "pipe.zip"
    os.mkfifo(fifo)

    def unblock() -> None:  # were the FIFO opened for reading, this would end the wait (and the test would fail)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        with pytest.raises(ValidationException, match="not a regular file"):
            await fetch_context(f"file://{home}/pipe.zip", into=home.parent, settings=settings, account=ACCOUNT)
    finally:
        timer.cancel()


async def test_a_dockerfile_slow_to_parse_never_stalls_the_daemon(settings: Settings, home: Path) -> None:
    """A 1 KiB zip holding a 1 MiB Dockerfile of continued lines takes seconds to parse: that happens in the
    parser's thread, while the daemon's loop and its default thread pool go on serving (the loop stalled 2.7 s
    per parse; then, parsed in the default pool, six such parses kept every other blocking call waiting)."""
    text = ("FROM debian\nRUN " + "a \\\n" * (1 << 18))[: (1 << 20) - 1]
    (home / "slow.zip").write_bytes(good_zip({"Dockerfile": text.encode()}))
    daemon = SimpleNamespace(settings=settings, builds=SimpleNamespace(parser=DockerfileParser(settings)))
    call = Call("CreateMicrovmImage", {}, Principal("acme", admin=False), "us-east-1", ACCOUNT)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))  # one busy worker would be seen at once
    worst, done = 0.0, False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticking = asyncio.create_task(ticker())
    uri = f"file://{settings.aws_file_artifact_root}/{ACCOUNT}/slow.zip"
    started = time.perf_counter()
    fetching = asyncio.create_task(images._fetch(daemon, call, {"codeArtifact": {"uri": uri}}))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)  # parsing by now (the zip unpacks in milliseconds)
    began = time.perf_counter()
    await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)
    waited = time.perf_counter() - began
    remove_tree(await fetching)
    took = time.perf_counter() - started  # mostly the parse (2.6 s here): the bounds below scale with the machine
    done = True
    await ticking
    assert worst < took / 4, f"the daemon's loop stalled {worst:.2f} s of the fetch's {took:.2f} s"
    assert waited < took / 4, f"a blocking call waited {waited:.2f} s (of {took:.2f} s) for the default pool"

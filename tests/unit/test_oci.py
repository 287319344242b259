"""Pure parts of pulling: references, image configs, platform choice."""

from __future__ import annotations

import pytest

from ember.build import oci
from ember.build.dockerfile import DEFAULT_SHELL
from ember.errors import BuildFailed

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest", "")),
        ("team/app:1.2", ("docker.io", "team/app", "1.2", "")),
        ("127.0.0.1:5000/a/b", ("127.0.0.1:5000", "a/b", "latest", "")),
        ("localhost/x:y", ("localhost", "x", "y", "")),
        (f"ghcr.io/o/r@{DIGEST}", ("ghcr.io", "o/r", "latest", DIGEST)),
        (f"reg.example:443/r:t@{DIGEST}", ("reg.example:443", "r", "t", DIGEST)),
    ],
)
def test_references_read_like_docker(ref: str, want: tuple[str, str, str, str]) -> None:
    r = oci.parse_reference(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == want


@pytest.mark.parametrize("ref", ["UPPER/case", "a@sha256:short", "reg.io/a:bad tag", "reg.io//x"])
def test_bad_references_say_so(ref: str) -> None:
    with pytest.raises(BuildFailed, match=f"FROM {ref}"):
        oci.parse_reference(ref)


def test_image_config_maps_docker_fields() -> None:
    cfg = oci.image_config({
        "Env": ["PATH=/bin", "A=b=c"], "WorkingDir": "/srv", "User": "app", "Entrypoint": ["/init"],
        "Cmd": ["serve"], "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"k": "v"},
        "StopSignal": "SIGINT", "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 5_000_000_000},
    })  # fmt: skip
    assert cfg.env == (("PATH", "/bin"), ("A", "b=c"))
    assert (cfg.workdir, cfg.user, cfg.app_argv()) == ("/srv", "app", ("/init", "serve"))
    assert cfg.exposed == ("8080/tcp", "53/udp") and cfg.labels == (("k", "v"),) and cfg.stopsignal == "SIGINT"
    assert cfg.healthcheck is not None
    assert cfg.healthcheck.argv == (*DEFAULT_SHELL, "true") and cfg.healthcheck.interval_s == 5.0
    assert oci.image_config({}).workdir == "/"


def test_an_index_without_linux_amd64_names_what_it_has() -> None:
    index = {"manifests": [{"digest": DIGEST, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}]}
    with pytest.raises(BuildFailed, match="linux/arm64"):
        oci._pick_platform(index, "x")


def test_local_references_split_path_and_tag() -> None:
    assert oci.split_local("oci-layout://base:1") == ("oci-layout", "base", "1")
    assert oci.split_local("oci-archive://dir/img.tar") == ("oci-archive", "dir/img.tar", "")
    assert oci.split_local("oci-layout://a:b/c") == ("oci-layout", "a:b/c", "")

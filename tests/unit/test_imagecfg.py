"""Exec and file defaults from a Dockerfile image's ENV, WORKDIR and USER (ember.imagecfg)."""

from __future__ import annotations

import pytest

from ember.errors import InvalidRequest
from ember.imagecfg import ImageDefaults, exec_settings, file_owner, guest_path

APP = ImageDefaults(env=(("PATH", "/usr/bin"), ("MODE", "image"), ("ONLY_IMAGE", "1")), workdir="/srv/app", user="app")


def test_env_order_is_image_then_vm_then_request() -> None:
    run = exec_settings(APP, {"MODE": "vm", "ONLY_VM": "2"}, {"ONLY_VM": "req"}, cwd="", user="")
    assert dict(e.split("=", 1) for e in run.env) == {
        "PATH": "/usr/bin", "MODE": "vm", "ONLY_IMAGE": "1", "ONLY_VM": "req",
    }  # fmt: skip
    assert run.env[0] == "PATH=/usr/bin"  # the image's order first


def test_workdir_and_user_are_defaults_a_request_overrides() -> None:
    assert (exec_settings(APP, {}, {}, cwd="", user="").cwd, exec_settings(APP, {}, {}, cwd="", user="").user) == (
        "/srv/app", "app",
    )  # fmt: skip
    over = exec_settings(APP, {}, {}, cwd="/tmp", user="0:0")
    assert (over.cwd, over.user) == ("/tmp", "0:0")


def test_images_without_a_dockerfile_config_keep_the_old_behaviour() -> None:
    run = exec_settings(None, {"A": "1"}, {"B": "2"}, cwd="", user="")
    assert run == exec_settings(None, {"A": "1"}, {"B": "2"}, cwd="", user="")
    assert (run.env, run.cwd, run.user) == (("A=1", "B=2"), "", "")
    with pytest.raises(InvalidRequest, match="must be absolute"):
        guest_path(None, "notes.txt")
    assert guest_path(None, "/root/x") == "/root/x"
    assert file_owner(None, None) == ""


def test_relative_paths_resolve_against_workdir() -> None:
    assert guest_path(APP, "notes.txt") == "/srv/app/notes.txt"
    assert guest_path(APP, "sub/dir/") == "/srv/app/sub/dir/"
    assert guest_path(APP, "/etc/hosts") == "/etc/hosts"
    for bad in ("", "a\0b", "x" * 5000):
        with pytest.raises(InvalidRequest, match="malformed"):
            guest_path(APP, bad)
    with pytest.raises(InvalidRequest, match="malformed"):
        guest_path(ImageDefaults(workdir="/" + "w" * 4095), "file")  # too long once joined


def test_files_belong_to_user_unless_asked_otherwise() -> None:
    assert file_owner(APP, None) == "app"
    assert file_owner(APP, "") == ""  # root, asked for
    assert file_owner(APP, "1000:1000") == "1000:1000"


def test_defaults_round_trip_as_json() -> None:
    assert ImageDefaults.from_json(APP.to_json()) == APP
    assert ImageDefaults.from_json("") is None
    odd = ImageDefaults(env=(("EQ", "a=b=c"), ("EMPTY", "")), workdir="/", user="")
    assert ImageDefaults.from_json(odd.to_json()) == odd

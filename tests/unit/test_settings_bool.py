"""Boolean settings: the words that say yes or no, and nothing else (bool("0") is True)."""

from __future__ import annotations

import pytest

from ember.config import Settings


@pytest.mark.parametrize("raw", ["1", "true", "True", "YES", "on", " on "])
def test_yes(raw: str) -> None:
    assert Settings.from_env({"EMBER_BUILD_HOST_CA_CERTS": raw}).build_host_ca_certs is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "OFF"])
def test_no(raw: str) -> None:
    assert Settings.from_env({"EMBER_BUILD_HOST_CA_CERTS": raw}).build_host_ca_certs is False


def test_default_is_off() -> None:
    assert Settings.from_env({}).build_host_ca_certs is False


@pytest.mark.parametrize("raw", ["", "2", "maybe", "enabled"])
def test_anything_else_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"EMBER_BUILD_HOST_CA_CERTS=.* use 1/true/yes/on or 0/false/no/off"):
        Settings.from_env({"EMBER_BUILD_HOST_CA_CERTS": raw})

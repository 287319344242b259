"""Error answers carry no host paths or exception text: the details go to the daemon log under an id."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from fastapi import FastAPI

from ember.api.app import add_error_handlers
from ember.errors import SnapshotError, logged

SECRET_PATH = "/var/lib/ember/vms/vm-0123/suspend/manifest.json"


def app_raising(exc: Exception) -> FastAPI:
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


async def test_internal_error_answers_an_id_and_logs_the_details(caplog: pytest.LogCaptureFixture) -> None:
    app = app_raising(RuntimeError(f"cannot open {SECRET_PATH}"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ember") as c:
        with caplog.at_level(logging.ERROR):
            r = await c.get("/boom")
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "InternalError"
    assert re.fullmatch(r"[0-9a-f]{8}", body["id"])
    assert body["message"] == f"internal error; the daemon log has the details under id {body['id']}"
    assert "RuntimeError" not in r.text and "/var/lib" not in r.text
    logged_lines = [rec for rec in caplog.records if body["id"] in rec.getMessage()]
    assert logged_lines and SECRET_PATH in str(logged_lines[0].exc_info[1])  # type: ignore[index]


async def test_ember_error_with_host_details_tells_the_client_only_an_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        exc = SnapshotError(logged("the snapshot's manifest is corrupt", f"{SECRET_PATH}: ValueError('x')"))
    transport = httpx.ASGITransport(app=app_raising(exc))
    async with httpx.AsyncClient(transport=transport, base_url="http://ember") as c:
        r = await c.get("/boom")
    assert r.status_code == 500 and r.json()["error"] == "SnapshotError"
    assert "/var/lib" not in r.text and "ValueError" not in r.text
    error_id = re.search(r"under id ([0-9a-f]{8})", r.json()["message"])
    assert error_id is not None
    assert any(error_id[1] in rec.getMessage() and SECRET_PATH in rec.getMessage() for rec in caplog.records)

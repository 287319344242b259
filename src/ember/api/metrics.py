"""``GET /metrics``: Prometheus' text format, for admins only (see :mod:`ember.metrics`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ember.api.auth import admin
from ember.metrics import Scrape, StateCollector

if TYPE_CHECKING:
    from ember.daemon import Daemon


def add_metrics_route(app: FastAPI, daemon: Daemon) -> None:
    scrape = Scrape(StateCollector(daemon.engine.store.list_vms, daemon.images.accel.accel))

    @app.get(
        "/metrics",
        dependencies=[Depends(admin)],  # 403 for a tenant's key: the figures span every tenant
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        # the VM table is read in a thread: a scrape must not hold up the event loop on the database
        body = await asyncio.to_thread(generate_latest, scrape)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

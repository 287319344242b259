"""Who a request acts as: the principal, and the context variable that carries it into the engine."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

DEFAULT_TENANT = "default"  # made by the migration; root on the socket acts in it unless told otherwise


@dataclass(frozen=True)
class Principal:
    tenant: str  # the tenant the request acts in
    admin: bool  # root on the Unix socket, or an admin key: sees and manages every tenant
    key_id: str = ""  # "": root on the Unix socket (no key)

    @property
    def actor(self) -> str:
        """Who events name as having made a change."""
        return self.key_id or "root"


ROOT = Principal(DEFAULT_TENANT, admin=True)
SYSTEM = Principal(DEFAULT_TENANT, admin=True, key_id="system")  # the daemon's own work: recovery, timers

# The principal of the request being served; background work runs with SYSTEM.
CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("ember_principal", default=SYSTEM)

"""Log records bound to a VM: every line about a VM names it."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ember.vm")


class VmLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with ``[vm-id]`` and sets ``record.vm`` for handlers and formatters."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        vm = self.extra["vm"] if self.extra else "-"
        kwargs["extra"] = {**kwargs.get("extra", {}), "vm": vm}
        return f"[{vm}] {msg}", kwargs


def vlog(vm_id: str) -> VmLog:
    return VmLog(log, {"vm": vm_id})

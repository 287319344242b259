"""What exec, shell and file calls default to in a VM of a Dockerfile image: its ENV, WORKDIR and USER.

``docker exec`` starts a command with the image's environment, in its working directory, as its
user; before this, only the app (the image's ENTRYPOINT/CMD) got them. An image records them as
:class:`ImageDefaults` (``images.defaults``, JSON; ``None`` for images without a Dockerfile
config, such as the built-in ``debian``, whose calls keep today's behaviour: root, ``/``, the
VM's env only). A fork (``ember snapshot``) keeps the defaults of the image its VM ran.

The order, later wins: the image's ENV, then the VM's ``env`` (at run), then the request's.
The working directory is the request's, else WORKDIR; the user the request's, else USER (a
name or uid[:gid], looked up in the guest's ``/etc/passwd`` by the agent, as for any exec).
A relative file path resolves against WORKDIR, and a file written (and the directories
``mkdirs`` makes for it) belongs to USER unless the request names another user. Pure logic:
no I/O.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from ember.errors import InvalidRequest


@dataclass(frozen=True)
class ImageDefaults:
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""  # "": root

    def to_json(self) -> str:
        return json.dumps({"env": [f"{k}={v}" for k, v in self.env], "workdir": self.workdir, "user": self.user})

    @classmethod
    def from_json(cls, raw: str) -> ImageDefaults | None:
        """The defaults stored as ``raw``; ``""`` (no Dockerfile config) is ``None``."""
        if not raw:
            return None
        data = json.loads(raw)
        pairs = (str(e).partition("=") for e in data.get("env") or [])
        return cls(
            env=tuple((k, v) for k, _, v in pairs),
            workdir=str(data.get("workdir") or "/"),
            user=str(data.get("user") or ""),
        )


@dataclass(frozen=True)
class ExecSettings:
    env: tuple[str, ...]  # KEY=VALUE, as the agent takes them
    cwd: str  # "": the agent's default (/)
    user: str  # "": root


def exec_settings(
    defaults: ImageDefaults | None, vm_env: Mapping[str, str], env: Mapping[str, str], *, cwd: str, user: str
) -> ExecSettings:
    """An exec's environment, directory and user: the request's, then the VM's, then the image's."""
    merged = dict(defaults.env) if defaults is not None else {}
    merged.update(vm_env)
    merged.update(env)
    return ExecSettings(
        env=tuple(f"{k}={v}" for k, v in merged.items()),
        cwd=cwd or (defaults.workdir if defaults is not None else ""),
        user=user or (defaults.user if defaults is not None else ""),
    )


def guest_path(defaults: ImageDefaults | None, path: str) -> str:
    """A file call's path: absolute as given; relative against WORKDIR (images without one
    take only absolute paths, as before)."""
    if "\0" in path or not path or len(path) > 4096:
        raise InvalidRequest("guest path is malformed")
    if path.startswith("/"):
        return path
    if defaults is None:
        raise InvalidRequest(f"guest path {path!r} must be absolute (start with '/')")
    joined = posixpath.join(defaults.workdir, path)
    if len(joined) > 4096:
        raise InvalidRequest("guest path is malformed")
    return joined


def file_owner(defaults: ImageDefaults | None, user: str | None) -> str:
    """Who a written file belongs to: the request's user, else the image's USER ("": root, unchanged)."""
    if user is not None:
        return user
    return defaults.user if defaults is not None else ""

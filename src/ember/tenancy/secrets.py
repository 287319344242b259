"""Secrets Ember must read back (SigV4 secret keys, webhook signing secrets), sealed with AES-256-GCM.

The key is 32 random bytes in a root-only file (``EMBER_SECRET_KEY_FILE``, default ``<data_dir>/secret.key``),
made once; the database only ever holds ``v1.<nonce+ciphertext, base64url>``. Losing the key file makes
every sealed secret unreadable (keys must be re-issued); keep it with the database's backups, apart from them.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ember.errors import HostSetupError

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1."


def load_key(path: Path) -> bytes:
    """The sealing key: made atomically (0600, root) when missing, else checked to be root's and private."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another daemon made it first: use theirs
        finally:
            tmp.unlink()
        return load_key(path)
    except OSError as exc:
        raise HostSetupError(f"the secret key file {path} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077 or len(key) != KEY_BYTES:
        raise HostSetupError(
            f"the secret key file {path} must be a private (0600) file of {KEY_BYTES} bytes owned by the daemon's "
            "user; restore it from a backup (keys and webhooks sealed with another key cannot be read)"
        )
    return key


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        return cls(load_key(path))

    def seal(self, plain: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain.encode(), None)
        return PREFIX + base64.urlsafe_b64encode(sealed).decode()

    def open(self, sealed: str) -> str:
        if not sealed.startswith(PREFIX):
            raise ValueError("not a sealed secret")
        raw = base64.urlsafe_b64decode(sealed[len(PREFIX) :])
        try:
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None).decode()
        except InvalidTag:
            raise ValueError("the secret was sealed with another key, or changed") from None

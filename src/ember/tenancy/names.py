"""Image names are per tenant: the stores key images and builds by an internal name.

The internal name is the public one for the tenant ``default`` (so an Ember 0.1 database keeps its names) and
``"{tenant}~{public}"`` for any other tenant; ``~`` is allowed in neither, so the mapping is one to one.
Built-in base images (``debian``) have tenant "" and are visible to every tenant.
"""

from __future__ import annotations

import re

from ember.errors import Forbidden, ImageNotFound, InvalidRequest
from ember.images import RESERVED_NAMES, owner
from ember.tenancy.principal import DEFAULT_TENANT

SEP = "~"
# repo[:tag]; the tag is a version number or a name
PUBLIC = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,63})?$")
REPO = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def internal(tenant: str, public: str) -> str:
    """The store's name of ``public`` as ``tenant`` names it. A name that cannot be an image name is
    answered as a missing image (404), exactly like an image another tenant has."""
    if not PUBLIC.match(public):
        raise ImageNotFound(public)
    return public if tenant == DEFAULT_TENANT else f"{tenant}{SEP}{public}"


def new_repo(tenant: str, repo: str) -> str:
    """A new image repo's internal name; a bad public name is a 400 that says what a name may hold."""
    if not REPO.match(repo):
        raise InvalidRequest(f"bad image name {repo!r}: use lowercase letters, digits, '.', '_' or '-'")
    return repo if tenant == DEFAULT_TENANT else f"{tenant}{SEP}{repo}"


def public(name: str) -> str:
    return name.partition(SEP)[2] if SEP in name else name


def tenant_of(name: str) -> str:
    """The tenant owning the image or build ``name`` (internal): "" for a built-in base."""
    return owner(name)


def candidates(tenant: str, public_name: str) -> list[str]:
    """Where ``public_name`` may live for ``tenant``: its own image, else a built-in base of that name."""
    own = internal(tenant, public_name)
    builtin = public_name.partition(":")[0] in RESERVED_NAMES
    return [own] + ([public_name] if builtin and own != public_name else [])


def writable(tenant: str, public_name: str) -> str:
    """The internal name of an image ``tenant`` may change; a built-in base is read-only (403)."""
    own = internal(tenant, public_name)
    if tenant_of(public_name) == "":
        raise Forbidden(f"'{public_name}' is a built-in base image: it is read-only")
    return own

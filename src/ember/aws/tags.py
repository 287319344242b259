"""TagResource, UntagResource, ListTags: the tags of an image of this API (the model's taggable resources of
Lambda MicroVMs are images: ``arn:aws:lambda:<region>:<account>:microvm-image:<name>``). At most 50 per image;
another account's ARN, a deleted or missing image answer ResourceNotFoundException. Tags change under the
tenant's lock, as every change of its images does (ember.aws.images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ember.aws.arns import parse_image_arn
from ember.aws.errors import ResourceNotFoundException, ValidationException
from ember.aws.images import MAX_TAGS
from ember.aws.imagestore import AwsImage, AwsImageStore
from ember.aws.operations import Call, operation
from ember.models import utcnow

if TYPE_CHECKING:
    from ember.daemon import Daemon


def _tagged(daemon: Daemon, call: Call) -> tuple[AwsImageStore, AwsImage]:
    resource = str(call.params["Resource"])
    arn = parse_image_arn(resource)
    store = AwsImageStore(daemon.engine.store.engine)
    image = store.get(call.principal.tenant, arn.name) if arn is not None and arn.account == call.account else None
    if image is None or image.deleted_at:
        raise ResourceNotFoundException(f"{resource[:300]} does not exist", resourceType="MicrovmImage")
    return store, image


@operation("ListTags")
async def list_tags(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    return {"Tags": _tagged(daemon, call)[1].tags}


@operation("TagResource")
async def tag_resource(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    async with daemon.quotas.lock(call.principal.tenant):  # a create or update writing the image waits
        store, image = _tagged(daemon, call)
        tags = {**image.tags, **dict(call.params["Tags"])}
        if len(tags) > MAX_TAGS:
            raise ValidationException(f"an image has at most {MAX_TAGS} tags (it would have {len(tags)})")
        store.put(dataclasses.replace(image, tags=tags, updated_at=utcnow()))
    return {}


@operation("UntagResource")
async def untag_resource(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    async with daemon.quotas.lock(call.principal.tenant):
        store, image = _tagged(daemon, call)
        gone = set(call.params["TagKeys"])
        store.put(dataclasses.replace(image, tags={k: v for k, v in image.tags.items() if k not in gone},
                                      updated_at=utcnow()))  # fmt: skip
    return {}

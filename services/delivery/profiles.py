"""The profile service as delivery sees it: current email, first name and consent at send time.

One `BatchGetProfiles` call per tenant per batch of requests (a merged-away id is answered
with its survivor's profile), with a short-lived
read token minted for that tenant (the caller's tenant is what the token says,
so a batch holding several tenants makes one call per tenant).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import grpc

from relevans.common.v1 import common_pb2
from relevans.kit.auth import mint_token
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name
from relevans.kit.grpc_client import bearer, open_channel
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.domain import ProfileView

TOKEN_LIFETIME = timedelta(minutes=5)
# The traits delivery reads besides the profile's fields (the `phone` trait when the profile has no
# imported phone).
PHONE_TRAIT = "phone"
LOCALE_TRAIT = "locale"
MAX_IDS_PER_CALL = 1000


class ProfileLookupError(Exception):
    """The profile service could not answer; the requests are retried later."""


def profile_view(p: profile_pb2.Profile) -> ProfileView:
    consents = {
        (
            enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
            enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
        ): enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_")
        for c in p.consents
    }
    return ProfileView(
        profile_id=p.profile_id,
        email=p.email,
        first_name=p.first_name,
        consents=consents,
        phone=p.phone or _text_trait(p, PHONE_TRAIT),
        locale=_text_trait(p, LOCALE_TRAIT),
        anonymous_ids=tuple(p.anonymous_ids),
    )


def _text_trait(p: profile_pb2.Profile, name: str) -> str:
    value = p.traits.get(name)
    return value.string_value if value is not None and value.HasField("string_value") else ""


class ProfileClient:
    def __init__(self, target: str, *, deadline_s: float, secret: str, clock: Clock) -> None:
        self.secret = secret
        self.clock = clock
        self.channel = open_channel(target, deadline_s=deadline_s)
        self.stub = profile_pb2_grpc.ProfileServiceStub(self.channel)

    def token(self, tenant: str) -> str:
        return mint_token(self.secret, tenant, ["read"], expires_at=self.clock.now() + TOKEN_LIFETIME)

    async def batch_get(self, tenant: str, profile_ids: Sequence[str]) -> dict[str, ProfileView]:
        """The tenant's profiles by requested id (a merged-away id maps to its survivor's profile);
        ids that are unknown or erased are absent."""
        ids = list(dict.fromkeys(p for p in profile_ids if p))
        found: dict[str, ProfileView] = {}
        metadata = bearer(self.token(tenant))
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            chunk = ids[start : start + MAX_IDS_PER_CALL]
            try:
                reply = await self.stub.BatchGetProfiles(
                    profile_pb2.BatchGetProfilesRequest(profile_ids=chunk), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                raise ProfileLookupError(f"profile_unavailable: {exc.code().name} {exc.details()}") from exc
            views = {p.profile_id: profile_view(p) for p in reply.profiles}
            found.update(views)
            for requested, survivor in reply.merged_profile_ids.items():
                if survivor in views:
                    found[requested] = views[survivor]
        return found

    async def get_one(self, tenant: str, profile_id: str) -> ProfileView | None:
        """One profile (a merged-away id answers with its survivor's), None when unknown or erased."""
        return (await self.batch_get(tenant, [profile_id])).get(profile_id)

    async def close(self) -> None:
        await self.channel.close(None)

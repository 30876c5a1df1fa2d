"""The gRPC face of EnrichmentService: proto -> domain -> store -> proto, nothing more.

After each write it drops the tenant's cached definitions, so a definition saved through this
process applies to the next event it ingests (other processes pick it up within the cache's TTL).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from relevans.kit.clock import Clock
from relevans.kit.errors import FieldViolation, InvalidArgument, check_count
from relevans.kit.proto import from_value, to_timestamp, to_value
from relevans.kit.server import ServiceBinding, principal
from relevans.profile.v1 import enrichment_pb2, enrichment_pb2_grpc
from services.profile.domain.counters import CounterDefinition
from services.profile.domain.definitions import (
    MAX_SCORE_RULES,
    validate_computed_trait,
    validate_counter,
    validate_scoring,
)
from services.profile.domain.enrichment import (
    ComputedTrait,
    Enrichment,
    EventMatch,
    ScoreRule,
    Scoring,
    TraitMatch,
)
from services.profile.store.enrichment import Dated, EnrichmentStore, TenantCache

SERVICE_NAME = "relevans.profile.v1.EnrichmentService"
SCOPES = {
    "CreateCounter": "admin",
    "ListCounters": "read",
    "DeleteCounter": "admin",
    "CreateComputedTrait": "admin",
    "ListComputedTraits": "read",
    "DeleteComputedTrait": "admin",
    "SetScoringRules": "admin",
    "GetScoringRules": "read",
}

Context = grpc.aio.ServicerContext[Any, Any]

# ---- proto <-> domain -------------------------------------------------------------------------


def _value(message: Any, field: str) -> Any:
    """A google.protobuf.Value field as a Python value; None when unset (numbers stay floats)."""
    return from_value(getattr(message, field)) if message.HasField(field) else None


def _proto_value(value: object) -> struct_pb2.Value | None:
    return None if value is None else to_value(value)


def counter_definition(p: enrichment_pb2.CounterDefinition) -> CounterDefinition:
    return CounterDefinition(
        name=p.name,
        event_type=p.event_type,
        windows=tuple(p.window_days) or (7,),
        property=p.property or None,
        property_value=_value(p, "property_value"),
        thresholds=tuple(p.thresholds),
    )


def counter_proto(d: Dated[CounterDefinition]) -> enrichment_pb2.CounterDefinition:
    c = d.value
    return enrichment_pb2.CounterDefinition(
        name=c.name,
        event_type=c.event_type,
        window_days=list(c.windows),
        property=c.property or "",
        property_value=_proto_value(c.property_value),
        thresholds=list(c.thresholds),
        create_time=to_timestamp(d.at),
    )


def computed_trait(p: enrichment_pb2.ComputedTrait) -> ComputedTrait:
    return ComputedTrait(p.name, p.event_type, p.property)


def computed_trait_proto(d: Dated[ComputedTrait]) -> enrichment_pb2.ComputedTrait:
    t = d.value
    return enrichment_pb2.ComputedTrait(
        name=t.name, event_type=t.event_type, property=t.property, create_time=to_timestamp(d.at)
    )


def score_rule(p: enrichment_pb2.ScoreRule) -> ScoreRule:
    target = p.WhichOneof("target")
    if target == "event":
        e = p.event
        return ScoreRule(
            p.points, event=EventMatch(e.event_type, e.property or None, _value(e, "property_value"))
        )
    if target == "trait":
        return ScoreRule(p.points, trait=TraitMatch(p.trait.name, _value(p.trait, "value")))
    return ScoreRule(p.points)  # validation names it


def scoring(p: enrichment_pb2.ScoringRules) -> Scoring:
    return Scoring(tuple(score_rule(r) for r in p.rules), p.half_life_days, tuple(p.thresholds))


def score_rule_proto(r: ScoreRule) -> enrichment_pb2.ScoreRule:
    if r.event is not None:
        e = r.event
        event = enrichment_pb2.EventMatch(
            event_type=e.event_type, property=e.property or "", property_value=_proto_value(e.property_value)
        )
        return enrichment_pb2.ScoreRule(event=event, points=r.points)
    if r.trait is not None:
        trait = enrichment_pb2.TraitMatch(name=r.trait.name, value=to_value(r.trait.value))
        return enrichment_pb2.ScoreRule(trait=trait, points=r.points)
    raise ValueError("a score rule needs an event or a trait")


def scoring_proto(d: Dated[Scoring]) -> enrichment_pb2.ScoringRules:
    s = d.value
    return enrichment_pb2.ScoringRules(
        rules=[score_rule_proto(r) for r in s.rules],
        half_life_days=s.half_life_days,
        thresholds=list(s.thresholds),
        update_time=to_timestamp(d.at),
    )


def _required_name(name: str) -> str:
    if not name:
        raise InvalidArgument(FieldViolation("name", "is required"))
    return name


# ---- servicer ---------------------------------------------------------------------------------


class EnrichmentServicer(enrichment_pb2_grpc.EnrichmentServiceServicer):
    def __init__(self, store: EnrichmentStore, clock: Clock, cache: TenantCache[Enrichment]) -> None:
        self.store = store
        self.clock = clock
        self.cache = cache

    async def CreateCounter(
        self, request: enrichment_pb2.CreateCounterRequest, context: Context
    ) -> enrichment_pb2.CreateCounterResponse:
        tenant = principal().tenant_id
        defn = validate_counter(counter_definition(request.counter))
        saved = await self.store.create_counter(tenant, defn, self.clock.now())
        self.cache.invalidate(tenant)
        return enrichment_pb2.CreateCounterResponse(counter=counter_proto(saved))

    async def ListCounters(
        self, request: enrichment_pb2.ListCountersRequest, context: Context
    ) -> enrichment_pb2.ListCountersResponse:
        found = await self.store.list_counters(principal().tenant_id)
        return enrichment_pb2.ListCountersResponse(counters=[counter_proto(d) for d in found])

    async def DeleteCounter(
        self, request: enrichment_pb2.DeleteCounterRequest, context: Context
    ) -> enrichment_pb2.DeleteCounterResponse:
        tenant = principal().tenant_id
        await self.store.delete_counter(tenant, _required_name(request.name))
        self.cache.invalidate(tenant)
        return enrichment_pb2.DeleteCounterResponse()

    async def CreateComputedTrait(
        self, request: enrichment_pb2.CreateComputedTraitRequest, context: Context
    ) -> enrichment_pb2.CreateComputedTraitResponse:
        tenant = principal().tenant_id
        trait = validate_computed_trait(computed_trait(request.computed_trait))
        saved = await self.store.create_computed_trait(tenant, trait, self.clock.now())
        self.cache.invalidate(tenant)
        return enrichment_pb2.CreateComputedTraitResponse(computed_trait=computed_trait_proto(saved))

    async def ListComputedTraits(
        self, request: enrichment_pb2.ListComputedTraitsRequest, context: Context
    ) -> enrichment_pb2.ListComputedTraitsResponse:
        found = await self.store.list_computed_traits(principal().tenant_id)
        return enrichment_pb2.ListComputedTraitsResponse(
            computed_traits=[computed_trait_proto(d) for d in found]
        )

    async def DeleteComputedTrait(
        self, request: enrichment_pb2.DeleteComputedTraitRequest, context: Context
    ) -> enrichment_pb2.DeleteComputedTraitResponse:
        tenant = principal().tenant_id
        await self.store.delete_computed_trait(tenant, _required_name(request.name))
        self.cache.invalidate(tenant)
        return enrichment_pb2.DeleteComputedTraitResponse()

    async def SetScoringRules(
        self, request: enrichment_pb2.SetScoringRulesRequest, context: Context
    ) -> enrichment_pb2.SetScoringRulesResponse:
        tenant = principal().tenant_id
        check_count("scoring_rules.rules", len(request.scoring_rules.rules), MAX_SCORE_RULES)
        rules = validate_scoring(scoring(request.scoring_rules))
        saved = await self.store.set_scoring(tenant, rules, self.clock.now())
        self.cache.invalidate(tenant)
        return enrichment_pb2.SetScoringRulesResponse(scoring_rules=scoring_proto(saved))

    async def GetScoringRules(
        self, request: enrichment_pb2.GetScoringRulesRequest, context: Context
    ) -> enrichment_pb2.GetScoringRulesResponse:
        found = await self.store.get_scoring(principal().tenant_id)
        return enrichment_pb2.GetScoringRulesResponse(scoring_rules=scoring_proto(found))


def binding(servicer: EnrichmentServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=enrichment_pb2_grpc.add_EnrichmentServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
    )

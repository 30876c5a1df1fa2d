"""The profile service's storage (PostgreSQL through SQLAlchemy Core and asyncpg).

One module per concern, over the tables of `tables`: `ingest` (Track), `identify` (identify and
merge), `imports`, `consents`, `traits`, `reads`, and the stores the other RPCs use (`gdpr`,
`enrichment`, `segments`); `rows` holds what several of them share. `ProfileStore` is what the
profile servicer holds: the small stores of its concerns on one engine, their methods as its own.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from services.profile.store.consents import ConsentStore
from services.profile.store.identify import IdentifyStore
from services.profile.store.imports import ImportInFlight, ImportResult, ImportStore
from services.profile.store.ingest import IngestStore
from services.profile.store.ingest_batch import EventMessages, TrackResult
from services.profile.store.reads import ProfileReads
from services.profile.store.rows import (
    ConsentMessage,
    Definitions,
    MergedMessage,
    SegmentRuleSource,
    TraitsMessages,
)
from services.profile.store.traits import TraitStore

__all__ = ["EventMessages", "ImportInFlight", "ImportResult", "ProfileStore", "TrackResult"]


class ProfileStore:
    """Profiles: track, identify and merge, import, consent and traits, reads. Each method is the
    one of the store of its concern (bound here, so a call costs what it did before the split)."""

    def __init__(
        self,
        engine: AsyncEngine,
        consent_message: ConsentMessage,
        merged_message: MergedMessage,
        traits_message: TraitsMessages,
        definitions: Definitions,
        segment_rules: SegmentRuleSource,
        *,
        ingest_engine: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        reads = ProfileReads(engine, definitions)
        consents = ConsentStore(engine, consent_message, reads)
        identify = IdentifyStore(engine, definitions, merged_message, traits_message, reads, consents)
        # `track` runs on `ingest_engine` (see create_engine's lookups_only); the rest on `engine`.
        ingest = IngestStore(ingest_engine or engine, definitions, segment_rules)
        imports = ImportStore(engine, consent_message, traits_message)
        traits = TraitStore(engine, traits_message, reads)

        self.track = ingest.track
        self.identify = identify.identify
        self.merge_profiles = identify.merge_profiles
        self.import_rows = imports.import_rows
        self.set_consent = consents.set_consent
        self.set_traits = traits.set_traits
        self.get_profiles = reads.get_profiles
        self.find_profile = reads.find_profile

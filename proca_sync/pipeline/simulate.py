"""A deterministic Proca traffic simulator: realistic supporter journeys plus poison.

:func:`plan_traffic` is pure: the same seed gives the same bytes (``random.Random(seed)``,
a fixed base date, nonces and the instance key derived from the seed; no clock). It
returns what to publish, in publish order; :func:`publish_traffic` sends it with a
:class:`~proca_sync.pipeline.producers.Publisher`.

All names and addresses are invented and use ``example.*`` domains.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from aio_pika.abc import AbstractChannel
from nacl.public import PrivateKey

from proca_sync.crypto import KeyPair, b64decode, b64encode
from proca_sync.pipeline.producers import (
    CampaignInfo,
    Consent,
    ContactData,
    DonationData,
    EmailStatus,
    Encryption,
    NonceCounter,
    OrgInfo,
    PageInfo,
    PrivacyData,
    Publisher,
    Route,
    StageName,
    TrackingData,
    action_route,
    build_action,
    build_action_v1,
    build_campaign_updated,
    build_confirm_created,
    build_email_status_event,
    build_system_message,
    event_route,
)

__all__ = [
    "ACTION_KINDS",
    "BASE_TIME",
    "POISON_KINDS",
    "Kind",
    "Planned",
    "TrafficReport",
    "derive_keypair",
    "plan_traffic",
    "publish_traffic",
    "summarize",
]

BASE_TIME = datetime(2024, 10, 14, 9, 0, 0, tzinfo=UTC)
"""Every simulated timestamp is an offset from this instant (never the wall clock)."""


class Kind(StrEnum):
    """What a planned message is (the summary counts these labels)."""

    ACTION = "action"  # consent-bearing signature, stage deliver
    FOLLOW_UP = "follow_up"  # share_open / share_close, withConsent false
    DUPLICATE = "duplicate"  # same person again in a campaign, dupeRank > 0
    DONATION = "donation"
    TESTING = "testing"
    PARTNER = "partner"  # collected by a coalition partner, orgId is theirs
    SUPPORTER_CONFIRM = "supporter_confirm"  # stage supporter_confirm
    ACTION_V1 = "action_v1"
    EMAIL_STATUS = "email_status"
    CAMPAIGN_UPDATED = "campaign_updated"
    CONFIRM_CREATED = "confirm_created"
    SYSTEM = "system"


POISON_KINDS: tuple[str, ...] = (
    "truncated_json",
    "non_utf8",
    "json_array",
    "unknown_schema",
    "missing_action",
    "wrong_types",
    "unknown_key",
    "tampered_mac",
    "missing_nonce",
    "null_action_id",
)
"""Malformed messages a consumer must park; each is labelled ``poison.<name>``."""

ACTION_KINDS: frozenset[str] = frozenset(
    {
        Kind.ACTION,
        Kind.FOLLOW_UP,
        Kind.DUPLICATE,
        Kind.DONATION,
        Kind.TESTING,
        Kind.PARTNER,
        Kind.SUPPORTER_CONFIRM,
        Kind.ACTION_V1,
    }
)


@dataclass(frozen=True)
class Planned:
    exchange: str
    routing_key: str
    body: bytes = field(repr=False)
    kind: str


@dataclass(frozen=True)
class TrafficReport:
    counts: dict[str, int]
    unroutable: int


def summarize(planned: Iterable[Planned]) -> dict[str, int]:
    """Number of planned messages per kind label, sorted by label."""
    return dict(sorted(Counter(p.kind for p in planned).items()))


def derive_keypair(label: str) -> KeyPair:
    """A reproducible X25519 pair from a label (simulation only: the key is guessable)."""
    private = PrivateKey(hashlib.sha256(f"proca-sync-simulate:{label}".encode()).digest())
    return KeyPair(public=b64encode(bytes(private.public_key)), private=b64encode(bytes(private)))


# ---- invented data ----------------------------------------------------------------------

_FIRST = (
    "Ada", "Bruno", "Clara", "Dario", "Elena", "Femi", "Greta", "Hugo", "Ines", "Jonas",
    "Kasia", "Luca", "Mira", "Noah", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tilda",
)  # fmt: skip
_LAST = (
    "Amsel", "Brandt", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat",
    "Ivanova", "Jansen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Rossi",
)  # fmt: skip
_DOMAINS = ("example.org", "example.com", "example.net", "mail.example.org")
_PLACES: dict[str, tuple[tuple[str, str], ...]] = {
    "DE": (("Berlin", "1{:04d}"), ("Hamburg", "2{:04d}"), ("Köln", "5{:04d}")),
    "FR": (("Paris", "75{:03d}"), ("Lyon", "69{:03d}")),
    "AT": (("Wien", "1{:03d}"), ("Graz", "8{:03d}")),
    "BE": (("Bruxelles", "1{:03d}"), ("Gent", "9{:03d}")),
    "IT": (("Roma", "00{:03d}"), ("Milano", "20{:03d}")),
    "PL": (("Warszawa", "00-{:03d}"), ("Kraków", "30-{:03d}")),
    "NL": (("Amsterdam", "10{:02d} AB"), ("Utrecht", "35{:02d} CD")),
}
_STREETS = ("Hauptstr.", "Rue de la Paix", "Via Roma", "Lange Gasse", "Kerkstraat")
_LOCALES = {"DE": "de", "AT": "de", "FR": "fr", "BE": "fr", "IT": "it", "PL": "pl", "NL": "nl"}
_SHARE_MEDIA = ("twitter", "facebook", "whatsapp", "email", "telegram")
_UTM = (
    TrackingData("newsletter", "email", "oct_mailing", "", "https://example.org/petition"),
    TrackingData("twitter", "social", "bees", "post1", "https://example.org/bees"),
    TrackingData(),
    TrackingData("partner", "referral", "coalition", "", "https://example.net/act"),
)


@dataclass(frozen=True)
class _World:
    org: OrgInfo
    partners: tuple[OrgInfo, ...]
    bees: CampaignInfo
    rivers: CampaignInfo
    pages: dict[str, PageInfo]
    partner_pages: dict[int, PageInfo]
    rivers_page: PageInfo


def _world(org: int) -> _World:
    me = OrgInfo(org, f"sim_org_{org}", "Simulated Organisation")
    partner_ids = [p for p in (9001, 9002, 9003) if p != org][:2]
    partners = tuple(OrgInfo(p, f"partner_{p}", f"Partner {p}") for p in partner_ids)
    bees = CampaignInfo(564, "save_the_bees", "Save the Bees", 621987, "basic")
    rivers = CampaignInfo(565, "clean_rivers", "Clean Rivers Now", None, "basic")
    pages = {
        locale: PageInfo(3120 + i, f"example.org/bees/{locale}", locale, f"thanks_{locale}")
        for i, locale in enumerate(("en", "de", "fr", "it", "pl", "nl"))
    }
    partner_pages = {
        p.id: PageInfo(4200 + i, f"example.net/{p.name}/bees", "en", None)
        for i, p in enumerate(partners)
    }
    rivers_page = PageInfo(
        3300, "example.org/rivers/en", "en", "rivers_thanks", None, "rivers_confirm"
    )
    return _World(me, partners, bees, rivers, pages, partner_pages, rivers_page)


@dataclass
class _Person:
    ref: str
    record: dict[str, Any]
    status: EmailStatus | None = None
    status_changed: datetime | None = None

    @property
    def domain(self) -> str:
        return str(self.record["email"]).split("@", 1)[1]


def _person(rng: random.Random, seed: int, n: int, *, test: bool = False) -> _Person:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    domain = rng.choice(_DOMAINS)
    email = f"test+{n}@example.org" if test else f"{first}.{last}{n}@{domain}".lower()
    country = rng.choice(list(_PLACES))
    city, code = rng.choice(_PLACES[country])
    record: dict[str, Any] = {"firstName": first}
    if rng.random() < 0.9:
        record["lastName"] = last
    record["email"] = email
    if rng.random() < 0.3:
        record["phone"] = f"+49 30 {rng.randrange(100000, 999999)}"
    record["country"] = country
    record["postcode"] = code.format(rng.randrange(10, 999))
    record["area"] = country
    if rng.random() < 0.25:
        record["address"] = {
            "region": None,
            "locality": city,
            "street": rng.choice(_STREETS),
            "streetNumber": str(rng.randrange(1, 200)),
        }
    digest = hashlib.sha256(f"sim:{seed}:{email}".encode()).digest()
    return _Person(b64encode(digest), record)


class _Ids:
    """Action ids that grow with ``createdAt`` (as database ids do) and never repeat."""

    def __init__(self) -> None:
        self._used: set[int] = set()

    def claim(self, moment: datetime) -> int:
        candidate = 4_700_000 + int((moment - BASE_TIME).total_seconds()) * 4
        while candidate in self._used:
            candidate += 1
        self._used.add(candidate)
        return candidate


# ---- the plan ---------------------------------------------------------------------------


class _Plan:
    def __init__(self, org: int, seed: int, actions: int, encryption: Encryption | None) -> None:
        self.org = org
        self.seed = seed
        self.rng = random.Random(seed)
        self.world = _world(org)
        self.budget = actions
        self.encryption = encryption
        self.ids = _Ids()
        self.items: list[tuple[datetime, int, Planned]] = []

    def add(self, moment: datetime, route: Route, document: dict[str, Any], kind: str) -> None:
        body = orjson.dumps(document)
        self.items.append(
            (moment, len(self.items), Planned(route.exchange, route.routing_key, body, str(kind)))
        )

    # -- actions

    def action(
        self,
        kind: Kind,
        person: _Person,
        moment: datetime,
        *,
        campaign: CampaignInfo,
        page: PageInfo,
        action_type: str = "register",
        stage: StageName = "deliver",
        collector: OrgInfo | None = None,
        consent: Consent | None,
        with_consent: bool,
        dupe_rank: int = 0,
        keep_email: bool = True,
        fields: dict[str, Any] | None = None,
        donation: DonationData | None = None,
        testing: bool = False,
        encrypted: bool = True,
        v1: bool = False,
        action_id: int | None = None,
        published_at: datetime | None = None,
    ) -> int | None:
        """Plan one action message; ``None`` when the action budget is spent.

        ``moment`` is ``createdAt``; ``published_at`` (default: the same) orders it.
        """
        if self.budget <= 0:
            return None
        self.budget -= 1
        ident = self.ids.claim(moment) if action_id is None else action_id
        builder = build_action_v1 if v1 else build_action
        document = builder(
            stage=stage,
            action_id=ident,
            action_type=action_type,
            created_at=moment,
            page=page,
            campaign=campaign,
            org=collector or self.world.org,
            contact=ContactData.from_record(
                person.ref, person.record, dupe_rank=dupe_rank, keep_email=keep_email
            ),
            privacy=PrivacyData(consent, with_consent, person.status, person.status_changed),
            custom_fields=fields,
            testing=testing,
            donation=donation,
            # null only for programmatic API use (no UTM, no Referer): rare.
            tracking=None if self.rng.random() < 0.03 else self.rng.choice(_UTM),
            encryption=self.encryption if encrypted else None,
        )
        route = action_route(self.org, stage, action_type, campaign.name)
        self.add(published_at or moment, route, document, kind)
        return ident

    def email_status(
        self,
        person: _Person,
        moment: datetime,
        status: EmailStatus,
        *,
        action_id: int,
        created_at: datetime,
        campaign: CampaignInfo,
        page: PageInfo,
        consent: Consent | None,
        encrypted: bool,
        repeat: bool = False,
    ) -> None:
        if not repeat:
            person.status, person.status_changed = status, moment
        document = build_email_status_event(
            timestamp=moment,
            contact=ContactData.from_record(person.ref, person.record, keep_email=False),
            privacy=PrivacyData(consent, False, person.status, person.status_changed),
            encryption=self.encryption if encrypted else None,
            action_id=action_id,
            created_at=created_at,
            custom_fields={"email_provider": person.domain},
            page=page,
            campaign=campaign,
            tracking=TrackingData(),
        )
        self.add(moment, event_route(self.org, document), document, Kind.EMAIL_STATUS)

    # -- journeys

    def journey(self, n: int, start: datetime) -> None:
        rng, world = self.rng, self.world
        test = rng.random() < 0.05
        person = _person(rng, self.seed, n, test=test)
        # The org activated its key after a while: early supporters travel in clear.
        encrypted = self.encryption is not None and n % 4 != 0
        v1 = not test and rng.random() < 0.06
        partner = (
            None
            if test or not world.partners or rng.random() > 0.12
            else rng.choice(world.partners)
        )
        if partner is not None:
            page = world.partner_pages[partner.id]
            kind = Kind.PARTNER
        else:
            page = world.pages.get(_LOCALES[person.record["country"]], world.pages["en"])
            kind = Kind.TESTING if test else Kind.ACTION_V1 if v1 else Kind.ACTION
        opt_in = rng.choice((True, True, True, False, None))
        consent = Consent(opt_in, start)
        fields: dict[str, Any] = {"emailProvider": person.domain}
        if rng.random() < 0.3:
            fields["comment"] = rng.choice(("Count me in", "Bees matter!", "Signed for my kids"))
        if rng.random() < 0.1:
            fields["newsletter_source"] = "footer"
        signed = self.action(
            kind, person, start, campaign=world.bees, page=page, collector=partner,
            consent=consent, with_consent=True, fields=fields, testing=test,
            encrypted=encrypted, v1=v1,
        )  # fmt: skip
        if signed is None or test:
            return
        clock = start

        # Double opt-in click, a bounce, or nothing.
        roll = rng.random()
        if roll < 0.45:
            clock = start + timedelta(minutes=rng.randrange(2, 90))
            self.email_status(
                person, clock, "double_opt_in", action_id=signed, created_at=start,
                campaign=world.bees, page=page, consent=consent, encrypted=encrypted,
            )  # fmt: skip
            if rng.random() < 0.1:  # a second click repeats the identical event
                self.email_status(
                    person, clock, "double_opt_in", action_id=signed, created_at=start,
                    campaign=world.bees, page=page, consent=consent, encrypted=encrypted,
                    repeat=True,
                )  # fmt: skip
        elif roll < 0.5:
            clock = start + timedelta(minutes=rng.randrange(1, 10))
            self.email_status(
                person, clock, "bounce", action_id=signed, created_at=start,
                campaign=world.bees, page=page, consent=consent, encrypted=encrypted,
            )  # fmt: skip

        # Sharing after signing: attached to the known supporter, no new consent.
        if rng.random() < 0.5:
            medium = rng.choice(_SHARE_MEDIA)
            for action_type in ("share_open", "share_close"):
                clock += timedelta(seconds=rng.randrange(5, 120))
                self.action(
                    Kind.FOLLOW_UP, person, clock, campaign=world.bees, page=page,
                    action_type=action_type, collector=partner, consent=consent,
                    with_consent=False, keep_email=False, fields={"medium": medium},
                    encrypted=encrypted,
                )  # fmt: skip

        # Signing the same campaign again: a duplicate.
        if rng.random() < 0.1:
            clock += timedelta(days=rng.randrange(1, 5))
            self.action(
                Kind.DUPLICATE, person, clock, campaign=world.bees, page=page, collector=partner,
                consent=Consent(opt_in, clock), with_consent=True, dupe_rank=1, fields=fields,
                encrypted=encrypted,
            )  # fmt: skip

        # A second campaign days later, with newer personal data; it needs confirmation.
        if rng.random() < 0.3 and person.status != "bounce":
            clock += timedelta(days=rng.randrange(1, 20), minutes=rng.randrange(0, 600))
            person.record = dict(person.record)
            if rng.random() < 0.5:
                person.record["postcode"] = str(rng.randrange(10000, 99999))
            new_consent = Consent(rng.choice((True, False)), clock)
            confirmed = person.status == "double_opt_in"
            rivers_id = None
            if not confirmed:
                rivers_id = self.action(
                    Kind.SUPPORTER_CONFIRM, person, clock, campaign=world.rivers,
                    page=world.rivers_page, stage="supporter_confirm", consent=new_consent,
                    with_consent=True, fields={"emailProvider": person.domain},
                    encrypted=encrypted,
                )  # fmt: skip
                if rivers_id is None:
                    return
                click = clock + timedelta(minutes=rng.randrange(1, 30))
                self.email_status(
                    person, click, "double_opt_in", action_id=rivers_id, created_at=clock,
                    campaign=world.rivers, page=world.rivers_page, consent=new_consent,
                    encrypted=encrypted,
                )  # fmt: skip
            # Delivered once confirmed: createdAt stays, publishing waits for the click.
            delivered_at = max(clock, person.status_changed or clock)
            self.action(
                Kind.ACTION, person, clock, campaign=world.rivers, page=world.rivers_page,
                consent=new_consent, with_consent=True, fields={"emailProvider": person.domain},
                encrypted=encrypted, action_id=rivers_id, published_at=delivered_at,
            )  # fmt: skip
            clock = delivered_at
            if rng.random() < 0.3:
                clock += timedelta(minutes=rng.randrange(1, 60))
                self.action(
                    Kind.DONATION, person, clock, campaign=world.rivers, page=world.rivers_page,
                    action_type="donate", consent=new_consent, with_consent=False,
                    keep_email=False, encrypted=encrypted,
                    donation=DonationData(
                        amount=rng.choice((500, 1000, 2500, 5000)),
                        frequency_unit=rng.choice(("one_off", "one_off", "monthly")),
                        payload={"provider": "simulated"},
                    ),
                )  # fmt: skip

        # Later: unsubscribe or spam complaint.
        roll = rng.random()
        if roll < 0.06 and person.status != "bounce":
            later = clock + timedelta(days=rng.randrange(1, 30))
            status: EmailStatus = "unsub" if roll < 0.04 else "spam"
            self.email_status(
                person, later, status, action_id=signed, created_at=start,
                campaign=world.bees, page=page, consent=consent, encrypted=encrypted,
            )  # fmt: skip

    def platform_events(self, span: timedelta) -> None:
        world, org = self.world, self.org
        mid = BASE_TIME + span / 2
        updated = build_campaign_updated(
            timestamp=mid,
            campaign=world.bees,
            org=world.org,
            config={
                "locales": {"en": {"title": "Save the Bees"}},
                "layout": {"primaryColor": "#ffcc00"},
            },
        )
        self.add(mid, event_route(org, updated), updated, Kind.CAMPAIGN_UPDATED)
        for i, partner in enumerate(world.partners[:1]):
            moment = BASE_TIME + span / 3 + timedelta(seconds=i)
            launch = build_confirm_created(
                timestamp=moment, operation="launch_page", code=f"{4711 + i:08d}",
                subject_id=world.partner_pages[partner.id].id, object_id=None,
                base_url="https://proca.example.org", campaign=world.bees, org=partner,
                creator={"email": f"staff{i}@example.net", "jobTitle": "Campaigner"},
            )  # fmt: skip
            self.add(moment, event_route(org, launch), launch, Kind.CONFIRM_CREATED)
            joined = build_system_message(
                event_type="join_campaign", user_email=f"staff{i}@example.net",
                created_at=moment + timedelta(microseconds=123456), org=partner,
                campaign=world.bees, page=world.partner_pages[partner.id],
            )  # fmt: skip
            self.add(moment, event_route(org, joined), joined, Kind.SYSTEM)
        moment = BASE_TIME + span * 2 / 3
        staffer = build_confirm_created(
            timestamp=moment, operation="add_staffer", code="00031337",
            subject_id=org, email="new.colleague@example.org", org=world.org,
            base_url="https://proca.example.org",
        )  # fmt: skip
        self.add(moment, event_route(org, staffer), staffer, Kind.CONFIRM_CREATED)
        new_user = build_system_message(
            event_type="new_user", user_email="new.colleague@example.org",
            created_at=moment + timedelta(seconds=3, microseconds=654321),
        )  # fmt: skip
        self.add(moment, event_route(org, new_user), new_user, Kind.SYSTEM)

    def ordered(self) -> list[Planned]:
        return [planned for _, _, planned in sorted(self.items, key=lambda item: item[:2])]


# ---- poison -----------------------------------------------------------------------------


def _flip_byte(text: str, index: int) -> str:
    raw = bytearray(b64decode(text))
    raw[index % len(raw)] ^= 0x01
    return b64encode(bytes(raw))


def _poison(
    rng: random.Random,
    template: dict[str, Any],
    sealer: Callable[[str], Encryption],
    org_public: str,
) -> dict[str, bytes]:
    """One body per poison kind, each derived from a valid action message."""
    record = {"firstName": "Poison", "email": "poison@example.org", "country": "DE", "area": "DE"}
    stranger = derive_keypair(f"stranger:{rng.random()}").public
    bodies: dict[str, bytes] = {}
    valid = orjson.dumps(template)
    bodies["truncated_json"] = valid[: len(valid) // 2]
    bodies["non_utf8"] = b'{"schema": "proca:action:2", "note": "\xff\xfe\xc3("}'
    bodies["json_array"] = orjson.dumps([template])
    bodies["unknown_schema"] = orjson.dumps({**template, "schema": "proca:action:9"})
    bodies["missing_action"] = orjson.dumps({k: v for k, v in template.items() if k != "action"})
    wrong = {**template, "actionId": "not-a-number"}
    wrong["action"] = {**template["action"], "testing": "maybe"}
    bodies["wrong_types"] = orjson.dumps(wrong)
    unknown = {**template, "personalInfo": sealer(stranger).seal(record)}
    bodies["unknown_key"] = orjson.dumps(unknown)
    sealed = sealer(org_public).seal(record)
    tampered_info = {**sealed, "payload": _flip_byte(sealed["payload"], rng.randrange(1 << 16))}
    bodies["tampered_mac"] = orjson.dumps({**template, "personalInfo": tampered_info})
    no_nonce = {k: v for k, v in sealer(org_public).seal(record).items() if k != "nonce"}
    bodies["missing_nonce"] = orjson.dumps({**template, "personalInfo": no_nonce})
    bodies["null_action_id"] = orjson.dumps({**template, "actionId": None})
    return bodies


# ---- entry points -----------------------------------------------------------------------


def plan_traffic(
    org: int,
    *,
    actions: int,
    seed: int = 0,
    keys: KeyPair | None = None,
    instance: KeyPair | None = None,
    poison: int = 0,
) -> list[Planned]:
    """Plan ``actions`` action messages for org ``org`` plus events and ``poison`` × each
    poison kind, in publish order (by simulated time). Deterministic for a seed.

    ``keys`` is the org's key pair: with it, most supporters' data is encrypted for it (the
    first supporters stay in clear, as if the key was activated later). ``instance`` is
    the sender key; without one a key derived from ``seed`` is used.
    """
    if actions < 0 or poison < 0:
        raise ValueError("actions and poison must be >= 0")
    sender = instance or derive_keypair(f"instance:{seed}")
    nonce_start = int.from_bytes(hashlib.sha256(f"nonce:{seed}".encode()).digest()[:24], "big")
    nonces = NonceCounter(nonce_start)
    encryption = None
    if keys is not None:
        encryption = Encryption(recipient_public=keys.public, sender=sender, nonces=nonces)
    plan = _Plan(org, seed, actions, encryption)

    n = 0
    clock = BASE_TIME
    while plan.budget > 0:
        plan.journey(n, clock)
        n += 1
        clock += timedelta(seconds=plan.rng.randrange(20, 400))
    plan.platform_events(max(clock - BASE_TIME, timedelta(hours=1)))
    planned = plan.ordered()

    if poison:
        world = plan.world
        template = build_action(
            action_id=4_699_999,
            action_type="register",
            created_at=BASE_TIME,
            page=world.pages["en"],
            campaign=world.bees,
            org=world.org,
            contact=ContactData("cG9pc29u" + "A" * 35, {}, 0, "Poison", None, "DE"),
            privacy=PrivacyData(Consent(True, BASE_TIME), True),
        )
        org_public = keys.public if keys is not None else derive_keypair(f"org:{seed}").public

        def sealer(recipient: str) -> Encryption:
            return Encryption(recipient, sender, nonces)

        route = action_route(org, "deliver", "register", world.bees.name)
        for _ in range(poison):
            for name, body in _poison(plan.rng, template, sealer, org_public).items():
                item = Planned(route.exchange, route.routing_key, body, f"poison.{name}")
                planned.insert(plan.rng.randrange(len(planned) + 1), item)
    return planned


PUBLISH_WINDOW = 256
"""Publisher confirms awaited at once when publishing as fast as possible."""


async def publish_traffic(
    channel: AbstractChannel, planned: Iterable[Planned], *, rate: float | None = None
) -> TrafficReport:
    """Publish the plan in order (at most ``rate`` messages per second; ``None``: at once).

    Every publish is confirmed by the broker before this returns; up to ``window``
    confirms are awaited at once (frames still leave in plan order: tasks start in
    creation order). Unroutable messages (no queue bound) are counted, not retried — as
    on the real server.
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    publisher = Publisher(channel)
    loop = asyncio.get_running_loop()
    started = loop.time()
    counts: Counter[str] = Counter()
    in_flight: set[asyncio.Task[bool]] = set()
    window = 1 if rate is not None else PUBLISH_WINDOW
    for index, item in enumerate(planned):
        if rate is not None:
            delay = started + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if len(in_flight) >= window:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        in_flight.add(
            asyncio.create_task(publisher.publish(item.exchange, item.routing_key, item.body))
        )
        counts[item.kind] += 1
    for pending in asyncio.as_completed(in_flight):
        await pending
    return TrafficReport(counts=dict(sorted(counts.items())), unroutable=publisher.unroutable)

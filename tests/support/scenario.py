"""One stream of messages that exercises every modelling rule, with the CRM state it
must produce (whatever the order): merges, newer-wins, follow-ups, consent, DOI, bounces
that overtake their action, campaign updates, testing actions, v1, encryption."""

from __future__ import annotations

from typing import Any

import orjson

from proca_sync.crypto import Keystore
from tests.conftest import all_fixture_bodies
from tests.support.builders import ORG, action, campaign_updated, dumps, email_status

R = {name: (name * 43)[:43] for name in "ABCDEFGH"}


def keystore() -> Keystore:
    return Keystore([ORG])


def v1_clear(action_id: int, *, ref: str, email: str, created: str) -> dict[str, Any]:
    return {
        "schema": "proca:action:1",
        "stage": "deliver",
        "actionId": action_id,
        "actionPageId": 10,
        "campaignId": 5,
        "orgId": 7,
        "org": {"name": "example_org", "title": "Example Org"},
        "action": {
            "actionType": "register",
            "fields": {"comment": "v1"},
            "createdAt": created,
            "testing": False,
        },
        "actionPage": {
            "locale": "en",
            "name": "example.org/petition/en",
            "thankYouTemplate": None,
            "thankYouTemplateRef": None,
        },
        "campaign": {"name": "legacy", "title": "Legacy", "externalId": 42},
        "contact": {
            "ref": ref,
            "firstName": "Grace",
            "email": email,
            "area": "GB",
            "payload": orjson.dumps(
                {"firstName": "Grace", "lastName": "Hopper", "email": email, "country": "GB"}
            ).decode(),
        },
        "privacy": {"communication": True, "givenAt": created},
        "tracking": None,
    }


def bodies() -> list[bytes]:
    """The scenario stream (fixtures included)."""
    messages = [
        # A: signature, then a share (email cleared), then a newer signature elsewhere
        action(
            101,
            ref=R["A"],
            email="ada@example.org",
            created="2024-03-01T10:00:00Z",
            record={"postcode": "1000", "country": "BE"},
        ),
        action(
            102,
            ref=R["A"],
            email=None,
            created="2024-03-01T10:05:00Z",
            action_type="share",
            with_consent=False,
            given_at="2024-03-01T10:00:00Z",
            record={"postcode": "1000"},
            custom={"medium": "twitter"},
        ),
        action(
            103,
            ref=R["A"],
            email="ada@example.org",
            created="2024-04-02T09:00:00Z",
            campaign="second_campaign",
            opt_in=False,
            record={"postcode": "2000", "country": "BE", "lastName": "Lovelace"},
        ),
        # B: no opt-in, later confirms by double opt-in (event overtakes nothing)
        action(
            201, ref=R["B"], email="bob@example.org", created="2024-03-02T10:00:00Z", opt_in=False
        ),
        email_status(
            ref=R["B"],
            email=None,
            status="double_opt_in",
            changed="2024-03-02T10:07:00Z",
            action_id=201,
            created="2024-03-02T10:00:00Z",
        ),
        # C: the bounce arrives before or after the action; bounce is newer than the opt-in
        action(301, ref=R["C"], email="carol@example.org", created="2024-03-03T10:00:00Z"),
        email_status(
            ref=R["C"],
            email=None,
            status="bounce",
            changed="2024-03-03T11:00:00Z",
            action_id=301,
            created="2024-03-03T10:00:00Z",
        ),
        # D: two refs, one e-mail (popular_initiative-style refs) → one contact
        action(401, ref=R["D"], email="dora@example.org", created="2024-03-04T10:00:00Z"),
        action(
            402,
            ref=R["E"],
            email="Dora@Example.org ",
            created="2024-03-05T10:00:00Z",
            record={"postcode": "3000"},
        ),
        # F: unsubscribes after a DOI: newest status wins
        action(601, ref=R["F"], email="fay@example.org", created="2024-03-06T10:00:00Z"),
        email_status(
            ref=R["F"],
            email="fay@example.org",
            status="double_opt_in",
            changed="2024-03-06T10:10:00Z",
        ),
        email_status(
            ref=R["F"], email="fay@example.org", status="unsub", changed="2024-03-07T08:00:00Z"
        ),
        # G: a bounce for a supporter never delivered stays invisible
        email_status(ref=R["G"], email=None, status="bounce", changed="2024-03-08T10:00:00Z"),
        # H: encrypted personal data, and a testing action
        action(
            801,
            ref=R["H"],
            email=None,
            created="2024-03-09T10:00:00Z",
            first_name="Hedy",
            record={"email": "hedy@example.org", "lastName": "Lamarr", "postcode": "1010"},
            encrypt_for=ORG,
        ),
        action(
            802,
            ref=R["H"],
            email=None,
            created="2024-03-09T10:02:00Z",
            action_type="share",
            with_consent=False,
            given_at="2024-03-09T10:00:00Z",
            testing=True,
        ),
        # campaigns: an update outranks the snapshot carried by later actions
        campaign_updated(
            "petition_x", "Petition X (renamed)", when="2024-02-01T00:00:00Z", external_id=99
        ),
        v1_clear(901, ref="V" * 43, email="grace@example.org", created="2024-03-10T10:00:00Z"),
    ]
    return [dumps(m) for m in messages] + all_fixture_bodies()


def contact(export: dict[str, Any], email: str) -> dict[str, Any]:
    matches = [c for c in export["contacts"] if c["email"] == email]
    assert len(matches) == 1, f"expected one contact for {email}, found {len(matches)}"
    return matches[0]


def check_expected(export: dict[str, Any]) -> None:
    """The state the scenario must reach."""
    ada = contact(export, "ada@example.org")
    assert ada["postcode"] == "2000" and ada["lastName"] == "Lovelace"  # newer signature wins
    assert ada["subscribed"] is True  # a later form without the box is not an unsubscribe
    assert [a["actionId"] for a in ada["actions"]] == [101, 102, 103]
    bob = contact(export, "bob@example.org")
    assert (
        bob["subscribed"] is True
        and bob["emailStatus"] == "double_opt_in"
        and bob["optIn"] is False
    )
    carol = contact(export, "carol@example.org")
    assert carol["subscribed"] is False and carol["emailStatus"] == "bounce"
    dora = contact(export, "dora@example.org")
    assert sorted(dora["contactRefs"]) == sorted([R["D"], R["E"]]) and dora["postcode"] == "3000"
    fay = contact(export, "fay@example.org")
    assert fay["subscribed"] is False and fay["emailStatus"] == "unsub"
    assert [h["status"] for h in fay["emailStatusHistory"]] == ["double_opt_in", "unsub"]
    assert all(R["G"] not in c["contactRefs"] for c in export["contacts"])
    hedy = contact(export, "hedy@example.org")
    assert hedy["lastName"] == "Lamarr" and hedy["testing"] is False
    assert [a["testing"] for a in hedy["actions"]] == [False, True]
    grace = contact(export, "grace@example.org")
    assert grace["lastName"] == "Hopper" and grace["actions"][0]["customFields"] == {
        "comment": "v1"
    }
    campaigns = {c["name"]: c for c in export["campaigns"]}
    assert campaigns["petition_x"]["title"] == "Petition X (renamed)"
    assert campaigns["petition_x"]["externalId"] == 99
    assert campaigns["legacy"]["externalId"] == 42
    # the shared fixtures: the double-opt-in event created its contact, subscribed
    bruce = [
        c
        for c in export["contacts"]
        if "1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY" in c["contactRefs"]
    ]
    assert len(bruce) == 1 and bruce[0]["subscribed"] is True
    assert bruce[0]["emailStatus"] == "double_opt_in"

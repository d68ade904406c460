"""The pipeline service's OpenAPI description, fuzzed with schemathesis against a running
``pipeline serve`` (no broker: the outbox just fills): no 5xx, and no submitted contact
value ever comes back in an error body. Kept small for CI (``PROCA_FUZZ_EXAMPLES``
raises the number of examples per operation)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.pipeline import Pipeline

EXAMPLES = int(os.environ.get("PROCA_FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    service = Pipeline(tmp_path_factory.mktemp("fuzz"), "amqp://unused/")
    service.org, service.campaign, service.page = 1, 1, 1
    service.setup(custom_action_deliver=True)
    service.amqp_url = ""
    service.start_without_broker()
    try:
        yield service
    finally:
        service.stop()


def personal_strings(value: Any) -> list[str]:
    """Every string under ``contact`` in a generated body (what must never be echoed)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "contact":
                found += [s for s in _strings(item) if len(s) >= 5]
            else:
                found += personal_strings(item)
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_no_server_errors_and_no_echo(fuzzed: Pipeline) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(headers={"X-Api-Key": fuzzed.api_key})
            assert response.status_code < 500, (case.path, response.status_code)
            if response.status_code >= 400:
                for value in personal_strings(case.body):
                    assert value not in response.text, f"{case.path}: echoes a contact value"

        check()


def test_fuzz_found_the_intake(fuzzed: Pipeline) -> None:
    """The fuzzed app is the real one: a valid submission is stored."""
    import asyncio

    from tests.support.pipeline import submission

    status, answer = asyncio.run(fuzzed.post("/api/actions", submission(1, 1)))
    assert status == 200 and len(answer["contactRef"]) == 43
    assert Path(fuzzed.db.removeprefix("sqlite:///")).stat().st_mode & 0o777 == 0o600

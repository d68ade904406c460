"""Shared helpers for the unit tests: where the sample messages live and how to read them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
"""``/work/shared/fixtures`` for a checkout at ``/work/main``: the real sample messages."""


def load_fixture(name: str) -> bytes:
    """The raw bytes of one sample message, exactly as stored (e.g. ``"event.json"``)."""
    return (FIXTURES_DIR / name).read_bytes()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"fixture directory {FIXTURES_DIR} is missing")
    return FIXTURES_DIR


@pytest.fixture(name="load_fixture", scope="session")
def _load_fixture(fixtures_dir: Path) -> Callable[[str], bytes]:
    """``load_fixture(name) -> bytes`` as a fixture, so test modules need not import conftest."""
    return load_fixture

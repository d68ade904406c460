"""The console's login limiter and role order (pure)."""

from __future__ import annotations

import pytest

from proca_sync.web.accounts import LoginLimiter, Role


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_blocks_after_the_budget_and_forgets_after_the_window() -> None:
    clock = Clock()
    limiter = LoginLimiter(attempts=3, window=60, clock=clock)
    for _ in range(2):
        limiter.failed("user:ada", "addr:1")
    assert not limiter.blocked("user:ada", "addr:1")
    limiter.failed("user:ada", "addr:1")
    assert limiter.blocked("user:ada")
    assert limiter.blocked("user:bob", "addr:1")  # the same address, another name
    assert not limiter.blocked("user:bob", "addr:2")
    clock.now += 59
    assert limiter.blocked("user:ada")
    clock.now += 1.5
    assert not limiter.blocked("user:ada", "addr:1")


@pytest.mark.parametrize(
    ("have", "needed", "allowed"),
    [
        pytest.param(Role.ADMIN, Role.MODERATOR, True, id="admin-moderates"),
        pytest.param(Role.MODERATOR, Role.MODERATOR, True, id="moderator-moderates"),
        pytest.param(Role.MODERATOR, Role.ADMIN, False, id="moderator-not-admin"),
        pytest.param(Role.VIEWER, Role.MODERATOR, False, id="viewer-not-moderator"),
        pytest.param(Role.VIEWER, Role.VIEWER, True, id="viewer-views"),
    ],
)
def test_roles_include_the_ones_below(have: Role, needed: Role, allowed: bool) -> None:
    assert have.allows(needed) is allowed

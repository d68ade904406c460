"""Local servers reproducing the documented contracts of the SaaS APIs our destinations
use (see ``base.py``); one module per vendor, each with a ``DRIVER`` for the contract
suite, listed in :data:`DRIVERS`."""

from __future__ import annotations

DRIVERS: dict[str, str] = {
    # destination type → "tests.support.emulators.<vendor>" (the module defining DRIVER)
}

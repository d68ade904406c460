"""The published test vector of crypto.md §7 (keys never used for real data)."""

from __future__ import annotations

from typing import Any

SENDER_PRIVATE = "VQvhl-ULFUd0eeO3HuC-nhdyX47E6eHBxdvI4bfwdr0"
SENDER_PUBLIC = "jYUbBVfmt_VOWFBcB255mrABQjB4zKe9a8i746GXkhw"
RECIPIENT_PRIVATE = "TDz284HQ3MSNM14zIHCXJdhoUs4geSL-qyfMAqmNlBA"
RECIPIENT_PUBLIC = "W59ljG1wEj4oh90f9nEqK4fV_izE2XkkC6BMJtu8H2s"
NONCE = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX"
PAYLOAD = (
    "Tgj-z5KqufDffDFDVVMsvS8peX70BQR2gqB0qczeQWZkcl-vLZHoWkXCVF-CjNJrYxd7H4vzA6rLPf9keiKZh5Oeso"
    "odLFUm9AObHf1RQodK3Eu4mhuyPL_rplK7B93cvsXjvt1HpEfjVa6_shpxXLcpFBV4x66P960Cu1C9AdCF3vZTKV7t"
    "lbwl"
)
PLAINTEXT = {
    "firstName": "Simone",
    "lastName": "de Beauvoir",
    "email": "simone@example.org",
    "country": "FR",
    "postcode": "75001",
    "area": "FR",
}


def personal_info() -> dict[str, Any]:
    """The vector as a wire ``personalInfo`` block (fresh dict each call)."""
    return {
        "payload": PAYLOAD,
        "nonce": NONCE,
        "encryptKey": {"id": 12, "public": RECIPIENT_PUBLIC},
        "signKey": {"id": 1, "public": SENDER_PUBLIC},
    }

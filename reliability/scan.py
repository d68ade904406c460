"""The privacy scanner: no e-mail, name, postcode, phone number or password in any output.

:func:`collect_terms` takes the personal data out of every published body — clear
contacts, and the plaintext of encrypted ``personalInfo`` blocks, decrypted with the
scenarios' key stores — plus the passwords the run used. :func:`scan` then reads every
captured line (consumer logs, CLI stdout and stderr) and reports hits by kind, output
and line number only: a hit is never printed, the report must not leak either.

Matching is by token and exact set membership, so it is fast on hundreds of thousands
of lines and has no false positives from substrings: e-mail-shaped tokens (case-folded),
words (names, case-sensitive), digit groups shaped like the simulator's postcodes and
phone numbers, and plain substrings for passwords. For postcodes, text that holds numbers
by construction is left out: JSON numbers, the ``ts`` field of JSON log lines, URLs
(``…://host:port/…``) and absolute file paths with their ``:line`` suffix (``replay``
names each rejected message ``FILE:LINE``), whose numbers share the shape of postcodes, and
table rows that label a count (``│ bytes │ 1091 │`` in ``parked show``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from proca_sync.crypto import Keystore, decrypt_record
from proca_sync.errors import ProcaSyncError
from proca_sync.messages.schemas import PersonalInfo
from reliability.harness import Output

__all__ = ["Hit", "ScanReport", "Terms", "collect_terms", "scan"]

_PERSONAL_KEYS = {"email": "email", "firstName": "name", "lastName": "name",
                  "postcode": "postcode", "phone": "phone"}  # fmt: skip

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_WORD = re.compile(r"[^\W\d_]+")
_POSTCODE = re.compile(r"(?<![0-9A-Za-z])(?:\d{2,5}-\d{3}|\d{4} [A-Z]{2}|\d{3,6})(?![0-9A-Za-z])")
_PHONE = re.compile(r"\+\d[\d ]{6,}\d")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
_COUNT_ROW = re.compile(
    r"^\s*[│|]\s*(?:bytes|attempts|times parked|actionId|id|messages|total)\s*[│|]\s*\d+\s*[│|]\s*$"
)
_PATH = re.compile(r"(?<![\w.])/[\w.-]+(?:/[\w.-]+)+(?::\d+)?")


@dataclass
class Terms:
    """Personal data the run published, by kind."""

    emails: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    postcodes: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)
    decrypted: int = 0

    def add(self, kind: str, value: str) -> None:
        value = value.strip()
        if not value:
            return
        if kind == "email":
            self.emails.add(value.casefold())
        elif kind == "name":
            # Each word of a name; one- and two-letter words would match ordinary text.
            self.names.update(w for w in _WORD.findall(value) if len(w) >= 3)
        elif kind == "postcode":
            self.postcodes.add(value)
        elif kind == "phone":
            self.phones.add(" ".join(value.split()))

    def counts(self) -> dict[str, int]:
        return {"e-mails": len(self.emails), "names": len(self.names),
                "postcodes": len(self.postcodes), "phones": len(self.phones),
                "passwords": len(self.secrets)}  # fmt: skip


def _walk(node: Any, terms: Terms, keystores: list[Keystore]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            kind = _PERSONAL_KEYS.get(key)
            if kind is not None and isinstance(value, str):
                terms.add(kind, value)
            elif key == "personalInfo" and isinstance(value, dict):
                _decrypt(value, terms, keystores)
            else:
                _walk(value, terms, keystores)
    elif isinstance(node, list):
        for item in node:
            _walk(item, terms, keystores)


def _decrypt(block: dict[str, Any], terms: Terms, keystores: list[Keystore]) -> None:
    try:
        info = PersonalInfo.model_validate(block)
    except ValidationError:
        return
    for keystore in keystores:
        try:
            record = decrypt_record(info, keystore)
        except ProcaSyncError:
            continue
        terms.decrypted += 1
        _walk(record, terms, keystores)
        return


def collect_terms(
    bodies: Iterable[bytes], key_files: Iterable[Path], secrets: Iterable[str]
) -> Terms:
    """Every e-mail, name, postcode and phone number in ``bodies`` (decrypting what the
    key stores can), and the ``secrets``."""
    keystores = [Keystore.load(path) for path in key_files]
    terms = Terms()
    for body in bodies:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        _walk(document, terms, keystores)
    # The simulator's poison record (sealed for unknown keys, so never decrypted here).
    terms.add("email", "poison@example.org")
    terms.add("name", "Poison")
    terms.secrets.update(s for s in secrets if s)
    return terms


@dataclass(frozen=True)
class Hit:
    label: str
    line: int
    kind: str


@dataclass
class ScanReport:
    lines: int
    outputs: int
    excluded: list[str]
    hits: list[Hit]

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(h.kind for h in self.hits))


def _strings(line: str) -> Iterator[str]:
    """The text of a line in which postcodes are looked for (see the module doc)."""
    if line.startswith("{"):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            stack: list[Any] = [{k: v for k, v in entry.items() if k != "ts"}]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    stack.extend(node.keys())
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
                elif isinstance(node, str):
                    yield _numbers_free(node)
            return
    if not _COUNT_ROW.match(line):
        yield _numbers_free(line)


def _numbers_free(text: str) -> str:
    """``text`` without URLs and file paths: their ports and ``file:line`` numbers have
    the shape of postcodes (``replay`` names each rejected message ``FILE:LINE``)."""
    return _PATH.sub(" ", _URL.sub(" ", text))


def scan_line(line: str, terms: Terms, found: list[str] | None = None) -> list[str]:
    """The kinds of personal data found in one line (empty: clean). ``found`` collects
    the matching values themselves (for local debugging only: they are personal data)."""
    kinds = []
    folded = line.casefold()
    if "@" in line and any(m.casefold() in terms.emails for m in _EMAIL.findall(line)):
        kinds.append("e-mail")
    if any(word in terms.names for word in _WORD.findall(line)):
        kinds.append("name")
    codes = [c for text in _strings(line) for c in _POSTCODE.findall(text) if c in terms.postcodes]
    if codes:
        kinds.append("postcode")
        if found is not None:
            found.extend(codes)
    if "+" in line and any(" ".join(p.split()) in terms.phones for p in _PHONE.findall(line)):
        kinds.append("phone")
    if any(secret.casefold() in folded for secret in terms.secrets):
        kinds.append("password")
    return kinds


def _lines(lines: list[str]) -> list[str]:
    """The lines to scan: a whole output that is one (pretty-printed) JSON document is
    scanned as one compact line, so that its numbers count as numbers."""
    first = next((line.lstrip() for line in lines if line.strip()), "")
    if len(lines) > 1 and first[:1] in {"{", "["}:
        try:
            document = orjson.loads("\n".join(lines))
        except orjson.JSONDecodeError:
            return lines
        if isinstance(document, dict):
            return [orjson.dumps(document).decode()]
    return lines


def scan(outputs: Iterable[Output], terms: Terms, *, show: bool = False) -> ScanReport:
    """Scan every output marked for scanning; the others are listed as excluded.
    ``show`` prints each hit's line to stderr (debugging only: it is personal data)."""
    hits: list[Hit] = []
    lines = count = 0
    excluded: list[str] = []
    for output in outputs:
        if not output.scan:
            excluded.append(output.label)
            continue
        count += 1
        for number, line in enumerate(_lines(output.lines), start=1):
            lines += 1
            found: list[str] = []
            for kind in scan_line(line, terms, found):
                hits.append(Hit(output.label, number, kind))
                if show:
                    print(
                        f"hit [{kind}] {output.label}:{number}: {found} in {line[:300]}",
                        file=sys.stderr,
                    )
    return ScanReport(lines=lines, outputs=count, excluded=excluded, hits=hits)

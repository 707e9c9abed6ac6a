"""Deterministic, length-safe names and labels for the children of every kind (FineTuneJob, ModelServer).

Any valid object name (a DNS-1123 subdomain of up to 253 characters, dots allowed, may start with a
digit) maps to child names that are valid DNS-1035 labels (≤ 63 characters, start with a letter),
so the same name works for Jobs, Deployments and Services. Names that already fit are kept readable;
others are sanitised, truncated and disambiguated by a hash of the full original name.

Collision-safe: the two forms cannot meet. A hashed name always carries `--` right before its hash
(its sanitised prefix has no `--`), and a plain name is used only when it has no `--`, so no job name's
plain child name can equal another's hashed one (a 63-character plain name used to equal the hashed
name of a 64-character one). Plain names are injective (the stage is the last dash-free segment); hashed
names differ unless 64 bits of SHA-256 of the full names collide.
"""

from __future__ import annotations

import hashlib
import re

MAX_LABEL = 63
HASH_LEN = 8  # label_safe: kept, the instance label is part of immutable Deployment selectors
CHILD_HASH_LEN = 16
HASH_MARKER = "--"  # only hashed child names contain it

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def is_dns1035_label(value: str) -> bool:
    # fullmatch: with match, '$' also admits a final newline
    return len(value) <= MAX_LABEL and bool(_DNS1035.fullmatch(value))


def is_label_value(value: str) -> bool:
    return len(value) <= MAX_LABEL and bool(_LABEL_VALUE.fullmatch(value))


def short_hash(value: str, length: int = HASH_LEN) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def _sanitise(value: str, lead: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", value.lower())
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"{lead}-{cleaned}" if cleaned else lead
    return cleaned


def child_name(owner: str, component: str, *, lead: str = "j", max_len: int = MAX_LABEL) -> str:
    """The name of `owner`'s child `component` (a Stage, or a ModelServer's `pool`): `<owner>-<component>`
    when that is a valid label of at most `max_len` characters without `--`, else
    `<prefix>--<hash>-<component>`.

    The hashed form uses the full original name, so two names that sanitise or truncate alike still get
    different children; its `--` marker keeps it apart from every plain name (see the module docstring).
    `lead` is the letter put before a sanitised name that does not start with one ("j" for FineTuneJobs,
    "m" for ModelServers: kept per kind, so no existing child is renamed). `max_len` below 63 leaves room
    for what is appended to the name (an Indexed Job's pod hostname adds `-<index>`).
    """
    plain = f"{owner}-{component}"
    if len(plain) <= max_len and is_dns1035_label(plain) and HASH_MARKER not in plain:
        return plain
    suffix = f"{HASH_MARKER}{short_hash(owner, CHILD_HASH_LEN)}-{component}"
    if max_len - len(suffix) < 1:  # a label starts with a letter: room for at least that one
        raise ValueError(f"a child name of at most {max_len} characters has no room for {suffix!r}")
    prefix = _sanitise(owner, lead)[: max_len - len(suffix)].rstrip("-")
    return f"{prefix}{suffix}"


def label_safe(value: str) -> str:
    """A label value identifying `value`: itself when valid, else a truncated form plus a hash."""
    if is_label_value(value):
        return value
    suffix = f"-{short_hash(value)}"
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[: MAX_LABEL - len(suffix)]
    prefix = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", prefix)
    return f"{prefix}{suffix}" if prefix else suffix.lstrip("-")

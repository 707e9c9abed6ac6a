"""What a credential looks like in text: the patterns the trainer scrubs from its logs and termination
messages, and the operator from the pod messages (kubelet's, a container's log tail) it copies into status."""

from __future__ import annotations

import re

SECRET_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer|aws4-hmac-sha256)?\s*)[^\s\"',]+"),
    re.compile(r"(?i)(x-amz-(?:signature|security-token|credential)=)[^&\s\"']+"),  # presigned URLs
    re.compile(
        r"(?i)((?:api[_-]?key|secret[_-]?access[_-]?key|session[_-]?token|password)[\"']?\s*[:=]\s*[\"']?)"
        r"[^\s\"',]+"
    ),
    re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/\s:@\"']+:)[^/\s@\"']+(?=@)"),  # user:password@ in URLs
)
REDACTED = "***"


def redact_patterns(text: str) -> str:
    """`text` with every credential-shaped value replaced by ***."""
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text

"""Authentication as kube-apiserver does it, for the emulator: bearer tokens (ServiceAccount tokens issued
by TokenRequest, static user tokens, the admin token) and impersonation headers (`kubectl --as/--as-group`).

Who a request is:
- `Authorization: Bearer <token>`: the token's user; an unknown, expired or revoked token (its ServiceAccount
  or bound pod deleted) → 401 Unauthorized, as kube-apiserver answers.
- no credentials: the cluster admin (`system:admin`, group `system:masters`), like kube-apiserver's former
  insecure loopback port, so the embedded cluster's own controllers, kubelet and admin kubeconfig keep full
  access; `ApiServer(token=...)` turns that off (every request must then carry a known token).
- `Impersonate-User` / `Impersonate-Group` / `Impersonate-Uid` / `Impersonate-Extra-*`: the caller must be
  allowed the `impersonate` verb on users / groups / serviceaccounts / uids / userextras (RBAC); the request
  then runs as the impersonated user, with `system:authenticated` added (and the ServiceAccount groups for
  `system:serviceaccount:<ns>:<name>`).
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS = "system:anonymous"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
MASTERS = "system:masters"
SA_PREFIX = "system:serviceaccount:"
SA_GROUPS = "system:serviceaccounts"


@dataclass(frozen=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_admin(self) -> bool:
        return MASTERS in self.groups

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra}
        return out


ADMIN = UserInfo("system:admin", (MASTERS, AUTHENTICATED))


def service_account_user(namespace: str, name: str, uid: str = "") -> UserInfo:
    return UserInfo(
        f"{SA_PREFIX}{namespace}:{name}", (SA_GROUPS, f"{SA_GROUPS}:{namespace}", AUTHENTICATED), uid
    )


def parse_service_account(username: str) -> tuple[str, str] | None:
    """`system:serviceaccount:<ns>:<name>` → (ns, name)."""
    if not username.startswith(SA_PREFIX):
        return None
    rest = username[len(SA_PREFIX) :].split(":")
    if len(rest) != 2 or not all(rest):
        return None
    return rest[0], rest[1]


def user_with_defaults(
    name: str, groups: list[str] | tuple[str, ...], uid: str = "", extra: Any = ()
) -> UserInfo:
    """A user as the authenticators present it: ServiceAccounts get their groups, everyone authenticated."""
    all_groups = list(groups)
    sa = parse_service_account(name)
    if sa is not None:
        for group in (SA_GROUPS, f"{SA_GROUPS}:{sa[0]}"):
            if group not in all_groups:
                all_groups.append(group)
    if name != ANONYMOUS and AUTHENTICATED not in all_groups:
        all_groups.append(AUTHENTICATED)
    return UserInfo(name, tuple(all_groups), uid, tuple(extra))


@dataclass
class IssuedToken:
    user: UserInfo
    expires: float | None = None  # epoch seconds
    service_account: tuple[str, str, str] | None = None  # namespace, name, uid
    bound: tuple[str, str, str, str] | None = None  # kind, namespace, name, uid
    audiences: list[str] = field(default_factory=list)


class TokenAuthenticator:
    """Bearer tokens → users. ServiceAccount tokens are checked against the store on every use, so deleting
    the ServiceAccount (or the pod a token is bound to) revokes them, as kube-apiserver's lookup does."""

    def __init__(self) -> None:
        self.tokens: dict[str, IssuedToken] = {}

    def add_static(self, token: str, user: UserInfo) -> None:
        self.tokens[token] = IssuedToken(user)

    def issue(
        self,
        namespace: str,
        name: str,
        uid: str,
        expiration_seconds: int,
        bound: tuple[str, str, str, str] | None = None,
        audiences: list[str] | None = None,
    ) -> tuple[str, str]:
        """A new ServiceAccount token; returns (token, expirationTimestamp)."""
        token = "lc." + secrets.token_urlsafe(32)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expiration_seconds)
        self.tokens[token] = IssuedToken(
            service_account_user(namespace, name, uid),
            expires.timestamp(),
            (namespace, name, uid),
            bound,
            list(audiences or []),
        )
        return token, expires.strftime("%Y-%m-%dT%H:%M:%SZ")

    def expire(self, token: str) -> None:
        """Test-only hook (no kube-apiserver counterpart): move a token's expiry into the past, so tests of
        clients that must refuse an expired token (tests/api) need not wait the 10-minute minimum lifetime.
        Run it on the emulator's loop (`LocalCluster.call`)."""
        record = self.tokens[token]
        record.expires = dt.datetime.now(dt.UTC).timestamp() - 1

    def lookup(self, token: str, alive: Any) -> IssuedToken | None:
        """The token's record if valid; `alive(kind, namespace, name, uid)` tells whether an object exists."""
        record = self.tokens.get(token)
        if record is None:
            return None
        if record.expires is not None and record.expires < dt.datetime.now(dt.UTC).timestamp():
            return None
        if record.service_account is not None:
            ns, name, uid = record.service_account
            if not alive("ServiceAccount", ns, name, uid):
                return None
        if record.bound is not None and not alive(*record.bound):
            return None
        return record

"""OpenID Connect single sign-on: the authorization-code flow with PKCE
against the site's identity provider, and what a successful login does here
(find, link or create the user; sync roles and groups; start a session).

The flow's secrets stay on the server: the browser carries only ``state`` (in
a short-lived HttpOnly cookie and in the URL); the nonce and the PKCE
verifier wait in ``oidc_login_states`` and are deleted when the callback uses
them, so a state works once, on whichever replica the callback reaches.

The identity provider's discovery document and signing keys are cached in
process memory: a login while the provider's key endpoint blips still
validates with the keys seen before, and an ID token signed with a key not
seen yet makes one refetch of the key set.

Every failure is an :class:`OidcError`: a message for the person signing in,
a reason label, and a line for the administrator's log (never a token, a
code or a secret).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.sdk.tls import client_ssl_context
from stockade.server.audit import service as audit
from stockade.server.audit.service import AuditRecord
from stockade.server.auth.ratelimit import SlidingWindow
from stockade.server.auth.service import AuthService
from stockade.server.authz import Role
from stockade.server.db import Database, User
from stockade.server.db.models import OidcLoginState, UserLink, utcnow
from stockade.server.errors import StockadeError
from stockade.server.observability import get_logger
from stockade.server.settings import Settings
from stockade.server.users.service import RESERVED_USERNAMES

if TYPE_CHECKING:
    from joserfc.jwk import KeySet

log = get_logger("stockade.oidc")

LOGIN_TYPE = "oidc"
CALLBACK_PATH = "/api/v2/users/oidc/callback"
LOGIN_PATH = "/api/v2/users/oidc/login"
# How long a started sign-in may take at the identity provider.
STATE_LIFETIME = timedelta(minutes=10)
# The discovery document is refreshed this often (a stale one serves while
# the identity provider cannot be reached).
DISCOVERY_TTL = 3600.0
# Clock skew allowed between Stockade and the identity provider.
LEEWAY_SECONDS = 60
HTTP_TIMEOUT = 10.0
# Asymmetric algorithms only: an ID token signed with the client secret (HS*)
# or unsigned ("none") is refused.
ALLOWED_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
# The longest text of the identity provider's that a page shows.
_SHOWN = 300

GroupSync = Callable[[str, list[str]], Awaitable[Any]]


class OidcError(Exception):
    """A single sign-on that did not work: ``message`` for the person (shown
    on the page), ``reason`` a label, ``detail`` for the administrator's log."""

    def __init__(self, status: int, message: str, reason: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.detail = detail or message


def _unreachable(what: str, exc: Exception) -> OidcError:
    return OidcError(
        502,
        "Stockade could not reach the identity provider to finish signing you in. Try again "
        "in a minute; if it keeps failing, tell your administrator.",
        "idp_unreachable",
        f"{what}: {type(exc).__name__}: {exc}",
    )


@dataclass
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    algorithms: list[str]
    token_auth_method: str


@dataclass
class SsoResult:
    """A finished single sign-on: the new session and where to go."""

    token: str
    expires_at: datetime
    user_id: str
    username: str
    redirect: str


@dataclass
class _Cache:
    discovery: Discovery | None = None
    discovery_at: float = 0.0
    keys: KeySet | None = None


@dataclass
class _Identity:
    """What the identity provider says about the person."""

    subject: str
    email: str
    email_verified: bool
    username: str
    name: str
    claims: dict[str, Any] = field(default_factory=dict)


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def local_redirect(target: str) -> bool:
    """Whether ``target`` is a path on this site (no scheme, host, or
    protocol-relative ``//``), the only kind of place a login may lead to."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return False
    if any(ord(c) < 0x20 or c == "\x7f" for c in target):
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc


def sanitize_username(raw: str) -> str:
    """A username following Stockade's rules (1-32 lowercase letters, digits
    and hyphens, starting and ending with a letter or digit) made from what
    the identity provider calls the person: accents dropped, anything else
    becomes a hyphen ("" when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    name = name[:32].strip("-")
    if not name:
        return ""
    if name in RESERVED_USERNAMES:
        name = f"{name}-user"
    return name


def _as_list(value: Any) -> list[str]:
    """A claim holding names: a list of strings, or one string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str | int) and str(v)]
    return []


def _truthy(value: Any) -> bool:
    # Some providers send email_verified as the string "true".
    return value is True or (isinstance(value, str) and value.lower() == "true")


class OidcService:
    """Single sign-on with the configured OpenID Connect provider."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        auth: AuthService,
        *,
        audit_key: bytes,
        group_sync: GroupSync | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.auth = auth
        self.audit_key = audit_key
        self.group_sync = group_sync
        self.redirect_uri = settings.access_url + CALLBACK_PATH
        self.starts = SlidingWindow(settings.login_rate_per_ip, 60)
        self._cache = _Cache()
        self._ssl: ssl.SSLContext | None = None
        self._http: httpx.AsyncClient | None = None
        secret = settings.oidc_client_secret
        self._secret = secret.get_secret_value() if secret is not None else ""
        if self.enabled:
            # Loaded now rather than by the first login, on the event loop.
            from stockade.server.oidc import libs  # noqa: F401

    @property
    def enabled(self) -> bool:
        return self.settings.oidc_enabled

    def auth_methods(self) -> types.AuthMethods:
        return types.AuthMethods(
            password=types.PasswordAuthMethod(enabled=True),
            oidc=types.OidcAuthMethod(
                enabled=self.enabled,
                sign_in_text=self.settings.oidc_sign_in_text if self.enabled else "",
                login_url=LOGIN_PATH if self.enabled else "",
            ),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- talking to the identity provider ----------------------------------

    def _verify(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = client_ssl_context(self.settings.oidc_ca_file or "")
        return self._ssl

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=HTTP_TIMEOUT, trust_env=False, verify=self._verify()
            )
        return self._http

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            response = await self._client().get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            raise _unreachable(f"{what} {url}", exc) from exc
        if response.status_code != 200:
            raise OidcError(
                502,
                "The identity provider is not answering as expected, so you cannot sign in "
                "with it right now. Try again later or tell your administrator.",
                "idp_bad_response",
                f"{what} {url} answered HTTP {response.status_code}",
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise OidcError(
                502,
                "The identity provider sent something Stockade cannot read. Tell your "
                "administrator.",
                "idp_bad_response",
                f"{what} {url} did not answer with a JSON object",
            )
        return body

    async def discovery(self) -> Discovery:
        """The provider's endpoints, from ``ISSUER/.well-known/openid-configuration``
        (cached; a stale copy serves while the provider cannot be reached)."""
        cache = self._cache
        if cache.discovery and time.monotonic() - cache.discovery_at < DISCOVERY_TTL:
            return cache.discovery
        url = self.settings.oidc_issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = await self._get_json(url, "discovery")
        except OidcError:
            if cache.discovery is not None:
                log.warning("oidc_discovery_stale", url=url)
                return cache.discovery
            raise
        cache.discovery = self._parse_discovery(doc, url)
        cache.discovery_at = time.monotonic()
        return cache.discovery

    def _parse_discovery(self, doc: dict[str, Any], url: str) -> Discovery:
        def misconfigured(detail: str) -> OidcError:
            return OidcError(
                502,
                "Single sign-on is not set up correctly on this Stockade server. Tell your "
                "administrator.",
                "idp_misconfigured",
                f"discovery {url}: {detail}",
            )

        missing = [
            key
            for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
            if not isinstance(doc.get(key), str) or not doc[key]
        ]
        if missing:
            raise misconfigured(f"the document lacks {', '.join(missing)}")
        issuer = doc["issuer"]
        if issuer.rstrip("/") != self.settings.oidc_issuer_url.rstrip("/"):
            raise misconfigured(
                f"it names the issuer {issuer!r}, not the configured "
                f"{self.settings.oidc_issuer_url!r} (set oidc_issuer_url to the issuer exactly)"
            )
        offered = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in ALLOWED_ALGORITHMS if a in offered]
        if not algorithms:
            raise misconfigured(f"it signs ID tokens only with {offered}, none of which is allowed")
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if not self._secret:
            method = "none"
        elif "client_secret_basic" in methods:
            method = "client_secret_basic"
        elif "client_secret_post" in methods:
            method = "client_secret_post"
        else:
            raise misconfigured(f"its token endpoint takes only {methods}")
        userinfo = doc.get("userinfo_endpoint")
        return Discovery(
            issuer=issuer,
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            jwks_uri=doc["jwks_uri"],
            userinfo_endpoint=userinfo if isinstance(userinfo, str) and userinfo else None,
            algorithms=algorithms,
            token_auth_method=method,
        )

    async def _fetch_keys(self, disc: Discovery) -> KeySet:
        from stockade.server.oidc import libs

        doc = await self._get_json(disc.jwks_uri, "jwks")
        try:
            keys = libs.KeySet.import_key_set(doc)  # type: ignore[arg-type]
        except (libs.JoseError, ValueError, KeyError, TypeError) as exc:
            raise OidcError(
                502,
                "The identity provider's signing keys cannot be read. Tell your administrator.",
                "idp_bad_response",
                f"jwks {disc.jwks_uri}: {exc}",
            ) from exc
        self._cache.keys = keys
        return keys

    async def _keys(self, disc: Discovery, *, refresh: bool) -> KeySet:
        cached = self._cache.keys
        if cached is not None and not refresh:
            return cached
        try:
            return await self._fetch_keys(disc)
        except OidcError as exc:
            if cached is None:
                raise
            # A blip at the key endpoint: the keys seen before still serve.
            log.warning("oidc_jwks_stale", url=disc.jwks_uri, error=exc.detail)
            return cached

    async def _validate_id_token(
        self, disc: Discovery, id_token: str, nonce: str
    ) -> dict[str, Any]:
        from stockade.server.oidc import libs

        def refused(reason: str, detail: str, message: str | None = None) -> OidcError:
            return OidcError(
                401,
                message
                or "The identity provider's answer could not be trusted, so you were not signed "
                "in. Try again; if it keeps failing, tell your administrator.",
                reason,
                detail,
            )

        keys = await self._keys(disc, refresh=False)
        try:
            try:
                token = libs.jwt.decode(id_token, keys, algorithms=disc.algorithms)
            except libs.InvalidKeyIdError:
                # Perhaps the provider rotated its keys: one refetch.
                keys = await self._keys(disc, refresh=True)
                token = libs.jwt.decode(id_token, keys, algorithms=disc.algorithms)
        except libs.InvalidKeyIdError as exc:
            raise refused(
                "id_token_unknown_key",
                f"the ID token is signed with a key the provider does not publish at "
                f"{disc.jwks_uri} ({exc})",
            ) from exc
        except libs.BadSignatureError as exc:
            raise refused("id_token_bad_signature", "the ID token's signature is invalid") from exc
        except libs.JoseError as exc:
            raise refused("id_token_invalid", f"the ID token cannot be read: {exc}") from exc
        claims: dict[str, Any] = token.claims
        registry = libs.jwt.JWTClaimsRegistry(
            leeway=LEEWAY_SECONDS,
            iss={"essential": True, "value": disc.issuer},
            sub={"essential": True},
            aud={"essential": True, "value": self.settings.oidc_client_id},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except libs.ExpiredTokenError as exc:
            raise refused(
                "id_token_expired",
                f"the ID token expired at {claims.get('exp')} (now {int(time.time())}, "
                f"leeway {LEEWAY_SECONDS} s): check both clocks",
                "The identity provider's answer had already expired, so you were not signed "
                "in. Try again; if it keeps happening, tell your administrator (the clocks may "
                "disagree).",
            ) from exc
        except (libs.InvalidClaimError, libs.MissingClaimError) as exc:
            claim = getattr(exc, "claim", "") or str(exc)
            detail = {
                "aud": f"the ID token's audience is {claims.get('aud')!r}, not this client "
                f"({self.settings.oidc_client_id!r})",
                "iss": f"the ID token's issuer is {claims.get('iss')!r}, not {disc.issuer!r}",
                "nonce": "the ID token's nonce does not match this sign-in's",
            }.get(claim, f"the ID token's claims are invalid: {exc}")
            raise refused(f"id_token_{claim}" if claim in ("aud", "iss", "nonce") else
                          "id_token_claims", detail) from exc  # fmt: skip
        except libs.JoseError as exc:
            raise refused("id_token_claims", f"the ID token's claims are invalid: {exc}") from exc
        aud = claims.get("aud")
        if (
            isinstance(aud, list)
            and len(aud) > 1
            and claims.get("azp") != self.settings.oidc_client_id
        ):
            raise refused(
                "id_token_aud",
                f"the ID token has several audiences {aud!r} and its azp is not this client",
            )
        return claims

    # --- the flow -----------------------------------------------------------

    async def begin(self, redirect: str | None, *, ip: str) -> tuple[str, str]:
        """Start a sign-in: the identity provider's authorization URL to send
        the browser to, and the state the browser must bring back."""
        if not self.enabled:
            raise OidcError(
                404,
                "Single sign-on is not set up on this Stockade server. Sign in with your "
                "username and password.",
                "oidc_disabled",
            )
        wait = self.starts.retry_after(ip)
        if wait:
            raise OidcError(
                429,
                f"Too many sign-ins from your address; try again in {wait} s.",
                "rate_limited_ip",
            )
        self.starts.hit(ip)
        target = redirect or "/workspaces"
        if len(target) > 2048 or not local_redirect(target):
            raise OidcError(
                400,
                "The address to return to after signing in must be a page of this site "
                "(a path such as /workspaces).",
                "bad_redirect",
                f"redirect {target[:100]!r} is not a local path",
            )
        disc = await self.discovery()
        from stockade.server.oidc import libs

        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = libs.generate_token(64)
        now = utcnow()
        async with self.db.transaction() as session:
            # Abandoned sign-ins go as new ones start.
            await session.execute(delete(OidcLoginState).where(OidcLoginState.expires_at < now))
            session.add(
                OidcLoginState(
                    state_hash=state_hash(state),
                    nonce=nonce,
                    code_verifier=verifier,
                    redirect=target,
                    created_at=now,
                    expires_at=now + STATE_LIFETIME,
                )
            )
        client = libs.OAuth2Client(
            None,
            client_id=self.settings.oidc_client_id,
            scope=" ".join(self.settings.oidc_scope_list),
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
        )
        url, _ = client.create_authorization_url(
            disc.authorization_endpoint, state=state, code_verifier=verifier, nonce=nonce
        )
        return str(url), state

    async def finish(
        self, params: dict[str, str], *, browser_state: str | None, record: AuditRecord
    ) -> SsoResult:
        """Finish a sign-in at the callback: check the state, exchange the
        code, validate the ID token, then find, link or create the user and
        start a session. Failures are audited and logged, then raised."""
        try:
            return await self._finish(params, browser_state, record)
        except OidcError as exc:
            self.log_failure(exc, record)
            if exc.reason != "oidc_disabled":
                await self._audit_failure(record, exc)
            raise

    @staticmethod
    def log_failure(exc: OidcError, record: AuditRecord) -> None:
        """The administrator's line about a failed sign-in: why, in words."""
        log.warning(
            "oidc_login_failed",
            reason=exc.reason,
            status=exc.status,
            detail=exc.detail,
            ip=record.ip,
            user=record.username,
        )

    async def _finish(
        self, params: dict[str, str], browser_state: str | None, record: AuditRecord
    ) -> SsoResult:
        if not self.enabled:
            raise OidcError(
                404, "Single sign-on is not set up on this Stockade server.", "oidc_disabled"
            )
        ip = record.ip or "unknown"
        wait = self.auth.ip_attempts.retry_after(ip)
        if wait:
            raise OidcError(
                429,
                f"Too many sign-ins from your address; try again in {wait} s.",
                "rate_limited_ip",
            )
        self.auth.ip_attempts.hit(ip)
        error = params.get("error")
        if error:
            description = (params.get("error_description") or "")[:_SHOWN]
            said = f"{error[:64]}{': ' + description if description else ''}"
            # Anything it may have started here is over.
            if params.get("state"):
                await self._take_state(params["state"])
            raise OidcError(
                403 if error == "access_denied" else 400,
                f"The identity provider did not sign you in ({said}). Try again, or ask your "
                "administrator if it keeps happening.",
                "idp_error",
                f"the identity provider returned error={error[:64]!r} {description!r}",
            )
        state, code = params.get("state", ""), params.get("code", "")
        if not state or not code:
            raise OidcError(
                400,
                "This sign-in address is incomplete (it lacks the state or code the identity "
                "provider adds). Start again from the sign-in page.",
                "missing_state_or_code",
            )
        if not browser_state:
            raise OidcError(
                400,
                "This sign-in was not started in this browser, or it took longer than "
                f"{int(STATE_LIFETIME.total_seconds() // 60)} minutes. Start again from the "
                "sign-in page.",
                "state_cookie_missing",
            )
        if not hmac.compare_digest(browser_state.encode(), state.encode()):
            raise OidcError(
                400,
                "This sign-in does not belong to the one your browser started (another tab "
                "may have started a newer one). Start again from the sign-in page.",
                "state_mismatch",
            )
        pending = await self._take_state(state)
        if pending is None:
            raise OidcError(
                400,
                "This sign-in was already used or has expired. Start again from the sign-in page.",
                "state_used_or_unknown",
            )
        if pending.expires_at <= utcnow():
            raise OidcError(
                400,
                f"This sign-in took longer than {int(STATE_LIFETIME.total_seconds() // 60)} "
                "minutes. Start again from the sign-in page.",
                "state_expired",
            )
        disc = await self.discovery()
        iss = params.get("iss")
        if iss is not None and iss != disc.issuer:
            raise OidcError(
                400,
                "This sign-in came back from another identity provider than the one Stockade "
                "uses. Start again from the sign-in page.",
                "issuer_mismatch",
                f"the authorization response's iss is {iss[:200]!r}, not {disc.issuer!r}",
            )
        try:
            claims = await self._exchange(disc, code, pending)
        except OidcError:
            raise
        except Exception as exc:
            # Whatever else the libraries raise on an odd answer is still the
            # provider's answer, not a Stockade fault: a page, not a 500. (No
            # traceback in the log: it could carry what the provider sent.)
            raise OidcError(
                502,
                "The identity provider's answer could not be used, so you were not signed in. "
                "Try again; if it keeps failing, tell your administrator.",
                "idp_bad_response",
                f"exchanging the code failed: {type(exc).__name__}: {exc}",
            ) from exc
        identity = self._identity(claims)
        record.details["subject"] = identity.subject
        self._check_domain(identity)
        user, changes = await self._user_for(disc.issuer, identity, record)
        record.user_id, record.username = user.id, user.username
        if self.group_sync is not None and self.settings.oidc_group_field:
            await self._sync_groups(user, claims)
        token, expires_at = await self._start_session(user, record, changes)
        return SsoResult(token, expires_at, user.id, user.username, pending.redirect)

    async def _take_state(self, state: str) -> OidcLoginState | None:
        """Delete a pending sign-in and return it (None when there was none):
        the delete is what makes it work once."""
        async with self.db.transaction() as session:
            row = (
                await session.execute(
                    delete(OidcLoginState)
                    .where(OidcLoginState.state_hash == state_hash(state))
                    .returning(
                        OidcLoginState.nonce,
                        OidcLoginState.code_verifier,
                        OidcLoginState.redirect,
                        OidcLoginState.expires_at,
                    )
                )
            ).one_or_none()
        if row is None:
            return None
        return OidcLoginState(
            nonce=row.nonce,
            code_verifier=row.code_verifier,
            redirect=row.redirect,
            expires_at=row.expires_at,
        )

    async def _exchange(
        self, disc: Discovery, code: str, pending: OidcLoginState
    ) -> dict[str, Any]:
        """Code for tokens (authlib), the ID token validated (joserfc), and
        userinfo merged under it (the signed ID token wins)."""
        from stockade.server.oidc import libs

        async with libs.AsyncOAuth2Client(
            client_id=self.settings.oidc_client_id,
            client_secret=self._secret or None,
            token_endpoint_auth_method=disc.token_auth_method,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
            trust_env=False,
            verify=self._verify(),
        ) as client:
            try:
                tokens = await client.fetch_token(
                    disc.token_endpoint, code=code, code_verifier=pending.code_verifier
                )
            except libs.TransportError as exc:
                raise _unreachable(f"token endpoint {disc.token_endpoint}", exc) from exc
            except libs.OAuthError as exc:
                description = (exc.description or "")[:_SHOWN]
                raise OidcError(
                    401 if exc.error in ("invalid_client", "unauthorized_client") else 400,
                    "The identity provider refused to complete this sign-in (the sign-in code "
                    "was not accepted; it works once and expires quickly). Start again from "
                    "the sign-in page.",
                    "code_refused",
                    f"token endpoint refused the code: {exc.error} {description!r}"
                    + (
                        " (check oidc_client_id and oidc_client_secret)"
                        if exc.error == "invalid_client"
                        else ""
                    ),
                ) from exc
            except (libs.HTTPStatusError, ValueError) as exc:
                raise OidcError(
                    502,
                    "The identity provider is not answering as expected, so you cannot sign "
                    "in with it right now. Try again later or tell your administrator.",
                    "idp_bad_response",
                    f"token endpoint {disc.token_endpoint}: {exc}",
                ) from exc
            id_token = tokens.get("id_token")
            if not isinstance(id_token, str) or not id_token:
                raise OidcError(
                    502,
                    "The identity provider did not say who you are (no ID token). Tell your "
                    "administrator.",
                    "no_id_token",
                    "the token response has no id_token (is the openid scope granted?)",
                )
            claims = await self._validate_id_token(disc, id_token, pending.nonce)
            access_token = tokens.get("access_token")
            if disc.userinfo_endpoint and isinstance(access_token, str) and access_token:
                userinfo = await self._userinfo(client, disc.userinfo_endpoint, access_token)
                if userinfo.get("sub") != claims["sub"]:
                    raise OidcError(
                        401,
                        "The identity provider's answers about you disagree, so you were not "
                        "signed in. Tell your administrator.",
                        "userinfo_subject_mismatch",
                        "userinfo's sub differs from the ID token's",
                    )
                claims = {**userinfo, **claims}
        return claims

    async def _userinfo(self, client: Any, url: str, access_token: str) -> dict[str, Any]:
        # The token is sent by hand: authlib's own would first check the access
        # token's expiry against its 60 s leeway and refuse a short-lived one.
        headers = {"accept": "application/json", "authorization": f"Bearer {access_token}"}
        from stockade.server.oidc import libs

        try:
            response = await client.request("GET", url, headers=headers, withhold_token=True)
        except libs.TransportError as exc:
            raise _unreachable(f"userinfo {url}", exc) from exc
        body: Any = None
        if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
            try:
                body = response.json()
            except ValueError:
                body = None
        if not isinstance(body, dict):
            raise OidcError(
                502,
                "The identity provider did not tell Stockade who you are (its userinfo "
                "answer was unusable). Tell your administrator.",
                "userinfo_failed",
                f"userinfo {url} answered HTTP {response.status_code} "
                f"({response.headers.get('content-type', 'no content type')})",
            )
        return body

    def _identity(self, claims: dict[str, Any]) -> _Identity:
        s = self.settings
        email = claims.get(s.oidc_email_field)
        if not isinstance(email, str) or not re.fullmatch(types.EMAIL_PATTERN, email):
            raise OidcError(
                400,
                "The identity provider did not send your email address, which Stockade needs. "
                "Ask your administrator to release it to Stockade.",
                "missing_email",
                f"the claims have no usable {s.oidc_email_field!r} (got "
                f"{type(email).__name__}); check oidc_email_field and the scopes ({s.oidc_scopes})",
            )
        if len(email) > 254:
            raise OidcError(400, "Your email address is too long for Stockade.", "email_too_long")
        verified = s.oidc_ignore_email_verified or _truthy(claims.get("email_verified"))
        raw_name = claims.get(s.oidc_username_field)
        username = raw_name if isinstance(raw_name, str) and raw_name.strip() else ""
        username = username or email.partition("@")[0]
        name = claims.get("name")
        return _Identity(
            subject=str(claims["sub"]),
            email=email.lower(),
            email_verified=verified,
            username=username,
            name=name[:128] if isinstance(name, str) else "",
            claims=claims,
        )

    def _check_domain(self, identity: _Identity) -> None:
        domains = self.settings.oidc_domain_list
        domain = identity.email.rpartition("@")[2]
        if domains and domain not in domains:
            raise OidcError(
                403,
                f"Your email domain ({domain}) may not sign in to this Stockade server. Ask "
                "your administrator.",
                "email_domain_refused",
                f"{identity.email} is not in oidc_email_domains ({', '.join(domains)})",
            )

    async def _user_for(
        self, issuer: str, identity: _Identity, record: AuditRecord
    ) -> tuple[User, list[dict[str, Any]]]:
        """The user this identity signs in as (found by its link, linked by
        verified email, or created), with its link's claims updated and its
        roles synced; and the audit entries those changes make."""
        for attempt in (1, 2):
            try:
                async with self.db.transaction() as session:
                    return await self._user_in(session, issuer, identity)
            except IntegrityError as exc:
                # Two first logins at once: the second finds the first's user.
                if attempt == 2:
                    raise OidcError(
                        409,
                        "Your account changed while you were signing in. Try again.",
                        "conflict",
                        f"integrity error: {exc.orig}",
                    ) from exc
        raise AssertionError("unreachable")

    async def _user_in(
        self, session: AsyncSession, issuer: str, identity: _Identity
    ) -> tuple[User, list[dict[str, Any]]]:
        changes: list[dict[str, Any]] = []
        now = utcnow()
        claims = json.loads(json.dumps(identity.claims, default=str))
        link = (
            await session.execute(
                select(UserLink).where(
                    UserLink.issuer == issuer, UserLink.subject == identity.subject
                )
            )
        ).scalar_one_or_none()
        user: User | None
        if link is not None:
            user = await session.get(User, link.user_id)
            assert user is not None  # the link's foreign key cascades
            link.claims, link.updated_at = claims, now
        else:
            user = (
                await session.execute(select(User).where(User.email == identity.email))
            ).scalar_one_or_none()
            if user is not None:
                await self._link_existing(session, user, issuer, identity, claims, changes)
            else:
                user = await self._create(session, identity, changes)
            session.add(
                UserLink(
                    user_id=user.id,
                    login_type=LOGIN_TYPE,
                    issuer=issuer,
                    subject=identity.subject,
                    claims=claims,
                    created_at=now,
                    updated_at=now,
                )
            )
        if user.status != "active":
            raise OidcError(
                403,
                "Your Stockade account is suspended. Ask an administrator.",
                "suspended",
                f"{user.username} is suspended",
            )
        if self.settings.oidc_user_role_field:
            await self._sync_roles(session, user, identity.claims, changes)
        await session.flush()
        return user, changes

    async def _link_existing(
        self,
        session: AsyncSession,
        user: User,
        issuer: str,
        identity: _Identity,
        claims: dict[str, Any],
        changes: list[dict[str, Any]],
    ) -> None:
        if not identity.email_verified:
            raise OidcError(
                409,
                f"A Stockade account with the email {identity.email} exists, but the identity "
                "provider does not say that this email is verified, so it was not linked to "
                "you. Verify your email at the identity provider, or ask an administrator.",
                "email_not_verified",
                f"{user.username} has the email {identity.email}, which the provider did not "
                "mark verified (set oidc_ignore_email_verified if it never does)",
            )
        other = (
            await session.execute(
                select(UserLink.subject).where(
                    UserLink.user_id == user.id, UserLink.login_type == LOGIN_TYPE
                )
            )
        ).scalar_one_or_none()
        if other is not None:
            raise OidcError(
                409,
                f"The Stockade account with the email {identity.email} is already linked to "
                "another identity at the identity provider. Ask an administrator.",
                "linked_to_another_subject",
                f"{user.username} is linked to subject {other!r}, not {identity.subject!r}",
            )
        if user.login_type != LOGIN_TYPE:
            changes.append(
                {
                    "action": "user.login_type",
                    "diff": {"login_type": [user.login_type, LOGIN_TYPE]},
                    "details": {
                        "issuer": issuer,
                        "subject": identity.subject,
                        "linked_by": "email",
                    },
                }
            )
            user.login_type = LOGIN_TYPE
            user.updated_at = utcnow()

    async def _create(
        self, session: AsyncSession, identity: _Identity, changes: list[dict[str, Any]]
    ) -> User:
        if not self.settings.oidc_allow_signups:
            raise OidcError(
                403,
                f"There is no Stockade account for {identity.email}, and accounts are not "
                "created at sign-in here. Ask an administrator to create yours.",
                "signups_disabled",
                f"no user with the email {identity.email} (subject {identity.subject!r}) and "
                "oidc_allow_signups is off",
            )
        base = (
            sanitize_username(identity.username)
            or sanitize_username(identity.email.partition("@")[0])
            or "user"
        )
        username = await self._free_username(session, base)
        user = User(
            username=username,
            email=identity.email,
            name=identity.name,
            hashed_password=None,
            login_type=LOGIN_TYPE,
            roles=[],
        )
        session.add(user)
        await session.flush()
        changes.append(
            {
                "action": "user.create",
                "diff": {
                    "username": [None, username],
                    "email": [None, identity.email],
                    "name": [None, identity.name],
                    "login_type": [None, LOGIN_TYPE],
                },
                "details": {"via": "oidc", "subject": identity.subject},
            }
        )
        return user

    @staticmethod
    async def _free_username(session: AsyncSession, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... whichever is free."""
        stem = base[:26].rstrip("-") or "user"  # room for "-9999"
        taken = set(
            (
                await session.execute(
                    select(User.username).where(
                        (User.username == base)
                        | User.username.startswith(stem + "-", autoescape=True)
                    )
                )
            ).scalars()
        )
        if base not in taken:
            return base
        for n in range(2, 10_000):
            candidate = f"{stem}-{n}"
            if candidate not in taken:
                return candidate
        return f"{stem[:19]}-{secrets.token_hex(6)}"

    async def _sync_roles(
        self,
        session: AsyncSession,
        user: User,
        claims: dict[str, Any],
        changes: list[dict[str, Any]],
    ) -> None:
        """Site roles follow the provider's: the roles the mapping names are
        set from the claim; roles it does not name stay as they are."""
        field_name = self.settings.oidc_user_role_field
        mapping = self.settings.oidc_role_map
        managed = {role for roles in mapping.values() for role in roles}
        if field_name not in claims:
            log.info("oidc_role_claim_missing", claim=field_name, user=user.username)
        wanted: set[str] = set()
        for value in _as_list(claims.get(field_name)):
            wanted.update(mapping.get(value, []))
        old = set(user.roles)
        new = (old - managed) | wanted
        kept_owner = False
        if Role.OWNER.value in old - new:
            # JSON containment is written differently on the two databases;
            # owners are few, so they are picked out here.
            owners = [
                roles
                for roles in (
                    await session.execute(
                        select(User.roles)
                        .where(User.id != user.id, User.status == "active")
                        .with_for_update()
                    )
                ).scalars()
                if Role.OWNER.value in roles
            ]
            if not owners:
                new.add(Role.OWNER.value)
                kept_owner = True
                log.warning(
                    "oidc_role_sync_kept_last_owner",
                    user=user.username,
                    detail="the identity provider's roles would remove the last active owner",
                )
        if new == old:
            return
        changes.append(
            {
                "action": "user.roles",
                "diff": {"roles": [sorted(old), sorted(new)]},
                "details": {"via": "oidc", "claim": field_name, "kept_last_owner": kept_owner},
            }
        )
        user.roles = sorted(new)
        user.updated_at = utcnow()

    async def _sync_groups(self, user: User, claims: dict[str, Any]) -> None:
        assert self.group_sync is not None
        field_name = self.settings.oidc_group_field
        if field_name not in claims:
            log.info("oidc_group_claim_missing", claim=field_name, user=user.username)
        groups = _as_list(claims.get(field_name))
        try:
            await self.group_sync(user.id, groups)
        except StockadeError as exc:
            raise OidcError(
                exc.status_code,
                f"Your groups from the identity provider could not be applied: {exc.message}",
                "group_sync_failed",
                f"group sync for {user.username}: {exc.log_message}",
            ) from exc
        except Exception as exc:
            # Fail closed: signing in with stale groups could keep access the
            # identity provider has taken away.
            log.exception("oidc_group_sync_error", user=user.username)
            raise OidcError(
                503,
                "Your groups from the identity provider could not be applied, so you were not "
                "signed in. Try again; if it keeps failing, tell your administrator.",
                "group_sync_failed",
                f"group sync for {user.username}: {type(exc).__name__}: {exc}",
            ) from exc

    async def _start_session(
        self, user: User, record: AuditRecord, changes: list[dict[str, Any]]
    ) -> tuple[str, datetime]:
        """A session exactly as a password login makes one, with the audit
        entries of the login and what it changed, in one transaction."""
        async with self.db.transaction() as session:
            token, expires_at = await self.auth.new_session(session, user_id=user.id, ip=record.ip)
            common: dict[str, Any] = {
                "key": self.audit_key,
                "user_id": user.id,
                "username": user.username,
                "ip": record.ip,
                "user_agent": record.user_agent,
                "request_id": record.request_id,
                "resource_type": "user",
                "resource_id": user.id,
                "resource_name": user.username,
            }
            for change in changes:
                await audit.append(session, status_code=303, **common, **change)
            await audit.append(
                session,
                action="user.login",
                status_code=303,
                details={**record.details, "method": LOGIN_TYPE, "result": "success"},
                **common,
            )
        return token, expires_at

    async def _audit_failure(self, record: AuditRecord, exc: OidcError) -> None:
        record.describe(
            "user.login",
            "user",
            record.user_id,
            record.username,
            method=LOGIN_TYPE,
            result="failure",
            reason=exc.reason,
        )
        try:
            await audit.write_record(self.db, record, exc.status, key=self.audit_key)
        except Exception:
            log.exception("audit_write_failed", action="user.login")

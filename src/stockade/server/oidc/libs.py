"""The OAuth 2 and JOSE libraries single sign-on uses, imported on first use
(``from stockade.server.oidc import libs`` inside the functions that need
them): a server without single sign-on never loads them, which keeps ~0.1 s
off every start."""

from __future__ import annotations

import warnings

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

with warnings.catch_warnings():
    # Authlib 1.9 prefers the httpx2 fork and warns once, at import, that it
    # falls back to httpx (which Stockade already uses); the client works the
    # same. Its deprecate module installs an "always" filter for its warnings
    # when imported, so that comes first and the "ignore" goes in front of it.
    import authlib.deprecate  # noqa: F401

    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.common.security import generate_token
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client
    from authlib.integrations.httpx_client._compat import httpx2 as oauth_http
    from authlib.oauth2.client import OAuth2Client

# The HTTP library authlib's client raises from: httpx2 where that fork is
# installed (the openai and anthropic SDKs bring it), else httpx. Its
# exceptions are not httpx's, so the token and userinfo calls catch these.
TransportError: type[Exception] = oauth_http.TransportError
HTTPStatusError: type[Exception] = oauth_http.HTTPStatusError

__all__ = [
    "AsyncOAuth2Client",
    "BadSignatureError",
    "ExpiredTokenError",
    "HTTPStatusError",
    "InvalidClaimError",
    "InvalidKeyIdError",
    "JoseError",
    "KeySet",
    "MissingClaimError",
    "OAuth2Client",
    "OAuthError",
    "TransportError",
    "generate_token",
    "jwt",
]

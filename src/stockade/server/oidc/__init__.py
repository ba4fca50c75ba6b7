"""OpenID Connect single sign-on."""

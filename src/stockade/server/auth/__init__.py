"""Identity: passwords, sessions, API tokens, login rate limits."""

"""Users: first-user setup, accounts, roles, status."""

"""Organizations, their members and groups, and template access."""

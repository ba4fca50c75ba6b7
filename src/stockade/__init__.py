"""Stockade: self-hosted, fully offline remote developer workspaces."""

__version__ = "0.1.0"

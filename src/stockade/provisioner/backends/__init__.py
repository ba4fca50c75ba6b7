"""Workspace backends behind one contract (``base.Backend``)."""

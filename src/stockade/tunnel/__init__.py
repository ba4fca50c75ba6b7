"""Byte streams between clients and workspace agents, relayed by the control
plane over WebSockets. :mod:`stockade.tunnel.protocol` is the wire contract
that the server, the agent (Python 3.9+, inside workspaces) and the CLI share.
"""

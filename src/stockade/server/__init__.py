"""The control plane: the ASGI app, its domains and the process that serves it."""

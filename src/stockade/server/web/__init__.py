"""The web dashboard: server-rendered pages over the same services as the API.

Jinja2 templates in ``templates/``, our own CSS and scripts plus vendored
libraries (``VENDORED.md``) in ``static/``; nothing is fetched from another
host and no page has an inline script (every response carries the CSP that
``stockade.server.middleware`` sets). One module per area: ``account``
(sign-in, setup, account), ``workspaces``, ``terminal``, ``templates_pages``,
``admin``.
"""

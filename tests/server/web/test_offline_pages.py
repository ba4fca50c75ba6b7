"""No page and no asset the dashboard serves references another host.

The crawl starts at the dashboard's home as the owner (after making a
template and a workspace, so that their pages exist too), follows every
same-site link, script, style sheet and image, and reads every page and
asset for absolute URLs. The runtime half of the promise, that the browser
never sends a request elsewhere, is held by the ``chromium`` fixture, which
aborts and reports any such request in every browser test."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urldefrag, urljoin, urlsplit

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.server.web.core import STATIC_DIR
from tests.conftest import unique
from tests.server.web.conftest import WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"

# Absolute or scheme-relative URLs, in markup, CSS or script text.
_URL = re.compile(r"""(?:https?:)?//[A-Za-z0-9][A-Za-z0-9.-]*(?::\d+)?[^\s"'<>)]*""")
# Identifiers that look like URLs but are never fetched: XML namespaces, which
# scripts pass to createElementNS.
NAMESPACES = {
    "http://www.w3.org/2000/svg",
    "http://www.w3.org/1999/xhtml",
    "http://www.w3.org/1999/xlink",
    "http://www.w3.org/XML/1998/namespace",
}
# Documentation links inside vendored libraries' error messages: text shown to
# a developer, never requested. Each is named with the file that has it.
VENDORED_TEXT = {
    (
        "/static/vendor/xterm-6.0.0/xterm.js",
        "https://developer.mozilla.org/en-US/docs/Web/Security/Secure_Contexts",
    ),
}
# Pages that change state on GET would be a bug of their own; these are the
# only links the crawl must not follow because following them signs out.
SKIP = {"/logout"}


class _Markup(HTMLParser):
    """A page's links to follow, and every attribute value: the places where
    markup makes a browser fetch (src, href, action, srcset, hx-get...). Text
    is not checked: help texts may show example addresses, which a browser
    never requests."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if not value:
                continue
            self.attributes.append(value)
            if name in ("href", "src", "action", "hx-get", "data-src"):
                self.links.append(value)


def _foreign(text: str, host: str) -> list[str]:
    found = []
    for match in _URL.finditer(text):
        url = match.group(0).rstrip(".,;")
        target = urlsplit(url if url.startswith("http") else "http:" + url).netloc
        if target and target != host and url not in NAMESPACES:
            found.append(url)
    return found


def test_no_page_or_asset_references_another_host(
    web: WebClient, server: ServerProcess, owner: Client
) -> None:
    from tests.server.test_templates import simple_archive

    template = unique("tpl")
    owner.push_template(template, simple_archive(template))
    host = urlsplit(server.url).netloc
    # Every file the server serves as static, whether or not a page the
    # crawl reaches links it (the terminal's only load on a running
    # workspace's terminal page); licence texts are notices no page loads.
    queue = ["/"] + [
        "/static/" + path.relative_to(STATIC_DIR).as_posix()
        for path in sorted(STATIC_DIR.rglob("*"))
        if path.is_file() and path.name != "LICENSE"
    ]
    seen: set[str] = set()
    per_path: dict[str, int] = {}
    offences: list[str] = []
    pages = assets = 0
    while queue:
        path = queue.pop()
        bare = path.split("?", 1)[0]
        # Paging and filters make endless variants of a page; a few will do.
        if path in seen or bare in SKIP or per_path.get(bare, 0) >= 3:
            continue
        seen.add(path)
        per_path[bare] = per_path.get(bare, 0) + 1
        response = web.get(path, follow_redirects=True)
        assert response.status_code < 500, f"{path}: {response.status_code}"
        kind = response.headers.get("content-type", "")
        text = response.text if ("text" in kind or "javascript" in kind or "svg" in kind) else ""
        if "text/html" in kind:
            pages += 1
            assert response.headers["content-security-policy"].startswith("default-src 'self'")
            assert "<script>" not in text and " style=" not in text, f"{path}: inline script/style"
            assert not re.search(r"<[^>]*\son[a-z]+=", text), f"{path}: an inline event handler"
            parser = _Markup()
            parser.feed(text)
            offences += [f"{path}: {url}" for url in _foreign(" ".join(parser.attributes), host)]
            for link in parser.links:
                absolute = urldefrag(urljoin(server.url + path, link)).url
                parts = urlsplit(absolute)
                if parts.netloc == host and not parts.path.startswith(("/api/", "/@")):
                    queue.append(parts.path + (f"?{parts.query}" if parts.query else ""))
        else:
            assets += 1
            if "css" in kind:
                # Comments in a style sheet (credits in vendored ones) fetch nothing.
                text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
            for url in _foreign(text, host):
                if (path, url) not in VENDORED_TEXT:
                    offences.append(f"{path}: {url}")
    assert not offences, offences
    # The crawl reached the areas of the dashboard and their assets.
    assert pages >= 8 and assets >= 10, (pages, assets, sorted(seen))
    # Organizations (from the navigation) and a template's page with its Access list.
    assert {"/admin/orgs", "/admin/orgs/default", f"/templates/{template}"} <= seen, sorted(seen)

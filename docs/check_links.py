"""Check every internal link of the built documentation site, offline.

Usage: ``python docs/check_links.py SITE`` (``make docs`` runs it on ``site/``). Reads every
``.html`` page under SITE and checks each ``href`` / ``src`` (and ``srcset``) that stays inside the
site: the file it points to exists, and its ``#fragment``, if any, is an ``id`` (or an ``<a name>``)
in the target page. External links (``http:``, ``https:``, ``mailto:`` ...) are listed, never
fetched. Exits 1 with the list of broken links, page by page.

Standard library only, so CI needs nothing beyond what builds the site.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

# attributes that hold a URL (srcset holds several)
_URL_ATTRIBUTES = {"href", "src", "srcset"}


class _Page(HTMLParser):
    """The ids a page defines and the URLs it links to, with their line numbers."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[int, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        line = self.getpos()[0]
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (name == "name" and tag == "a"):
                self.ids.add(value)
            elif name == "srcset":
                # "a.png 1x, b.png 2x": the URL is each candidate's first word
                self.links += [(line, c.split()[0]) for c in value.split(",") if c.strip()]
            elif name in _URL_ATTRIBUTES:
                self.links.append((line, value))

    handle_startendtag = handle_starttag


def _read(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check_site(site: Path) -> tuple[list[str], dict[str, set[str]], int]:
    """Return the broken internal links (as "page:line: link (why)"), external URL -> pages,
    and how many internal links were checked."""
    site = site.resolve()
    pages = {p.relative_to(site).as_posix(): _read(p) for p in sorted(site.rglob("*.html"))}
    broken: list[str] = []
    external: dict[str, set[str]] = defaultdict(set)
    checked = 0
    for name, page in pages.items():
        for line, link in page.links:
            where = f"{name}:{line}: {link}"
            parts = urlsplit(link.strip())
            if parts.scheme or parts.netloc:  # http:, mailto:, data:, //host ...
                if parts.scheme not in ("data", "javascript"):
                    external[link].add(name)
                continue
            checked += 1
            path, fragment = unquote(parts.path), unquote(parts.fragment)
            if not path:  # "#anchor" or "?query": this page
                target = name
            else:
                base = (
                    PurePosixPath("/") if path.startswith("/") else PurePosixPath("/", name).parent
                )
                target = _normalise(base / path.lstrip("/"))
                if target is None:
                    broken.append(f"{where} (points outside the site)")
                    continue
                if path.endswith("/") or (site / target).is_dir():
                    target = f"{target}/index.html".lstrip("/")
                if not (site / target).is_file():
                    broken.append(f"{where} (no file {target})")
                    continue
            if fragment and target in pages and fragment not in pages[target].ids:
                broken.append(f"{where} (no id {fragment!r} in {target})")
    return broken, external, checked


def _normalise(path: PurePosixPath) -> str | None:
    """Resolve ``..`` and ``.`` in an absolute site path; None when it climbs above the root."""
    parts: list[str] = []
    for part in path.parts[1:]:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print(
            "usage: python docs/check_links.py SITE_FOLDER (a built mkdocs site)", file=sys.stderr
        )
        return 2
    site = Path(args[0])
    broken, external, checked = check_site(site)
    pages = len(list(site.rglob("*.html")))
    print(f"external links (listed, not fetched): {len(external)}")
    for url in sorted(external):
        print(f"  {url}  ({len(external[url])} page(s))")
    if broken:
        print(f"{len(broken)} broken internal link(s) in {site}:", file=sys.stderr)
        for entry in broken:
            print(f"  {entry}", file=sys.stderr)
        return 1
    print(f"internal links OK: {checked} links and anchors in {pages} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""URLs fit for an error line or a log: a password, in the user part or the query, is ***."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit


def redact(url: str) -> str:
    """``url`` as given when it holds no password: rebuilding it would lose the empty host
    of ``sqlite:////abs/path`` (``sqlite://abs/path`` opens nothing when pasted back)."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name == "password" for name, _ in pairs):
        query = urlencode([(n, "***" if n == "password" else v) for n, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()

"""The URLs a run is given (the endpoint's, a shared limit's store): checked at the edge, and
never shown with a password."""

from __future__ import annotations

from urllib.parse import urlsplit

from pipeline.errors import SettingsError

DEFAULT_BASE_URL = "https://api.lumenfall.ai/openai/v1"


def check_base_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # an IPv6 host without its closing bracket
        raise SettingsError(f"base URL {redacted(url)!r} cannot be read as a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            f"base URL {redacted(url)!r} is not an http(s) URL; pass one like --base-url {DEFAULT_BASE_URL}"
        )
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number from 0 to 65535
    except ValueError:
        raise SettingsError(
            f"base URL {redacted(url)!r} has a port that is not a number from 1 to 65535"
        ) from None
    return url.rstrip("/")


def check_store_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise SettingsError(
            f"shared limit {redacted(url)!r} is not a redis:// URL; pass one like "
            "--shared-limit redis://127.0.0.1:6379/0"
        )
    return url


def redacted(url: str) -> str:
    """A URL fit to print: its password (and a user's token) replaced. Any URL, even one
    that is not valid (a port that is no number): it is printed to say what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the URL given"  # not even split: say nothing of it
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***@" if colon else "***@"
    return parts._replace(netloc=shown + host).geturl()


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")

"""The target: the service root the endpoint path is appended to, checked and spelt one way."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import httpx

from .errors import UsageError


def check_base_url(url: str, *, allow_insecure_http: bool) -> str:
    """The service root, refusing plain http to anything but loopback unless allowed.
    Until it is known to hold no user name or password, no message quotes it."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise UsageError(f"--base-url is not a URL: {exc}") from None
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "--base-url must not contain a user name or password",
            hint="set HISTIMPORT_USERNAME and HISTIMPORT_PASSWORD instead",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--base-url {url!r} is not an http(s) URL",
            hint="e.g. https://api.example.com/communications",
        )
    if any(c < " " or c == "\x7f" for c in url):
        raise UsageError(f"--base-url {url!r} holds a control character")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise UsageError(f"--base-url {url!r}: {exc}") from exc
    try:
        # As the requests will spell it (IDNA), and with no empty label ("api..example.com").
        httpx.URL(url).raw_host.decode("ascii").encode("idna")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise UsageError(f"--base-url {url!r}: {parts.hostname!r} is not a host name") from exc
    if parts.query or parts.fragment:
        raise UsageError(f"--base-url {url!r} must not have a query or fragment")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise UsageError(
            f"--base-url {url!r} would send credentials and messages unencrypted",
            hint="use https://, or pass --allow-insecure-http if you really mean it",
        )
    # One spelling per target, so that the ledger knows it again (case, default port, slash).
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    default_port = {"http": 80, "https": 443}[parts.scheme]
    if port is not None and port != default_port:
        host += f":{port}"
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

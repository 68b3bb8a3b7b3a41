"""Which hosts are this machine: calls to them need no credentials and go through no proxy.

Example::

    is_loopback("http://127.0.0.1:7777/")    # True
"""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(url: str) -> bool:
    return urlsplit(url).hostname in LOOPBACK_HOSTS

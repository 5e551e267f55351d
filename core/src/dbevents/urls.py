"""Connection URLs with a raw password in them.

Passwords are often pasted into URLs as they are. Drivers disagree on what that
means: libpq ends the user part at the first "@" and connects to the rest as a
host, PyMySQL and pymongo at the last; a "/", "?" or "#" ends the host part for
all of them, so the password's tail becomes a port, a path or a query. The
launcher makes the URL mean one thing before any driver sees it.
"""

from __future__ import annotations

from dbevents.errors import ConfigError

_ENDS_HOSTS = "/?#"
_HOW = ("write the user name and password percent-encoded (%40 for @, %2F for /, "
        "%3F for ?, %23 for #, %3A for : in a user name, %25 for %)")


def normalize_userinfo(url: str, path: str) -> str:
    """``url`` with every "@" inside its user name and password percent-encoded.

    The user part runs to the last "@" before the first "/", "?" or "#", which is
    the only reading that leaves a host after it. A URL whose user part must
    contain one of those three characters cannot be read either way: ConfigError
    at ``path``, naming what to encode and never quoting the password.
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cut = min((i for i in (rest.find(c) for c in _ENDS_HOSTS) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = authority.rpartition("@")
    if "@" in tail and _bad_port(hosts):
        # "user:pa/ss@host" reads as host "user", port "pa"; "u:a@b/c@host" as
        # host "b"... with a non-numeric port. Either way the password held one of
        # / ? # and its tail was taken for the rest of the URL.
        raise ConfigError(f"the user name or password holds an unescaped '/', '?' or '#', "
                          f"so the URL cannot be read; {_HOW}", path=path)
    if not at or "@" not in userinfo:
        return url
    return f"{scheme}://{userinfo.replace('@', '%40')}@{hosts}{tail}"


def _bad_port(hosts: str) -> bool:
    """Whether a host list (h, h:1, h1:1,h2:2, [::1]:5432) has a port that is not
    a number."""
    for host in hosts.split(","):
        if host.startswith("["):
            host = host.partition("]")[2]
        _, colon, port = host.rpartition(":")
        if colon and port and not port.isdigit():
            return True
    return False

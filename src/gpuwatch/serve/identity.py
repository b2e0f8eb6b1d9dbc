"""Who is asking: a basic-auth user of the web config, or the user a trusted reverse proxy
names in its header; mapped to a Unix user name (--users.map); an admin or not.

With basic-auth users in the web config every request but /-/healthy must carry a valid
password (401 with a Basic challenge otherwise, as exporter-toolkit answers). The proxy
header (--web.auth-header) counts only on connections from --web.trusted-proxies; from any
other address it is ignored, so nobody can name themselves. When both are configured the
proxy's header, from a trusted proxy that passed basic auth, names the person. Neither: no one
is known, and the service is read-only.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuwatch.exporter.auth import BasicAuth
from gpuwatch.exporter.web import Request, peer_allowed
from gpuwatch.exporter.webconfig import WebConfig
from gpuwatch.serve.options import Network
from gpuwatch.yamlfile import YamlFileError, load_mapping

USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
"""A name a person may have: a Unix user name, or a login of the proxy (an e-mail address)."""


class UsersMapError(YamlFileError):
    """A --users.map file that cannot be used."""


def load_users_map(path: Path | None) -> dict[str, str]:
    """login -> Unix user name from a YAML mapping; UsersMapError naming the file."""
    if path is None:
        return {}
    data = load_mapping(path, UsersMapError)
    users: dict[str, str] = {}
    for login, unix in data.items():
        if not isinstance(login, str) or not USER_NAME.fullmatch(login):
            raise UsersMapError(f"{path}: {login!r} is not a login name (letters, digits, "
                                "._@-); write login: unixname, one a line")
        if not isinstance(unix, str) or not USER_NAME.fullmatch(unix):
            raise UsersMapError(f"{path}: {login}: {unix!r} is not a Unix user name; write "
                                f"{login}: unixname")
        users[login] = unix
    return users


@dataclass(frozen=True)
class Identity:
    """The person asking, or nobody (user None)."""

    user: str | None
    """The Unix user name; None: not known (read-only)."""
    admin: bool = False
    via: str = ""
    """How it is known: "basic auth", "proxy header", or "" (nobody)."""
    client: str = ""
    """The address the request came from (the proxy's, through a proxy)."""

    @property
    def known(self) -> bool:
        return self.user is not None

    def may_act_for(self, owner: str) -> bool:
        return self.user is not None and (self.admin or self.user == owner)


NOBODY = Identity(None)


@dataclass(frozen=True)
class Refused:
    """No identity: the answer is 401 (missing or wrong password) or 403 (certificate)."""

    status: int
    message: str


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def plain_address(text: str) -> str:
    """An address as people write it: "::ffff:10.1.2.3" (a dual-stack socket's) is 10.1.2.3."""
    address = _address(text)
    return str(address) if address is not None else text


class Identifier:
    """Tells who asks; blocks for a bcrypt check when the web config has users. Thread-safe."""

    def __init__(self, admins: frozenset[str] = frozenset(), auth_header: str | None = None,
                 trusted_proxies: tuple[Network, ...] = (),
                 users_map: Mapping[str, str] | None = None) -> None:
        self.admins = admins
        self.auth_header = auth_header.lower() if auth_header else None
        self.trusted_proxies = trusted_proxies
        self.users_map = dict(users_map or {})
        self._auth = BasicAuth({})
        self._auth_users: Mapping[str, bytes] | None = None
        self._lock = threading.Lock()

    def identify(self, request: Request, config: WebConfig) -> Identity | Refused:
        if config.client_allowed_sans and \
                not peer_allowed(request.peercert, config.client_allowed_sans):
            return Refused(403, "the client certificate names none of client_allowed_sans")
        login: str | None = None
        via = ""
        if config.basic_auth_users:
            login = self._authenticator(config).user(request.headers.get("authorization"),
                                                     client=request.client)
            if login is None:
                return Refused(401, "a user name and password of the web config are needed")
            via = "basic auth"
        client = plain_address(request.client)
        if self.auth_header and self.trusted(request.client):
            named = request.headers.get(self.auth_header, "").strip()
            if named:
                if not USER_NAME.fullmatch(named):
                    return Refused(401, f"the {self.auth_header} header does not hold a user "
                                   "name")
                login, via = named, "proxy header"
                forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
                if forwarded:
                    client = f"{plain_address(forwarded[:64])} via {client}"
        if login is None:
            return Identity(None, client=client)
        user = self.users_map.get(login, login)
        return Identity(user, admin=user in self.admins, via=via, client=client)

    def trusted(self, client: str) -> bool:
        """Whether the address is one of --web.trusted-proxies (an IPv4 address mapped into
        IPv6, as a dual-stack socket reports it, counts as the IPv4 one)."""
        address = _address(client)
        return address is not None and any(
            address.version == n.version and address in n for n in self.trusted_proxies)

    def _authenticator(self, config: WebConfig) -> BasicAuth:
        with self._lock:
            if self._auth_users is not config.basic_auth_users:
                # one BasicAuth for the process: its rate limits survive a reload
                self._auth.set_users(config.basic_auth_users)
                self._auth_users = config.basic_auth_users
        return self._auth

"""Who a client asks an HTTP service as, and how its URL is shown: the one lookup of
credentials for the two clients, of Prometheus (gpuwatch.fleet.prometheus, for every command
that reads the fleet and for `gpuwatch serve`) and of `gpuwatch serve` (gpuwatch.cli.client).

The first of these that gives a user or a token wins (the most specific first; curl, too,
prefers a URL's credentials to its netrc file):

1. the URL's own ``http://user:password@host:port``; a URL user without a password takes the
   password of that login's netrc entry for the host;
2. the environment: a user and a password variable (a user without a password takes the
   password of their netrc entry for the host), or a bearer token variable where the client
   has one (Prometheus); a token together with a user or password is an error;
3. the netrc file curl reads (``$NETRC``, else ``~/.netrc``): the entry ``machine HOST`` of
   the service's host name, else its ``default``.

A secret is never part of a message: URLs are shown by `shown()` (``http://user@host:9090``)
and a netrc file that cannot be parsed is named, never quoted (the parser's message may quote
a password). Every failure is a CredentialsError, one line naming the file or the variable.
"""

from __future__ import annotations

import base64
import netrc
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_NETRC = "NETRC"


class CredentialsError(ValueError):
    """The credentials cannot be worked out; one line naming the file or the variables."""


@dataclass(frozen=True)
class Variables:
    """The environment variables of one client: a user and a password, and a bearer token
    (None: the client has no token variable)."""

    user: str
    password: str
    token: str | None = None

    def advice(self) -> str:
        """How to give credentials, in a few words."""
        token = f" (or {self.token})" if self.token else ""
        return f"set {self.user} and {self.password}{token}"


@dataclass(frozen=True)
class Auth:
    """Credentials to send: basic auth (`user` and `secret`) or a bearer token (`user` None,
    `secret` the token); `origin` says where they came from, for messages."""

    user: str | None
    secret: str = field(repr=False)
    origin: str

    @property
    def header(self) -> str:
        """The Authorization header's value."""
        if self.user is None:
            return f"Bearer {self.secret}"
        return "Basic " + base64.b64encode(f"{self.user}:{self.secret}".encode()).decode()

    def describe(self) -> str:
        """Who, and from where: "alice (from /home/alice/.netrc)"; never the secret."""
        who = "the bearer token" if self.user is None else self.user
        return f"{who} (from {self.origin})"


def netrc_path(environ: Mapping[str, str]) -> Path:
    """The netrc file curl reads: $NETRC, else ~/.netrc."""
    given = environ.get(ENV_NETRC)
    if given:
        return Path(given)
    return Path(environ.get("HOME") or Path.home()) / ".netrc"


def from_netrc(host: str, environ: Mapping[str, str],
               variables: Variables) -> tuple[str, str] | None:
    """(login, password) of the netrc entry for `host` (or its `default`); None when there is
    no file or no entry. A file that cannot be read is a CredentialsError naming it."""
    path = netrc_path(environ)
    if not path.is_file():
        return None
    try:
        # an explicit file: no "access too permissive" check, as curl makes none
        found = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as e:
        raise CredentialsError(
            f"{path}: line {e.lineno}: not a netrc file curl can read (lines like: machine "
            f"HOST login NAME password SECRET); fix it, or {variables.advice()}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not text"
        raise CredentialsError(f"{path}: cannot read: {reason}") from None
    if found is None:
        return None
    login, _, password = found
    return login, password or ""


def lookup(url: str, variables: Variables, environ: Mapping[str, str]) -> Auth | None:
    """The credentials for `url` (see the module's docstring for the order); None: none, or
    a URL that is none (its client says so)."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    host = parsed.hostname or ""

    def netrc_auth(login: str, missing: str) -> Auth:
        """The login with its password from netrc; CredentialsError(missing) without one."""
        entry = from_netrc(host, environ, variables) if host else None
        if entry is None or entry[0] != login:
            raise CredentialsError(missing)
        return Auth(login, entry[1], str(netrc_path(environ)))

    if parsed.username is not None:
        login = urllib.parse.unquote(parsed.username)
        if parsed.password is not None:
            return Auth(login, urllib.parse.unquote(parsed.password), "the URL")
        return netrc_auth(
            login, f"{shown(url)} names the user {login} but no password: add a netrc entry "
            f"(machine {host} login {login} password ...) to {netrc_path(environ)}, or "
            f"{variables.advice()} and leave the user out of the URL")
    user = environ.get(variables.user) or None
    password = environ.get(variables.password)
    token = (environ.get(variables.token) or None) if variables.token else None
    if token is not None and (user is not None or password is not None):
        raise CredentialsError(f"{variables.token} and {variables.user}/{variables.password} "
                               "are both set: give a bearer token or a user and password, "
                               "not both")
    if token is not None:
        return Auth(None, token, str(variables.token))
    if user is not None and password is not None:
        return Auth(user, password, variables.user)
    if user is not None:
        return netrc_auth(
            user, f"{variables.user} is set but no password: set {variables.password}, or a "
            f"netrc entry (machine {host} login {user} password ...) in {netrc_path(environ)}")
    if password is not None:
        raise CredentialsError(f"{variables.password} is set but no user: set "
                               f"{variables.user} too")
    entry = from_netrc(host, environ, variables) if host else None
    if entry is not None:
        return Auth(entry[0], entry[1], str(netrc_path(environ)))
    return None


def shown(url: str) -> str:
    """`url` as every message shows it: without its password (``http://user@host:9090``),
    also when it is no URL at all."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # an IPv6 address without its ]: the netloc is not known
        return _USERINFO.sub(r"\1@", url)
    userinfo, at, host = parsed.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urllib.parse.urlunsplit(parsed._replace(
        netloc=f"{userinfo.partition(':')[0]}@{host}"))


_USERINFO = re.compile(r"([^/:@]*):[^/]*@")


def without_userinfo(url: str) -> str:
    """`url` without ``user:password@``: what requests are sent to."""
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))

"""Who is asking, without a server: the proxy header from trusted addresses only (IPv4 mapped
into IPv6 included), the users map, admins, and the address the audit log records."""

from __future__ import annotations

from gpuwatch.exporter.web import Request
from gpuwatch.exporter.webconfig import WebConfig
from gpuwatch.serve.identity import Identifier, Identity, Refused
from gpuwatch.serve.options import parse_networks

HEADER = "x-forwarded-user"


def ask(identifier: Identifier, client: str, **headers: str) -> Identity | Refused:
    return identifier.identify(Request("POST", "/api/v1/claims", headers, client), WebConfig())


def proxy(networks: str = "127.0.0.1,10.0.0.0/8,fd00::/8") -> Identifier:
    return Identifier(frozenset({"root"}), "X-Forwarded-User", parse_networks(networks),
                      {"alice@lab.example": "alice"})


def test_the_header_counts_from_a_trusted_address_in_any_spelling() -> None:
    for client in ("127.0.0.1", "::ffff:127.0.0.1", "10.9.8.7", "::ffff:10.9.8.7", "fd00::1"):
        got = ask(proxy(), client, **{HEADER: "bob"})
        assert got == Identity("bob", via="proxy header", client=client.removeprefix("::ffff:"))


def test_the_header_counts_for_nothing_from_elsewhere() -> None:
    for client in ("127.0.0.2", "::ffff:127.0.0.2", "11.0.0.1", "::1", "fe80::1%eth0", "",
                   "garbage"):
        got = ask(proxy(), client, **{HEADER: "root"})
        assert isinstance(got, Identity) and got.user is None and not got.admin


def test_the_map_turns_a_login_into_the_unix_name_and_admins_are_unix_names() -> None:
    got = ask(proxy(), "127.0.0.1", **{HEADER: "alice@lab.example"})
    assert isinstance(got, Identity) and got.user == "alice" and not got.admin
    got = ask(proxy(), "127.0.0.1", **{HEADER: "root"})
    assert isinstance(got, Identity) and got.admin and got.may_act_for("alice")
    assert not Identity("bob").may_act_for("alice") and Identity("bob").may_act_for("bob")
    assert not Identity(None).may_act_for("")


def test_the_forwarded_address_goes_into_the_record() -> None:
    got = ask(proxy(), "::ffff:127.0.0.1",
              **{HEADER: "bob", "x-forwarded-for": "::ffff:10.1.2.3, 10.0.0.9"})
    assert isinstance(got, Identity) and got.client == "10.1.2.3 via 127.0.0.1"


def test_a_header_that_is_no_name_is_refused() -> None:
    for value in ("alice bob", "alice\tx", "a" * 100, "-alice", "al/ice"):
        assert isinstance(ask(proxy(), "127.0.0.1", **{HEADER: value}), Refused)
    assert ask(proxy(), "127.0.0.1", **{HEADER: "  "}) == Identity(None, client="127.0.0.1")

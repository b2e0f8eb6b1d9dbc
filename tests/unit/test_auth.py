"""Basic auth at a bounded cost: what a client can make the node spend on bcrypt.

Costs are counted in bcrypt checks (bcrypt.checkpw calls), never timed.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import bcrypt
import pytest

from gpuwatch.exporter.auth import OVERALL, PER_CLIENT, BasicAuth, Budget

PASSWORD = b"s3cret-scrape"
HASHED = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4))


def basic(user: str | bytes, password: bytes) -> str:
    user = user.encode() if isinstance(user, str) else user
    return "Basic " + base64.b64encode(user + b":" + password).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The hashes bcrypt.checkpw was called with, in order."""
    seen: list[bytes] = []
    checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        seen.append(hashed)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    yield seen


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def basic_auth(clock: Clock) -> BasicAuth:
    return BasicAuth({"prometheus": HASHED}, clock=clock)


def test_the_right_password_is_checked_once(basic_auth: BasicAuth, checks: list[bytes]) -> None:
    for _ in range(5):
        assert basic_auth.allows(basic("prometheus", PASSWORD), client="10.0.0.1")
    assert checks == [HASHED]


@pytest.mark.parametrize("header", [
    None, "", "Bearer x", "Basic", "Basic !!!!", "Basic " + base64.b64encode(b"nocolon").decode(),
    basic(b"\xff", PASSWORD), basic("prometheus", b"wrong")])
def test_what_is_not_the_password_is_refused(basic_auth: BasicAuth, header: str | None) -> None:
    assert not basic_auth.allows(header)


def test_the_scheme_is_case_insensitive_as_in_go(basic_auth: BasicAuth) -> None:
    assert basic_auth.allows(basic("prometheus", PASSWORD).replace("Basic", "basic"))


@pytest.mark.parametrize("user", ["prometheus", "nobody"])
def test_a_password_over_72_bytes_is_a_plain_no(basic_auth: BasicAuth, checks: list[bytes],
                                                user: str) -> None:
    """bcrypt 5 raises ValueError for it, which was an HTTP 500 with a traceback."""
    assert not basic_auth.allows(basic(user, PASSWORD + b"x" * 72))
    assert checks == []


def test_the_same_wrong_password_200_times_costs_one_check(basic_auth: BasicAuth,
                                                           checks: list[bytes]) -> None:
    for _ in range(200):
        assert not basic_auth.allows(basic("prometheus", b"guess"), client="10.0.0.66")
    assert len(checks) == 1


def test_200_different_wrong_passwords_from_one_client_cost_its_budget(
        basic_auth: BasicAuth, checks: list[bytes], clock: Clock) -> None:
    for i in range(200):
        assert not basic_auth.allows(basic("prometheus", b"guess%d" % i), client="10.0.0.66")
    assert len(checks) == PER_CLIENT.burst
    # the budget refills with time, so a person who mistyped gets in again
    clock.now += 1 / PER_CLIENT.per_second
    assert basic_auth.allows(basic("prometheus", PASSWORD), client="10.0.0.66")
    assert len(checks) == PER_CLIENT.burst + 1


def test_a_flood_from_one_client_leaves_the_others_their_budget(
        basic_auth: BasicAuth, checks: list[bytes]) -> None:
    for i in range(50):
        basic_auth.allows(basic("prometheus", b"guess%d" % i), client="10.0.0.66")
    assert basic_auth.allows(basic("prometheus", PASSWORD), client="10.0.0.2")


def test_credentials_verified_before_a_flood_still_pass_without_a_check(
        basic_auth: BasicAuth, checks: list[bytes]) -> None:
    assert basic_auth.allows(basic("prometheus", PASSWORD), client="10.0.0.66")
    for i in range(50):
        basic_auth.allows(basic("prometheus", b"guess%d" % i), client="10.0.0.66")
    checked = len(checks)
    assert basic_auth.allows(basic("prometheus", PASSWORD), client="10.0.0.66")
    assert len(checks) == checked


def test_many_clients_together_are_bounded_too(basic_auth: BasicAuth,
                                               checks: list[bytes]) -> None:
    for i in range(500):
        basic_auth.allows(basic("prometheus", b"guess%d" % i), client=f"10.0.{i // 250}.{i % 250}")
    assert len(checks) == OVERALL.burst


def test_an_unknown_user_costs_what_a_known_one_costs(clock: Clock, checks: list[bytes]) -> None:
    slow = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=5))
    basic_auth = BasicAuth({"a": slow, "b": slow, "c": HASHED}, clock=clock)
    assert not basic_auth.allows(basic("nobody", PASSWORD), client="10.0.0.66")
    assert len(checks) == 1 and checks[0].startswith(b"$2b$05$")
    # and counts against the same budget, with the same cache
    for _ in range(10):
        assert not basic_auth.allows(basic("nobody", PASSWORD), client="10.0.0.66")
    for i in range(10):
        assert not basic_auth.allows(basic(f"nobody{i}", PASSWORD), client="10.0.0.66")
    assert len(checks) == PER_CLIENT.burst


def test_the_caches_are_bounded(clock: Clock, checks: list[bytes]) -> None:
    basic_auth = BasicAuth({"prometheus": HASHED}, cache_size=4, clock=clock,
                           per_client=Budget(1000, 0), overall=Budget(1000, 0))
    for i in range(6):
        basic_auth.allows(basic("prometheus", b"guess%d" % i))
    basic_auth.allows(basic("prometheus", b"guess5"))
    assert len(checks) == 6
    basic_auth.allows(basic("prometheus", b"guess0"))
    assert len(checks) == 7


def test_new_users_keep_what_was_verified(basic_auth: BasicAuth, checks: list[bytes]) -> None:
    assert basic_auth.allows(basic("prometheus", PASSWORD))
    other = bcrypt.hashpw(b"other", bcrypt.gensalt(rounds=4))
    basic_auth.set_users({"prometheus": HASHED, "grafana": other})
    assert basic_auth.allows(basic("prometheus", PASSWORD))
    assert basic_auth.allows(basic("grafana", b"other"))
    assert len(checks) == 2
    basic_auth.set_users({"grafana": other})
    assert not basic_auth.allows(basic("prometheus", PASSWORD))


def test_concurrent_checks_from_a_thread_pool(clock: Clock, checks: list[bytes]) -> None:
    basic_auth = BasicAuth({"prometheus": HASHED}, clock=clock)
    results: list[bool] = []

    def scrape(i: int) -> None:
        for _ in range(20):
            results.append(basic_auth.allows(basic("prometheus", PASSWORD), client=f"10.0.0.{i}"))
            results.append(not basic_auth.allows(basic("prometheus", b"no"), client=f"10.0.0.{i}"))

    threads = [threading.Thread(target=scrape, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8 * 40 and all(results)
    assert len(checks) <= 16  # each credential once per thread racing for it at most

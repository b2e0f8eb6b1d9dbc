"""Reservations: the file (parsing, validation, atomic locked writes), the commands (reserve,
release, reservations, import of the old comments.json) and several people booking at once.

Times are computed from a fixed `now` where the file's module takes one; the commands run
with the real clock and book far enough ahead that the test's own duration never matters.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import multiprocessing
import os
import random
import re
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from cli_run import one_error, run
from paths import FIXTURES
from prometheus_client import CollectorRegistry, generate_latest

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.contract import metrics
from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.exporter import encoding
from gpuwatch.exporter import main as exporter_main
from gpuwatch.exporter.collectors import reservation as reservation_collector
from gpuwatch.exporter.collectors.reservation import ReservationCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.scrape import Exporter
from gpuwatch.reservations import Reservation, ReservationError, legacy, model

UTC = dt.timezone.utc
NOW = dt.datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")

FIXTURE = FIXTURES / "comments.json"


def cells(*indices: int) -> tuple[Cell, ...]:
    """Whole GPUs as a reservation holds them."""
    return tuple(Cell(i) for i in indices)


def reservation(host: str = "gpu-srv-01", gpus: tuple[int, ...] | None = (0,),
                user: str = "alice", days: float = 3, start_days: float | None = None,
                comment: str = "") -> Reservation:
    return Reservation(host=host, gpus=gpus, user=user, until=NOW + dt.timedelta(days=days),
                       start=NOW + dt.timedelta(days=start_days) if start_days is not None
                       else None, comment=comment)


# -- times, GPUs, targets ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2027-05-31T18:00:00+02:00", dt.datetime(2027, 5, 31, 16, 0, tzinfo=UTC)),
    ("2027-05-31T16:00Z", dt.datetime(2027, 5, 31, 16, 0, tzinfo=UTC)),
    ("+3d", NOW + dt.timedelta(days=3)),
    ("+1d12h", NOW + dt.timedelta(hours=36)),
    ("+2w", NOW + dt.timedelta(weeks=2)),
    ("+90m", NOW + dt.timedelta(minutes=90)),
    ("+45s", NOW + dt.timedelta(seconds=45)),
    ("now", NOW),
])
def test_when_iso_with_zone_or_from_now(text: str, expected: dt.datetime) -> None:
    assert reservations.parse_when(text, NOW) == expected


def test_a_date_is_the_end_of_that_day_and_a_bare_time_local_time_with_its_offset() -> None:
    summer = reservations.parse_when("2027-07-31", NOW, tz=BERLIN)
    assert (summer.isoformat(), summer.utcoffset()) == \
        ("2027-07-31T23:59:59+02:00", dt.timedelta(hours=2))
    winter = reservations.parse_when("2027-01-31", NOW, tz=BERLIN)
    assert winter.utcoffset() == dt.timedelta(hours=1)  # the zone's offset on that date
    assert reservations.parse_when("2027-01-31", NOW, end=False, tz=BERLIN).hour == 0
    local = reservations.parse_when("2027-07-01 09:30", NOW, tz=BERLIN)
    assert local == dt.datetime(2027, 7, 1, 7, 30, tzinfo=UTC)


@pytest.mark.parametrize("text", ["tomorrow", "31.05.2027", "+3 days", "2027-13-01", "+d",
                                  "2027-05-31T25:00Z", "+99999999999d", "+3000000w"])
def test_unknown_time_formats_say_which_are_known(text: str) -> None:
    with pytest.raises(ReservationError) as e:
        reservations.parse_when(text, NOW)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("text", "gpus"), [
    ("all", None), ("ALL", None), ("3", (3,)), ("0,2", (0, 2)), ("0-3", (0, 1, 2, 3)),
    ("0,4-6", (0, 4, 5, 6)), ("2,1,2", (1, 2)), (" 1 - 2 ", (1, 2))])
def test_gpu_lists(text: str, gpus: tuple[int, ...] | None) -> None:
    assert reservations.parse_gpus(text) == (None if gpus is None else cells(*gpus))


@pytest.mark.parametrize(("text", "message"), [
    ("-1", "-1 is negative"), ("0--2", "-2 is negative"), ("3-1", "runs backwards"),
    ("a", "not a list of GPUs"), ("", "not a list of GPUs"),
    ("0,,1", "not a list of GPUs")])
def test_bad_gpu_lists(text: str, message: str) -> None:
    with pytest.raises(ReservationError, match=message):
        reservations.parse_gpus(text)


def test_gpus_written_as_people_write_them() -> None:
    for indices in [(0,), (0, 2), (0, 1, 2, 3), (0, 4, 5, 6), (1, 3, 4)]:
        gpus = cells(*indices)
        assert reservations.parse_gpus(reservations.gpus_text(gpus)) == gpus
    assert reservations.gpus_text(cells(0, 4, 5, 6)) == "0,4-6"
    assert reservations.gpus_text(None) == ALL_GPUS


def test_targets() -> None:
    assert reservations.parse_target("gpu-srv-01:0-1") == ("gpu-srv-01", cells(0, 1))
    assert reservations.parse_target("gpu-srv-01.example.org:all") == \
        ("gpu-srv-01.example.org", None)
    assert reservations.parse_target("[fe80::1]:2") == ("fe80::1", cells(2))
    assert reservations.parse_target("ws-01", gpus_required=False) == ("ws-01", None)
    with pytest.raises(ReservationError, match="name the GPUs too: ws-01:0,1"):
        reservations.parse_target("ws-01")
    with pytest.raises(ReservationError, match="name the host"):
        reservations.parse_target(":0")


# -- the file ----------------------------------------------------------------------------------

def test_bookings_count_from_their_start_until_their_end() -> None:
    b = reservation(days=2, start_days=1)
    assert not b.active(NOW) and not b.expired(NOW)
    assert b.active(NOW + dt.timedelta(days=1))
    assert not b.active(NOW + dt.timedelta(days=2)) and b.expired(NOW + dt.timedelta(days=2))
    assert reservation().active(NOW)


def test_overlaps_need_the_same_gpu_at_the_same_time() -> None:
    assert reservation(gpus=(0, 1)).overlaps(reservation(gpus=(1, 2), user="bob"))
    assert not reservation(gpus=(0, 1)).overlaps(reservation(gpus=(2,), user="bob"))
    assert reservation(gpus=None).overlaps(reservation(gpus=(5,), user="bob"))
    assert not reservation(gpus=None).overlaps(reservation(host="other", gpus=(0,), user="bob"))
    # one after the other
    assert not reservation(days=1).overlaps(reservation(days=3, start_days=1, user="bob"))
    assert reservation(days=1).overlaps(reservation(days=3, start_days=0.5, user="bob"))


def test_the_file_round_trips_and_reads_as_people_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    written = [reservation(gpus=(0, 1), comment="NeurIPS deadline"),
               reservation(host="ws-01", gpus=None, user="bob", days=10, start_days=-1)]
    reservations.write(path, written)
    assert reservations.load(path, NOW) == written
    text = path.read_text()
    assert text.startswith("# GPU reservations.")
    entries = yaml.safe_load(text)["reservations"]
    assert all(re.fullmatch(r"[0-9a-f]{8}", e.pop("id")) for e in entries)  # given on write
    assert entries[0] == {"host": "gpu-srv-01", "gpus": [0, 1], "user": "alice",
                          "until": "2027-01-18T12:00:00+00:00", "comment": "NeurIPS deadline"}
    assert entries[1]["gpus"] == "all" and entries[1]["from"] == "2027-01-14T12:00:00+00:00"
    assert "gpus: [0, 1]" in text
    # by hand: unquoted times (YAML reads them itself), a bare date, indices as text
    path.write_text("reservations:\n"
                    "  - {host: n1, gpus: 3, user: carol, until: 2027-02-01T08:00:00+01:00}\n"
                    "  - {host: n1, gpus: '4-5', user: dave, until: 2027-02-01,\n"
                    "     comment: sweep}\n")
    assert reservations.load(path, NOW, tz=BERLIN) == [
        Reservation("n1", (3,), "carol", dt.datetime(2027, 2, 1, 7, 0, tzinfo=UTC)),
        Reservation("n1", (4, 5), "dave",
                    dt.datetime(2027, 2, 1, 23, 59, 59, tzinfo=BERLIN), comment="sweep")]


def test_no_file_is_no_bookings_and_an_empty_one_too(tmp_path: Path) -> None:
    assert reservations.load(tmp_path / "none.yml", NOW) == []
    (tmp_path / "empty.yml").write_text("")
    assert reservations.load(tmp_path / "empty.yml", NOW) == []
    (tmp_path / "list.yml").write_text("reservations: []\n")
    assert reservations.load(tmp_path / "list.yml", NOW) == []


@pytest.mark.parametrize(("entry", "message"), [
    ("{host: n1, gpus: [0], user: a, until: 'Friday'}",
     "reservations[0] (a on n1): until: 'Friday' is not an ISO 8601 time"),
    ("{host: n1, gpus: [0], user: a, until: '2027-05-31 18:00'}",
     "until: 2027-05-31 18:00 has no time zone; add one"),
    ("{host: n1, gpus: [-1], user: a, until: 2027-05-31}", "-1 is negative"),
    ("{host: n1, gpus: [], user: a, until: 2027-05-31}",
     "expected a list of indices and MIG slices"),
    ("{host: n1, user: a, until: 2027-05-31}", "gpus is missing"),
    ("{host: n1, gpus: [0], user: a}", "until is missing"),
    ("{host: n1, gpus: [0], until: 2027-05-31}", "user is missing"),
    ("{host: 'n 1', gpus: [0], user: a, until: 2027-05-31}", "host must be a host name"),
    ("{host: n1, gpus: [0], user: 'a b', until: 2027-05-31}", "user must be a user name"),
    ("{host: n1, gpus: [0], user: a, until: 2027-05-31, by: me}", "unknown key 'by'"),
    ("{host: n1, gpus: [0], user: a, until: 2027-05-31, from: 2027-06-01}",
     "from (2027-06-01T00:00:00+00:00) is not before until"),
    ("[n1, 0, a]", "reservations[0]: expected a mapping"),
])
def test_a_bad_entry_is_one_line_naming_the_file_and_the_entry(
        tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text(f"reservations:\n  - {entry}\n")
    with pytest.raises(ReservationError) as e:
        reservations.load(path, NOW, tz=UTC)
    text = str(e.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize(("text", "message"), [
    ("reservations: [\n", "not valid YAML at line 2"),
    ("- host: n1\n", "expected a mapping with one key, reservations"),
    ("reservations: {host: n1}\n", "reservations: expected a list of bookings"),
    ("bookings: []\n", "expected a mapping with one key, reservations"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text(text)
    with pytest.raises(ReservationError) as e:
        reservations.load(path, NOW)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_two_bookings_of_one_gpu_at_once_are_refused_but_ended_ones_may_overlap(
        tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.write(path, [reservation(gpus=(0, 1)), reservation(gpus=None, user="bob")])
    with pytest.raises(ReservationError, match="two bookings of the same GPU at the same time"):
        reservations.load(path, NOW)
    reservations.write(path, [reservation(gpus=(0, 1), days=-2), reservation(gpus=(1,), days=-1),
                              reservation(gpus=(1,), user="bob")])
    assert len(reservations.load(path, NOW)) == 3


# -- writing: locked, in one step, nothing lost --------------------------------------------------

def test_reserve_refuses_an_end_in_the_past_and_a_gpu_someone_has(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    with pytest.raises(ReservationError, match="is not in the future"):
        reservations.add(path, reservation(days=-1), NOW)
    assert not path.exists()
    reservations.add(path, reservation(gpus=(0, 1), comment="deadline"), NOW)
    with pytest.raises(ReservationError) as e:
        reservations.add(path, reservation(gpus=(1, 2), user="bob"), NOW)
    assert str(e.value) == (
        f"{path}: GPU 1 of gpu-srv-01 is already booked: GPUs 0-1 of gpu-srv-01 for alice "
        "until 2027-01-18 12:00+00:00 (deadline); ask them, or pick other GPUs")
    with pytest.raises(ReservationError, match="add --replace"):
        reservations.add(path, reservation(gpus=(1,), days=5), NOW)
    # after alice's reservation ends, bob may have GPU 1
    reservations.add(path, reservation(gpus=(1,), user="bob", start_days=3, days=4), NOW)
    assert [b.user for b in reservations.load(path, NOW)] == ["alice", "bob"]


def test_replace_gives_way_to_a_new_booking_of_ones_own(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(gpus=(0, 1), comment="deadline"), NOW)
    reservations.add(path, reservation(gpus=(1,), days=7, comment="extended"), NOW,
                     replace_own=True)
    assert [(b.gpus, b.until, b.comment) for b in reservations.load(path, NOW)] == [
        (cells(0), NOW + dt.timedelta(days=3), "deadline"),
        (cells(1), NOW + dt.timedelta(days=7), "extended")]


def test_release_by_gpus_by_user_and_the_ended_ones(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.write(path, [reservation(gpus=(0, 1, 2)), reservation(host="ws-01", gpus=None),
                              reservation(gpus=(5,), user="bob"), reservation(gpus=(6,), days=-1)])
    done = reservations.release(path, NOW, host="gpu-srv-01", gpus=cells(1))
    assert done.removed == [reservation(gpus=(0, 1, 2))]
    assert reservations.load(path, NOW)[0].gpus == cells(0, 2)
    with pytest.raises(ReservationError, match="books every GPU of ws-01; release ws-01:all"):
        reservations.release(path, NOW, host="ws-01", gpus=cells(0))
    done = reservations.release(path, NOW, user="alice")
    assert {b.host for b in done.removed} == {"gpu-srv-01", "ws-01"}
    with pytest.raises(ReservationError, match="there is no booking by alice"):
        reservations.release(path, NOW, user="alice")
    done = reservations.release(path, NOW, expired=True)
    assert done.removed == [reservation(gpus=(6,), days=-1)]
    assert reservations.load(path, NOW) == [reservation(gpus=(5,), user="bob")]
    with pytest.raises(ReservationError, match="there is no booking of gpu-srv-01:5 by carol"):
        reservations.release(path, NOW, host="gpu-srv-01", gpus=cells(5), user="carol")


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(), NOW)
    path.chmod(0o640)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ReservationError) as e:
        reservations.add(path, reservation(gpus=(1,), user="bob"), NOW)
    assert str(e.value) == f"{path}: not written (No space left on device); the file is " \
        "unchanged"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reservations.yml", "reservations.yml.audit.jsonl", "reservations.yml.lock"]
    assert [e["action"] for e in reservations.history(path)] == ["add"]  # not the failed one
    monkeypatch.undo()
    reservations.add(path, reservation(gpus=(1,), user="bob"), NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the mode it had


def test_a_bad_change_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(), NOW)
    before = path.read_bytes()
    with pytest.raises(ReservationError, match="two bookings of the same GPU"):
        reservations.update(path, lambda b: [*b, reservation(user="bob")], NOW)
    assert path.read_bytes() == before


def test_the_lock_makes_an_edit_wait_and_then_give_up(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    with reservations.locked(path), pytest.raises(ReservationError,
                                                  match="another edit has held"), \
            reservations.locked(path, timeout=0.2):
        pass
    with reservations.locked(path):  # free again
        pass


# -- never through a link, never over what is not a regular file, no temporary files left ------

def _refused(path: Path, *expected: str) -> str:
    with pytest.raises(ReservationError) as e:
        reservations.add(path, reservation(), NOW)
    text = str(e.value)
    assert "\n" not in text and all(part in text for part in expected), text
    return text


def test_an_edit_through_a_link_is_refused_and_the_file_it_points_to_untouched(
        tmp_path: Path) -> None:
    real = tmp_path / "data" / "reservations.yml"
    real.parent.mkdir()
    reservations.write(real, [reservation(user="bob", gpus=(5,))])
    before = real.read_bytes()
    link = tmp_path / "reservations.yml"
    link.symlink_to(real)
    text = _refused(link, str(link), "is a symbolic link", str(real))
    assert text.startswith(f"{link}: ")
    assert real.read_bytes() == before and link.is_symlink()
    assert not (tmp_path / "reservations.yml.audit.jsonl").exists()
    dangling = tmp_path / "dangling.yml"
    dangling.symlink_to(tmp_path / "nowhere.yml")
    _refused(dangling, "is a symbolic link")
    assert not (tmp_path / "nowhere.yml").exists()
    with pytest.raises(ReservationError, match="is a symbolic link"):
        reservations.write(link, [reservation()])


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
def test_a_fifo_a_socket_or_a_directory_at_the_path_is_refused_never_waited_on(
        tmp_path: Path, kind: str) -> None:
    path = tmp_path / "reservations.yml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    name = {"fifo": "a FIFO", "socket": "a socket", "directory": "a directory"}[kind]
    _refused(path, str(path), f"is {name}, not a regular file")
    with pytest.raises(ReservationError, match=f"is {name}, not a regular file"):
        reservations.load(path, NOW)  # a FIFO with no writer would block a plain open()
    with pytest.raises(ReservationError, match=f"is {name}, not a regular file"):
        reservations.write(path, [reservation()])
    assert sorted(p.name for p in tmp_path.iterdir()) in (
        ["reservations.yml"], ["reservations.yml", "reservations.yml.lock"])
    if kind == "socket":
        server.close()


def test_a_device_like_lock_or_audit_log_or_a_linked_lock_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    lock = tmp_path / "reservations.yml.lock"
    os.mkfifo(lock)
    _refused(path, str(lock), "the lock is a FIFO, not a regular file")
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    _refused(path, "the lock is a symbolic link")
    assert not (tmp_path / "elsewhere").exists()
    lock.unlink()
    audit = tmp_path / "reservations.yml.audit.jsonl"
    os.mkfifo(audit)
    _refused(path, "the audit log is a FIFO", "the reservations file is unchanged")
    assert not path.exists()
    audit.unlink()
    audit.symlink_to(tmp_path / "log")
    _refused(path, "the audit log is a symbolic link")
    assert not path.exists() and not (tmp_path / "log").exists()


def test_a_killed_writers_temporary_files_go_with_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(), NOW)
    old = tmp_path / ".reservations.yml.k1ll3d_x.tmp"
    fresh = tmp_path / ".reservations.yml.wr1t1ng_.tmp"
    other = tmp_path / ".other.yml.k1ll3d_x.tmp"
    linked = tmp_path / ".reservations.yml.l1nk3d__.tmp"
    for p in (old, fresh, other):
        p.write_text("half a file")
    linked.symlink_to(other)
    an_hour_ago = time.time() - 3600
    for p in (old, other):
        os.utime(p, (an_hour_ago, an_hour_ago))
    os.utime(linked, (an_hour_ago, an_hour_ago), follow_symlinks=False)
    reservations.add(path, reservation(gpus=(1,)), NOW)
    assert not old.exists()
    assert fresh.exists() and other.exists() and linked.is_symlink()  # too new, not ours, a link


def test_a_write_that_fails_at_any_step_leaves_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(), NOW)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reservations.add(path, reservation(gpus=(1,)), NOW)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(reservations.load(path, NOW)) == 1


# -- ids -------------------------------------------------------------------------------------

def test_an_added_booking_gets_a_short_unique_id_that_stays(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    first = reservations.add(path, reservation(gpus=(0, 1, 2)), NOW)
    second = reservations.add(path, reservation(gpus=(3,), user="bob"), NOW)
    assert re.fullmatch(r"[0-9a-f]{8}", first.id) and first.id != second.id
    assert [r.id for r in reservations.load(path, NOW)] == [first.id, second.id]
    assert f"- id: {first.id}\n  host: gpu-srv-01\n" in path.read_text()
    reservations.release(path, NOW, host="gpu-srv-01", gpus=cells(1))  # a part given back
    kept = reservations.find(path, first.id, NOW)
    assert kept.gpus == cells(0, 2) and kept.id == first.id
    assert reservations.find(path, second.id, NOW).user == "bob"
    code, out = run("reservations", "--json", "--file", str(path))
    assert code == 0 and [b["id"] for b in json.loads(out)] == [first.id, second.id]


def test_a_file_without_ids_loads_with_ids_the_next_write_keeps(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text("reservations:\n"
                    "  - {host: n1, gpus: [0], user: a, until: '2027-02-01T00:00:00Z'}\n"
                    "  - {host: n1, gpus: [1], user: b, until: '2027-02-01T00:00:00Z'}\n")
    ids = [r.id for r in reservations.load(path, NOW)]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)
    assert [r.id for r in reservations.load(path, NOW)] == ids  # the same on every read
    added = reservations.add(path, reservation(host="n2"), NOW)
    assert [r.id for r in reservations.load(path, NOW)] == [*ids, added.id]
    assert [e["id"] for e in yaml.safe_load(path.read_text())["reservations"]] == \
        [*ids, added.id]
    assert [e["action"] for e in reservations.history(path)] == ["add"]  # ids are no change


def test_two_entries_with_one_id_are_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text("reservations:\n"
                    "  - {id: abc, host: n1, gpus: [0], user: a, until: '2027-02-01T00:00Z'}\n"
                    "  - {id: abc, host: n1, gpus: [1], user: b, until: '2027-02-01T00:00Z'}\n")
    with pytest.raises(ReservationError) as e:
        reservations.load(path, NOW)
    assert str(e.value) == (
        f"{path}: reservations[1] (b on n1): id abc is also the id of reservations[0] (a on "
        "n1); remove one of the two id lines (the next change gives it a new one)")
    path.write_text("reservations:\n  - {id: 'a b', host: n1, gpus: [0], user: a, "
                    "until: '2027-02-01T00:00Z'}\n")
    with pytest.raises(ReservationError, match=r"reservations\[0\] .*: id must be"):
        reservations.load(path, NOW)


def test_release_by_id_with_the_callers_check_under_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    alice = reservations.add(path, reservation(), NOW)
    bob = reservations.add(path, reservation(gpus=(1,), user="bob"), NOW)
    before = path.read_bytes()

    class Forbidden(Exception):
        pass

    def only_alice(r: Reservation) -> None:
        if r.user != "alice":
            raise Forbidden(r.user)

    with pytest.raises(Forbidden):
        reservations.release_by_id(path, bob.id, NOW, allowed=only_alice)
    assert path.read_bytes() == before
    with pytest.raises(reservations.NotFound) as e:
        reservations.release_by_id(path, "nosuchid", NOW)
    assert str(e.value) == f"{path}: no booking has the id 'nosuchid'; `gpuwatch " \
        "reservations --json` lists them with their ids"
    with pytest.raises(reservations.NotFound):
        reservations.find(path, "nosuchid", NOW)
    gone = reservations.release_by_id(path, alice.id, NOW, allowed=only_alice, who="alice",
                                      source="192.0.2.7")
    assert gone == alice and gone.id == alice.id
    assert reservations.load(path, NOW) == [bob]
    assert reservations.history(path)[-1]["from"] == "192.0.2.7"


# -- what is written is what may be read -------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"host": "gpu node"}, "host must be a host name, without spaces"),
    ({"host": ""}, "host must be a host name"),
    ({"host": "n1\x00"}, "host must be a host name"),
    ({"host": "h" * 254}, "of at most 253 characters"),
    ({"user": "a b"}, "user must be a user name"),
    ({"user": "al\tice"}, "user must be a user name"),
    ({"comment": "two\nlines"}, "comment must be one line of text"),
    ({"comment": "x" * 501}, "of at most 500 characters"),
    ({"gpus": ()}, "gpus: expected GPU indices 0 to 1023, MIG slices (0/7) or all"),
    ({"gpus": ("0",)}, "gpus: expected GPU indices 0 to 1023, MIG slices (0/7) or all"),
    ({"gpus": (0, 1024)}, "gpus: expected GPU indices 0 to 1023"),
    ({"gpus": (Cell(0), Cell(0, 7))}, "0/7 is a slice of GPU 0, which is booked whole as well"),
    ({"id": "not an id"}, "id must be"),
])
def test_what_the_file_would_refuse_to_read_is_never_written(
        tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(host="n9"), NOW)
    before = path.read_bytes()
    bad = dataclasses.replace(reservation(), **changes)
    with pytest.raises(ReservationError) as e:
        reservations.add(path, bad, NOW)
    assert str(e.value).startswith(f"{path}: not booked: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before
    with pytest.raises(ReservationError, match=f"{path}: not written: .*the file is unchanged"):
        reservations.update(path, lambda rs: [*rs, bad], NOW)
    with pytest.raises(ReservationError, match="not written"):
        reservations.write(path, [bad])
    assert path.read_bytes() == before
    assert len(reservations.history(path)) == 1


def test_reserve_of_a_host_with_a_space_is_refused_and_the_file_stays_readable(
        rfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("reserve", "n1:0", "--until", "+1d")[0] == 0
    before = rfile.read_bytes()
    err = one_error(capsys, "reserve", "gpu node:0", "--until", "+1d")
    assert "host must be a host name, without spaces" in err and "'gpu node'" in err
    assert rfile.read_bytes() == before
    code, out = run("reservations")
    assert code == 0 and "n1" in out


def test_gpu_ranges_are_bounded_before_they_are_expanded(tmp_path: Path) -> None:
    assert reservations.parse_gpus("1023") == cells(1023)
    assert len(reservations.parse_gpus("0-1023") or ()) == 1024
    for text in ("0-100000", "1024", "0,5-99999999999999999999"):
        with pytest.raises(ReservationError, match="past the highest index gpuwatch accepts "
                           "\\(1023\\); for every GPU write all"):
            reservations.parse_gpus(text)
    path = tmp_path / "reservations.yml"
    path.write_text("reservations:\n"
                    "  - {host: big, gpus: 0-100000, user: a, until: '2027-02-01T00:00Z'}\n")
    with pytest.raises(ReservationError, match=f"{path}: reservations\\[0\\] .*past the highest"):
        reservations.load(path, NOW)
    path.write_text("reservations:\n"
                    "  - {host: big, gpus: [5000], user: a, until: '2027-02-01T00:00Z'}\n")
    with pytest.raises(ReservationError, match="past the highest"):
        reservations.load(path, NOW)


TRICKY = ["plain", "NeurIPS deadline", "yes", "No", "on", "null", "~", "", "1e5", "0x1F",
          "12345678", "3f2a9c1b", "10.0.0.1", "1:20", "2027-01-01", "a: b", "a #b", "#x", "- x",
          "'quoted'", '"double"', "it's", "ümlaut ß", "日本", "a  b", "[0]", "{x}", "*ref",
          "&a", "!tag", "|", ">", "%", "@home", "`x`", "=", "<<", "a,b", "trailing.", "_x",
          ".inf", "-1", "+1", "x\\y", "C++ (g++)", "a/b@c"]


def test_the_file_as_written_reads_the_same_with_yaml_and_with_the_fast_reader(
        tmp_path: Path) -> None:
    rng = random.Random(7)
    for _ in range(40):
        written = []
        for i in range(rng.randint(0, 6)):
            words = [w for w in rng.sample(TRICKY, 3) if w]
            comment = " ".join(" ".join(words).split())[:500]
            host = rng.choice(["gpu-srv-01", "10.0.0.1", "yes", "12345", "on", "a:b", "fe80::1"])
            user = rng.choice(["alice", "null", "1234", "o'neil", "ü"])
            written.append(Reservation(
                host=host, gpus=None if rng.random() < 0.2 else
                tuple(sorted(rng.sample(range(1024), rng.randint(1, 4)))),
                user=user, until=NOW + dt.timedelta(days=i + 1, seconds=rng.randint(0, 999)),
                start=None if rng.random() < 0.3 else NOW, comment=comment,
                id=rng.choice(["", "12345678", "0e12", "abc", f"x{i}"])))
        # ids unique, GPUs apart: the rules hold
        written = [dataclasses.replace(r, host=f"{r.host}{i}", id=f"{r.id}{i}" if r.id else "")
                   for i, r in enumerate(written)]
        text = reservations.render(written)
        by_yaml = yaml.safe_load(text)
        assert model._read_rendered(text) == by_yaml, text
        assert by_yaml["reservations"] == [r.to_yaml() for r in written], text
        model._parsed.clear()
        parsed = reservations.parse(text, "f", NOW)
        assert parsed == written
        assert [p.id for p, w in zip(parsed, written, strict=True) if w.id] == \
            [w.id for w in written if w.id]
    for other in ["reservations:\n- {host: n1, gpus: [0], user: a, until: '2027-02-01T00:00Z'}\n",
                  "reservations:\n  - host: n1\n    gpus: [0]\n    user: a\n"
                  "    until: '2027-02-01T00:00Z'\n",
                  "reservations:\n- host: n1\n  gpus: 0-1\n  user: a\n  until: 2027-02-01\n",
                  "reservations:\n- host: n1 # a comment\n  gpus: [0]\n  user: a\n"
                  "  until: '2027-02-01T00:00Z'\n",
                  "reservations:\n- host: n1\n  host: n2\n  gpus: [0]\n  user: a\n"
                  "  until: '2027-02-01T00:00Z'\n",
                  "reservations: []\n- host: n1\n", "---\nreservations: []\n",
                  "reservations:\n- host: n1\n  gpus: [00, 1]\n  user: a\n"
                  "  until: '2027-02-01T00:00Z'\n"]:
        assert model._read_rendered(other) is None, other  # YAML reads what is not render()'s


@pytest.mark.parametrize("raw", [
    {"id": "abc", "host": "n1", "gpus": [1, 0, 1], "user": "a",
     "until": "2027-02-01T00:00:00+00:00"},
    {"host": "n1", "gpus": "all", "user": "a", "from": "2027-01-01T00:00:00+01:00",
     "until": "2027-02-01T00:00:00+00:00", "comment": "x y"},
    {"host": "n1", "gpus": [0], "user": "a", "until": "2027-02-01"},
    {"host": "n1", "gpus": [0], "user": "a", "until": "2027-02-01T00:00:00"},
    {"host": "n1", "gpus": [0], "user": "a", "until": "2027-02-01T00:00:00Z"},
    {"host": " n1 ", "gpus": [0], "user": "a", "until": "2027-02-01T00:00:00+00:00"},
    {"host": "n1", "gpus": [0], "user": "a", "until": "2027-02-01T00:00:00+00:00",
     "comment": "  two   spaces "},
    {"host": "n1", "gpus": [0], "user": 7, "until": "2027-02-01T00:00:00+00:00"},
    {"host": "n1", "gpus": [2000], "user": "a", "until": "2027-02-01T00:00:00+00:00"},
    {"host": "n1", "gpus": [0], "user": "a", "until": "2027-02-01T00:00:00+00:00",
     "from": "2027-03-01T00:00:00+00:00"},
])
def test_the_quick_reading_of_an_entry_is_the_full_ones(raw: dict[str, Any]) -> None:
    """Entries as gpuwatch writes them are read by a short path; any other, by the full one
    with its messages: where the short one answers, both give the same."""
    try:
        full: Reservation | str = model._full_entry(raw, "e", BERLIN)
    except ReservationError as e:
        full = str(e)
    quick = model._quick_entry(raw)
    if quick is not None:
        assert quick == full and quick.id == full.id  # type: ignore[union-attr]
    try:
        assert model._entry(raw, "e", BERLIN) == full
    except ReservationError as e:
        assert str(e) == full


def test_what_an_edit_returns_is_what_a_fresh_read_of_the_file_gives(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    berlin_now = dt.datetime(2027, 1, 15, 13, 0, 0, 123456, tzinfo=BERLIN)
    added = reservations.add(path, Reservation("n1", (0,), "a", berlin_now + dt.timedelta(days=1),
                                               start=berlin_now), berlin_now)
    assert added.until.microsecond == 0 and added.start is not None and \
        added.start.microsecond == 0
    warm = reservations.load(path, berlin_now)
    model._parsed.clear()
    cold = reservations.load(path, berlin_now)
    assert warm == cold == [added]
    assert [r.to_api() for r in warm] == [r.to_api() for r in cold] == [added.to_api()]
    assert [r.id for r in warm] == [r.id for r in cold] == [added.id]


def test_the_indexed_overlap_check_finds_what_comparing_every_pair_finds() -> None:
    rng = random.Random(13)
    for _ in range(300):
        booked = [reservation(host=rng.choice(["a", "b"]),
                              gpus=None if rng.random() < 0.1 else
                              tuple(sorted(rng.sample(range(6), rng.randint(1, 3)))),
                              user=f"u{i}", days=rng.uniform(-1, 6),
                              start_days=None if rng.random() < 0.3 else rng.uniform(-2, 5))
                  for i in range(rng.randint(0, 7))]
        booked = [b for b in booked if b.start is None or b.start < b.until]
        current = [b for b in booked if not b.expired(NOW)]
        pairwise = any(a.overlaps(b) for i, a in enumerate(current) for b in current[i + 1:])
        try:
            reservations.check_overlaps(booked, "f", NOW)
        except ReservationError as e:
            assert pairwise, e
            named = {b.user: b for b in booked}
            a, b = (named[u] for u in re.findall(r"for (u\d+) until", str(e)))
            assert a.overlaps(b) and not a.expired(NOW) and not b.expired(NOW), e
        else:
            assert not pairwise, booked


# -- the audit log -------------------------------------------------------------------------------

def test_every_change_is_in_the_audit_log_who_when_what_from_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reservations.yml"
    monkeypatch.setattr(getpass, "getuser", lambda: "root")
    first = reservations.add(path, reservation(gpus=(0, 1), comment="deadline"), NOW)
    later = NOW + dt.timedelta(hours=1)
    bob = reservations.add(path, reservation(gpus=(2,), user="bob"), later, who="bob",
                           source="192.0.2.10")
    reservations.release(path, later, host="gpu-srv-01", gpus=cells(1), who="alice",
                         source="192.0.2.11")
    reservations.release_by_id(path, bob.id, later, who="admin", source="192.0.2.12")
    log = tmp_path / "reservations.yml.audit.jsonl"
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    entries = reservations.history(path)
    assert [(e["time"], e["who"], e["action"], e["from"]) for e in entries] == [
        ("2027-01-15T12:00:00+00:00", "root", "add", "file"),
        ("2027-01-15T13:00:00+00:00", "bob", "add", "192.0.2.10"),
        ("2027-01-15T13:00:00+00:00", "alice", "release", "192.0.2.11"),
        ("2027-01-15T13:00:00+00:00", "admin", "release", "192.0.2.12")]
    assert entries[0]["reservations"] == [first.to_api()]
    assert entries[0]["reservations"][0]["gpus"] == [0, 1]
    assert entries[2]["reservations"] == [first.to_api()]  # as it was
    assert entries[2]["kept"][0]["gpus"] == [0] and entries[2]["kept"][0]["id"] == first.id
    assert entries[3]["reservations"] == [bob.to_api()]
    assert reservations.history(path, user="bob") == [entries[1], entries[3]]
    assert reservations.history(path, reservation_id=first.id) == [entries[0], entries[2]]
    assert reservations.history(path, limit=1) == [entries[3]]
    assert reservations.history(path, since=later) == entries[1:]
    assert reservations.history(tmp_path / "other.yml") == []


def test_the_audit_log_survives_a_writer_killed_mid_line(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(), NOW)
    log = reservations.audit_path(path)
    with log.open("a") as f:
        f.write('{"time": "2027-01-15T12:00:00+00:00", "who": "x", "act')
    assert [e["action"] for e in reservations.history(path)] == ["add"]
    reservations.add(path, reservation(gpus=(1,)), NOW)
    assert [e["action"] for e in reservations.history(path)] == ["add", "add"]
    assert log.read_text().count("\n") == 3  # the cut line was ended, the new one whole


def test_an_import_is_in_the_audit_log(rfile: Path) -> None:
    assert run("reservations", "import", str(FIXTURE), "--day-first", "--skip-invalid")[0] == 0
    (entry,) = reservations.history(rfile)
    assert entry["action"] == "import" and entry["who"] == getpass.getuser()
    assert {r["id"] for r in entry["reservations"]} == \
        {r.id for r in reservations.load(rfile, dt.datetime.now(UTC))}


def test_an_audit_log_that_cannot_be_appended_to_refuses_the_change(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, reservation(gpus=(5,)), NOW)
    before = path.read_bytes()
    log = reservations.audit_path(path)
    log.unlink()
    log.mkdir()
    _refused(path, "the audit log is a directory")
    assert path.read_bytes() == before


def _book_at_once(args: tuple[str, int, str, Any]) -> str:
    path, gpu, user, barrier = args
    barrier.wait()
    try:
        reservations.add(Path(path), reservation(gpus=(gpu,), user=user), NOW)
    except ReservationError as e:
        return f"refused: {e}"
    return "booked"


def _run_at_once(path: Path, jobs: list[tuple[int, str]]) -> list[str]:
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(len(jobs))
    with context.Pool(len(jobs)) as pool:
        return pool.map(_book_at_once, [(str(path), gpu, user, barrier) for gpu, user in jobs])


def test_many_people_booking_at_once_lose_no_booking(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    results = _run_at_once(path, [(gpu, f"user{gpu}") for gpu in range(16)])
    assert results == ["booked"] * 16
    reserved = reservations.load(path, NOW)
    assert sorted((reservations.gpus_text(b.gpus), b.user) for b in reserved) == \
        sorted((str(gpu), f"user{gpu}") for gpu in range(16))


def test_many_people_booking_one_gpu_at_once_get_it_once(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    results = _run_at_once(path, [(3, f"user{i}") for i in range(12)])
    assert results.count("booked") == 1
    assert all("GPU 3 of gpu-srv-01 is already booked" in r for r in results if r != "booked")
    (only,) = reservations.load(path, NOW)
    assert only.user == f"user{results.index('booked')}"


# -- the commands ------------------------------------------------------------------------------

def test_reserve_list_and_release_round_trip(rfile: Path) -> None:
    code, out = run("reserve", "gpu-srv-01:0-1", "--until", "2099-05-31T18:00+02:00",
                    "--comment", "NeurIPS  deadline")
    assert code == 0
    assert out == "booked GPUs 0-1 of gpu-srv-01 for alice until 2099-05-31 18:00+02:00 " \
        "(NeurIPS deadline)\n"
    assert run("reserve", "ws-01:all", "--until", "+30d", "--user", "bob")[0] == 0
    code, out = run("reservations", "--json")
    listed = json.loads(out)
    assert [(b["host"], b["gpus"], b["user"], b["comment"], b["active"]) for b in listed] == [
        ("gpu-srv-01", [0, 1], "alice", "NeurIPS deadline", True),
        ("ws-01", "all", "bob", "", True)]
    assert listed[0]["until"] == "2099-05-31T18:00:00+02:00"
    assert listed[0]["until_timestamp"] == dt.datetime(2099, 5, 31, 16, tzinfo=UTC).timestamp()
    code, out = run("reservations")
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "GPUS", "USER", "FROM", "UNTIL", "COMMENT"]
    assert lines[1].split()[:3] == ["gpu-srv-01", "0-1", "alice"]
    assert lines[1].endswith("2099-05-31 18:00+02:00  NeurIPS deadline")
    assert run("reservations", "list", "--user", "bob", "--json")[1].count('"host"') == 1
    code, out = run("release", "gpu-srv-01:1")
    assert out == "released GPU 1 of gpu-srv-01 for alice until 2099-05-31 18:00+02:00 " \
        "(NeurIPS deadline); GPU 0 stays booked\n"
    code, out = run("release", "--user", "bob")
    assert (code, out.split()[:4]) == (0, ["released", "every", "GPU", "of"])
    assert [(b["host"], b["gpus"]) for b in json.loads(run("reservations", "--json")[1])] == \
        [("gpu-srv-01", [0])]


def test_a_booking_ahead_and_the_ended_ones_are_listed_apart(rfile: Path) -> None:
    assert run("reserve", "n1:0", "--from", "2099-01-01", "--until", "2099-01-31")[1] == \
        "booked GPU 0 of n1 for alice until 2099-01-31 23:59+00:00, from " \
        "2099-01-01 00:00+00:00\n"
    now = dt.datetime.now(UTC)
    reservations.update(rfile, lambda b: [*b, Reservation("n1", (1,), "bob",
                                                          now - dt.timedelta(days=1))], now)
    assert [b["gpus"] for b in json.loads(run("reservations", "--json")[1])] == [[0]]
    out = run("reservations", "--all")[1]
    header, *rows = out.splitlines()
    column = header.index("STATUS")
    assert [row[column:].split()[0] for row in rows] == ["upcoming", "ended"]
    assert run("release", "--expired")[1].startswith("released GPU 1 of n1 for bob")
    assert len(json.loads(run("reservations", "--all", "--json")[1])) == 1


def test_the_file_comes_from_the_flag_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(reservations.ENV_FILE, raising=False)
    err = one_error(capsys, "reservations")
    assert "--file PATH" in err and reservations.ENV_FILE in err
    flag = tmp_path / "flag.yml"
    assert run("reserve", "n1:0", "--until", "+1d", "--file", str(flag))[0] == 0
    assert flag.exists()
    monkeypatch.setenv(reservations.ENV_FILE, str(tmp_path / "env.yml"))
    assert run("reserve", "n1:0", "--until", "+1d")[0] == 0
    assert (tmp_path / "env.yml").exists()
    # the flag wins, before or after the action
    assert len(json.loads(run("reservations", "--json", "--file", str(flag))[1])) == 1
    assert run("reservations", "list", "--file", str(tmp_path / "none.yml"))[1].startswith(
        "no current bookings in")


@pytest.mark.parametrize(("argv", "message"), [
    (["reserve", "n1:0", "--until", "yesterday"], "--until 'yesterday' is not a time"),
    (["reserve", "n1:0", "--until", "2001-01-01"], "is not in the future"),
    (["reserve", "n1:-1", "--until", "+1d"], "-1 is negative"),
    (["reserve", "n1", "--until", "+1d"], "name the GPUs too: n1:0,1"),
    (["reserve", "n1:0", "--until", "+1d", "--from", "+2d"], "is not before until"),
    (["reserve", "n1:0", "--until", "+1d", "--user", "a b"], "a user name, without spaces"),
    (["release"], "say what to release"),
    (["release", "n9:0"], "there is no booking of n9:0"),
])
def test_bad_input_is_one_line_and_exit_1(rfile: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    assert message in one_error(capsys, *argv)


def test_a_file_made_unusable_by_hand_is_one_line_naming_it(
        rfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rfile.write_text("reservations:\n  - {host: n1, gpus: [0], user: a, until: 'Friday'}\n")
    for argv in (["reservations"], ["reserve", "n1:1", "--until", "+1d"], ["release", "n1"]):
        err = one_error(capsys, *argv)
        assert f"{rfile}: reservations[0] (a on n1): until: 'Friday'" in err
    assert "Friday" in rfile.read_text()  # left for a person to fix


def test_a_booked_gpu_is_refused_with_who_has_it(rfile: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run("reserve", "n1:0-3", "--until", "2099-01-01", "--user", "bob",
               "--comment", "sweep")[0] == 0
    err = one_error(capsys, "reserve", "n1:2,5", "--until", "+1d")
    assert "GPU 2 of n1 is already booked: GPUs 0-3 of n1 for bob until 2099-01-01 " \
        "23:59+00:00 (sweep); ask them" in err
    assert run("reserve", "n1:4-5", "--until", "+1d")[0] == 0


# -- the old comments.json ---------------------------------------------------------------------

def test_the_old_format_is_converted_with_each_unreadable_date_named() -> None:
    found = legacy.convert_comments(json.loads(FIXTURE.read_text()), NOW, tz=UTC)
    assert sorted((b.host, reservations.gpus_text(b.gpus), b.user, b.until.isoformat(),
                   b.comment) for b in found.reservations) == [
        ("gpu-node-07", "0-1", "frank", "2099-01-15T23:59:59+00:00", ""),
        ("gpu-node-07", "2", "grace", "2099-03-15T23:59:59+00:00", "rebuttal"),
        ("gpu-node-07", "3", "heidi", "2099-01-31T23:59:59+00:00", "long job"),
        ("gpu-srv-01", "0-1", "alice", "2099-05-31T23:59:59+00:00", "NeurIPS deadline"),
        ("gpu-srv-01", "3", "bob", "2098-12-31T23:59:59+00:00",
         "thesis runs, please ask first"),
        ("ws-01", "0", "ivan", "2099-03-01T18:00:00+00:00", "demo for the review")]
    assert found.expired == ["gpu-srv-01 GPU 4 (carol, until 2023-01-15 23:59+00:00)"]
    assert [p.split(":")[0] for p in found.problems] == [
        "gpu-srv-01 GPU 6 (dave)", "gpu-srv-01 GPU 7 (erin)", "ws-01 GPU 2 (judy)"]
    assert "'next friday' is not a date" in found.problems[0]
    assert "--day-first or --month-first" in found.problems[1]
    day_first = legacy.convert_comments(json.loads(FIXTURE.read_text()), NOW, True, UTC)
    erin = next(b for b in day_first.reservations if b.user == "erin")
    assert erin.until.date() == dt.date(2099, 6, 5)
    month_first = legacy.convert_comments(json.loads(FIXTURE.read_text()), NOW, False, UTC)
    assert next(b for b in month_first.reservations if b.user == "erin").until.date() == \
        dt.date(2099, 5, 6)


@pytest.mark.parametrize(("text", "day"), [
    ("2099-05-31", "2099-05-31"), ("31.05.2099", "2099-05-31"), ("31.05.99", "2099-05-31"),
    ("2099/05/31", "2099-05-31"), ("31 May 2099", "2099-05-31"), ("May 31, 2099", "2099-05-31"),
    ("31/05/2099", "2099-05-31"), ("05/31/2099", "2099-05-31"), ("2099-05-31 18:00", None)])
def test_old_dates_in_the_plausible_formats(text: str, day: str | None) -> None:
    until = legacy.parse_old_date(text, None, UTC)
    if day is None:
        assert until == dt.datetime(2099, 5, 31, 18, tzinfo=UTC)
    else:
        assert (until.date().isoformat(), until.time()) == (day, dt.time(23, 59, 59))


def test_import_is_all_or_nothing_unless_told(rfile: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("reservations", "import", str(FIXTURE))
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and out == "" and not rfile.exists()
    assert err[:3] == [
        f"gpuwatch: {FIXTURE}: cannot import gpu-srv-01 GPU 6 (dave): 'next friday' is not a "
        "date gpuwatch knows (2024-05-31, 31.05.2024, 2024/05/31, 31 May 2024)",
        f"gpuwatch: {FIXTURE}: cannot import gpu-srv-01 GPU 7 (erin): '05/06/2099' could be "
        "day/month or month/day; import with --day-first or --month-first",
        f"gpuwatch: {FIXTURE}: cannot import ws-01 GPU 2 (judy): '31.13.2099' is not a date "
        "gpuwatch knows (2024-05-31, 31.05.2024, 2024/05/31, 31 May 2024)"]
    assert err[3].startswith(f"gpuwatch: error: {FIXTURE}: 3 entries cannot be read")

    code, out = run("reservations", "import", str(FIXTURE), "--day-first", "--skip-invalid",
                    "--dry-run")
    assert code == 0 and not rfile.exists()
    assert out.splitlines()[-1] == "7 bookings would import, 0 already there, 1 ended, " \
        "2 unreadable"
    code, out = run("reservations", "import", str(FIXTURE), "--day-first", "--skip-invalid")
    assert code == 0 and out.splitlines()[-1].startswith("7 bookings imported")
    assert "imported GPUs 0-1 of gpu-srv-01 for alice until 2099-05-31 23:59" in out
    assert len(reservations.load(rfile, dt.datetime.now(UTC))) == 7
    # again: nothing new
    code, out = run("reservations", "import", str(FIXTURE), "--day-first", "--skip-invalid")
    assert out.splitlines()[-1] == "0 bookings imported, 7 already there, 1 ended, 2 unreadable"
    assert len(reservations.load(rfile, dt.datetime.now(UTC))) == 7


def test_import_of_what_is_not_the_old_format(rfile: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "comments.json"
    bad.write_text("{not json")
    assert "not JSON" in one_error(capsys, "reservations", "import", str(bad))
    bad.write_text("[1, 2]")
    assert "expected an object: machine -> GPU index" in one_error(
        capsys, "reservations", "import", str(bad))
    assert "cannot read" in one_error(capsys, "reservations", "import",
                                      str(tmp_path / "missing.json"))
    bad.write_text(json.dumps({"n1": {"0": {"name": "a", "date": "2099-01-01"},
                                      "x": {"name": "b", "date": "2099-01-01"}},
                               "n2": "busy"}))
    assert run("reservations", "import", str(bad)) == (1, "")
    err = capsys.readouterr().err
    assert "n1 GPU x (b): 'x' is not a list of GPUs" in err
    assert "n2: expected GPU index" in err


# -- the reservation collector and the exporter that runs it ----------------------------------

class NoNvml:
    """An NVML library that must not be touched."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"NVML was touched: {name}")


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


def endpoint(path: Path, clock: Clock) -> tuple[Exporter, CollectorRegistry]:
    options = exporter_main.ExporterOptions(collectors=frozenset({ReservationCollector.name}),
                                            reservations_file=path, own_process_metrics=False)
    collectors = exporter_main.build_collectors(options, exporter_main.Sources(clock=clock))
    exporter = Exporter(Nvml(NoNvml()), collectors, timer=lambda: 0.0)
    return exporter, exporter_main.build_registry(exporter, options)


def served(registry: CollectorRegistry) -> dict[tuple[str, str, str], tuple[float, str, str]]:
    """(reserved_host, gpu, user) -> (end, until, comment)."""
    found = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == metrics.RESERVATION_END.name:
                found[s.labels["reserved_host"], s.labels["gpu"], s.labels["user"]] = \
                    (s.value, s.labels["until"], s.labels["comment"])
    return found


def success(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(metrics.COLLECTOR_SUCCESS.name,
                                     {"collector": ReservationCollector.name})


def test_the_endpoint_serves_active_bookings_and_never_touches_nvml(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    clock = Clock(NOW)
    reservations.write(path, [
        reservation(gpus=(0, 1), comment="NeurIPS deadline"),
        reservation(host="ws-01", gpus=None, user="bob", days=1),
        reservation(host="ws-02", gpus=(3,), user="carol", start_days=1, days=2),  # ahead
        reservation(host="ws-03", gpus=(0,), user="dave", days=-1)])  # ended
    exporter, registry = endpoint(path, clock)
    try:
        end = (NOW + dt.timedelta(days=3)).timestamp()
        assert served(registry) == {
            ("gpu-srv-01", "0", "alice"): (end, "2027-01-18 12:00+00:00", "NeurIPS deadline"),
            ("gpu-srv-01", "1", "alice"): (end, "2027-01-18 12:00+00:00", "NeurIPS deadline"),
            ("ws-01", "all", "bob"): ((NOW + dt.timedelta(days=1)).timestamp(),
                                      "2027-01-16 12:00+00:00", "")}
        assert success(registry) == 1
        text = generate_latest(registry).decode()
        assert "nvidia_gpu_nvml_up" not in text and "nvidia_gpu_up" not in text
        # a day and a half later bob's reservation has ended and carol's has begun, by themselves
        clock.now = NOW + dt.timedelta(days=1.5)
        assert set(served(registry)) == {("gpu-srv-01", "0", "alice"),
                                         ("gpu-srv-01", "1", "alice"), ("ws-02", "3", "carol")}
    finally:
        exporter.close()


def test_a_change_is_served_on_the_next_scrape_and_the_file_parsed_only_when_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reservations.yml"
    parsed: list[str] = []
    real_parse = reservation_collector.parse

    def counting_parse(text: str, *args: object, **kwargs: object) -> list[Reservation]:
        parsed.append(text)
        return real_parse(text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reservation_collector, "parse", counting_parse)
    exporter, registry = endpoint(path, Clock(NOW))
    try:
        assert served(registry) == {} and success(registry) == 1  # no file yet: no reservations
        reservations.add(path, reservation(), NOW)
        assert set(served(registry)) == {("gpu-srv-01", "0", "alice")}
        for _ in range(3):
            served(registry)
        assert len(parsed) == 1
        reservations.release(path, NOW, user="alice")
        assert served(registry) == {}
        assert len(parsed) == 2
    finally:
        exporter.close()


def test_a_broken_file_fails_the_collector_and_keeps_the_bookings_read_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "reservations.yml"
    reservations.write(path, [reservation()])
    exporter, registry = endpoint(path, Clock(NOW))
    try:
        assert set(served(registry)) == {("gpu-srv-01", "0", "alice")}
        path.write_text(path.read_text() + "- {host: n1, gpus: [0], user: b, until: soon}\n")
        assert set(served(registry)) == {("gpu-srv-01", "0", "alice")}
        assert success(registry) == 0
        served(registry)
        failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1, failures  # one line when it starts failing
        assert str(path) in failures[0] and "'soon' is not an ISO 8601 time" in failures[0]
        assert "serving the 1 bookings read before" in failures[0]
        reservations.write(path, [reservation(user="bob")])
        assert set(served(registry)) == {("gpu-srv-01", "0", "bob")}
        assert success(registry) == 1
    finally:
        exporter.close()


def test_the_exposition_passes_promtool(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.write(path, [reservation(gpus=(0, 1), comment='a "quoted", long\\ comment'),
                              reservation(host="ws-01", gpus=None, user="bob")])
    exporter, registry = endpoint(path, Clock(NOW))
    try:
        text = generate_latest(registry)
        assert encoding.text(registry) == text  # what the exporter serves, byte for byte
    finally:
        exporter.close()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert f'gpu="{ALL_GPUS}"'.encode() in text
    assert b'comment="a \\"quoted\\", long\\\\ comment"' in text


@pytest.mark.parametrize(("flags", "on"), [
    (["--reservations.file", "R"], True),
    (["--collector.reservation", "--reservations.file", "R"], True),
    (["--no-collector.reservation", "--reservations.file", "R"], False),
    ([], False),
])
def test_the_reservations_file_turns_the_collector_on(tmp_path: Path, flags: list[str],
                                                      on: bool) -> None:
    argv = [str(tmp_path / "r.yml") if f == "R" else f for f in flags]
    options = exporter_main.options_from_args(exporter_main.build_parser().parse_args(argv))
    names = [c.name for c in exporter_main.build_collectors(options, exporter_main.Sources())]
    assert names == ["gpu", "process", "xid"] + (["reservation"] if on else [])


def test_disable_defaults_leaves_the_collectors_turned_on_by_name() -> None:
    options = exporter_main.options_from_args(exporter_main.build_parser().parse_args(
        ["--collector.disable-defaults", "--collector.process"]))
    assert [c.name for c in exporter_main.build_collectors(options, exporter_main.Sources())] == \
        ["process"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--collector.reservation"], "--collector.reservation needs --reservations.file FILE"),
    (["--reservations.file", "/nonexistent/dir/r.yml"],
     "--reservations.file /nonexistent/dir/r.yml: the directory /nonexistent/dir does not "
     "exist"),
])
def test_the_endpoint_refuses_to_start_without_a_usable_file(
        capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    assert exporter_main.main(["--collector.disable-defaults", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"gpuwatch-exporter: error: {message}\n"

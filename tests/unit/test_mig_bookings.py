"""Bookings of MIG slices (issue 16): a booking holds cells, whole GPUs and slices ("0/7"), in
the file, the CLI's targets and text, and the reservation metrics; a whole GPU's booking holds
its slices. Old files read exactly as before."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import bcrypt
import pytest
import yaml
from cli_run import one_error, run
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.cli import client
from gpuwatch.cli import run as run_command
from gpuwatch.contract import metrics
from gpuwatch.fleet import ActiveReservation, GpuStatus, pick
from gpuwatch.reservations import Reservation, ReservationError, model
from gpuwatch.serve.app import start
from gpuwatch.serve.identity import Identity
from gpuwatch.serve.metrics import build_registry
from gpuwatch.serve.options import ServeOptions
from gpuwatch.serve.service import ApiError, Service
from tests.unit import test_serve

UTC = dt.timezone.utc
NOW = dt.datetime(2027, 1, 15, 12, 0, tzinfo=UTC)


def booking(gpus: str, user: str = "alice", host: str = "n1", days: float = 3,
            start_days: float | None = None) -> Reservation:
    return Reservation(host=host, gpus=reservations.parse_gpus(gpus), user=user,
                       until=NOW + dt.timedelta(days=days),
                       start=NOW + dt.timedelta(days=start_days) if start_days is not None
                       else None)


# -- what people write ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected", "written"), [
    ("0/7", (Cell(0, 7),), "0/7"),
    ("0/8,0/7", (Cell(0, 7), Cell(0, 8)), "0/7,0/8"),
    ("1, 0/7", (Cell(0, 7), Cell(1)), "1,0/7"),
    ("0-3,4/9", (Cell(0), Cell(1), Cell(2), Cell(3), Cell(4, 9)), "0-3,4/9"),
    ("2,1/3,1/2,2", (Cell(1, 2), Cell(1, 3), Cell(2)), "2,1/2,1/3"),
])
def test_slices_are_read_and_written_back_as_people_write_them(
        text: str, expected: tuple[Cell, ...], written: str) -> None:
    gpus = reservations.parse_gpus(text)
    assert gpus == expected
    assert reservations.gpus_text(gpus) == written
    assert reservations.parse_gpus(written) == gpus


@pytest.mark.parametrize(("text", "message"), [
    ("0/7-0/9", "not a list of GPUs: use all, 0,2, 0-3 or MIG slices as GPU/GPU-instance"),
    ("0-3/7", "not a list of GPUs"),
    ("0/", "not a list of GPUs"),
    ("0/7/1", "not a list of GPUs"),
    ("0/-1", "-1 is negative"),
    ("0/1024", "1024 is past the highest index gpuwatch accepts (1023)"),
    ("0,0/7", "0/7 is a slice of GPU 0, which is booked whole as well; name GPU 0 or its "
              "slices, not both"),
])
def test_a_bad_slice_is_one_line_that_says_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ReservationError) as e:
        reservations.parse_gpus(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_targets_name_slices() -> None:
    assert reservations.parse_target("n1:0/7,0/8") == ("n1", (Cell(0, 7), Cell(0, 8)))
    assert reservations.parse_target("[fe80::1]:0/7") == ("fe80::1", (Cell(0, 7),))
    assert reservations.parse_target("n1:all") == ("n1", None)


def test_describe_says_slice() -> None:
    assert booking("0/7").describe() == "slice 0/7 of n1 for alice until 2027-01-18 12:00+00:00"
    assert booking("0/7,0/8").describe().startswith("slices 0/7,0/8 of n1")
    assert booking("2,0/7").describe().startswith("GPUs 2,0/7 of n1")
    assert booking("0-1").describe().startswith("GPUs 0-1 of n1")


# -- the file -------------------------------------------------------------------------------

def test_a_slice_booking_is_written_quoted_and_read_back_by_both_readers(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    stored = reservations.add(path, booking("1,0/7,0/13"), NOW)
    text = path.read_text()
    assert "  gpus: ['0/7', '0/13', 1]\n" in text  # a GPU's slices right after it
    assert yaml.safe_load(text) == model._read_rendered(text)  # the fast reader agrees
    assert yaml.safe_load(text)["reservations"][0]["gpus"] == ["0/7", "0/13", 1]
    model._parsed.clear()
    assert reservations.load(path, NOW) == [stored]
    assert stored.to_api()["gpus"] == ["0/7", "0/13", 1]
    assert stored.to_json(NOW)["gpus"] == ["0/7", "0/13", 1]


@pytest.mark.parametrize("gpus", ["[0, 0/7]", "['0/7', 1]", "'0/7,1'", "'1, 0/7'"])
def test_a_hand_written_slice_reads_in_every_yaml_spelling(tmp_path: Path, gpus: str) -> None:
    path = tmp_path / "reservations.yml"
    expected = (Cell(0, 7), Cell(0)) if gpus == "[0, 0/7]" else (Cell(0, 7), Cell(1))
    path.write_text(f"reservations:\n- host: n1\n  gpus: {gpus}\n  user: bob\n"
                    "  until: '2027-05-31T00:00:00+00:00'\n")
    if gpus == "[0, 0/7]":
        with pytest.raises(ReservationError, match="0/7 is a slice of GPU 0, which is booked "
                           "whole as well"):
            reservations.load(path, NOW)
        return
    assert reservations.load(path, NOW)[0].gpus == tuple(sorted(expected, key=Cell.sort_key))


def test_an_old_file_reads_exactly_as_before(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text("reservations:\n- host: n1\n  gpus: [2, 0, 1]\n  user: bob\n"
                    "  until: '2027-05-31T00:00:00+00:00'\n- host: n2\n  gpus: all\n"
                    "  user: carol\n  until: 2027-05-31\n- host: n3\n  gpus: 4\n  user: dan\n"
                    "  until: '2027-05-31T00:00:00+00:00'\n")
    found = reservations.load(path, NOW, UTC)
    assert [(b.host, reservations.gpus_text(b.gpus)) for b in found] == [
        ("n1", "0-2"), ("n2", "all"), ("n3", "4")]
    assert [b.to_api()["gpus"] for b in found] == [[0, 1, 2], "all", [4]]
    again = reservations.load(path, NOW, UTC)
    assert [b.id for b in again] == [b.id for b in found]  # derived ids, stable as before


@pytest.mark.parametrize(("raw", "message"), [
    ("['7']", "'7' is not a GPU: write an index as a number (0) and a MIG slice as"),
    ("[0, true]", "expected a list of GPU indices and MIG slices"),
    ("['0/x']", "not a list of GPUs"),
])
def test_a_bad_slice_in_the_file_names_the_file_and_the_entry(
        tmp_path: Path, raw: str, message: str) -> None:
    path = tmp_path / "reservations.yml"
    path.write_text(f"reservations:\n- host: n1\n  gpus: {raw}\n  user: bob\n"
                    "  until: '2027-05-31T00:00:00+00:00'\n")
    with pytest.raises(ReservationError) as e:
        reservations.load(path, NOW)
    text = str(e.value)
    assert text.startswith(f"{path}: reservations[0] (bob on n1): gpus") and message in text
    assert "\n" not in text


# -- conflicts ------------------------------------------------------------------------------

def test_a_whole_gpu_and_its_slices_conflict_and_sibling_slices_do_not(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    reservations.add(path, booking("0/7"), NOW)
    reservations.add(path, booking("0/8", user="bob"), NOW)  # another slice: fine
    reservations.add(path, booking("1", user="bob"), NOW)
    with pytest.raises(reservations.Conflict) as e:
        reservations.add(path, booking("0", user="carol"), NOW)
    assert str(e.value) == (f"{path}: slice 0/7 of n1 is already booked: slice 0/7 of n1 for "
                            "alice until 2027-01-18 12:00+00:00; ask them, or pick other GPUs")
    with pytest.raises(reservations.Conflict, match="slice 1/9 of n1 is already booked: GPU 1"):
        reservations.add(path, booking("1/9", user="carol"), NOW)
    with pytest.raises(reservations.Conflict, match="slice 0/7 of n1 is already booked"):
        reservations.add(path, booking("all", user="carol"), NOW)
    # after the slices' bookings end, GPU 0 may be booked whole
    reservations.add(path, booking("0", user="carol", start_days=3, days=5), NOW)
    assert len(reservations.load(path, NOW)) == 4


def test_a_file_with_a_gpu_and_its_slice_booked_at_once_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    text = model.render([booking("0/7"), booking("0/8", user="bob"),
                         booking("0", user="carol", start_days=1)])
    with pytest.raises(ReservationError) as e:
        model.parse(text, path, NOW)
    assert str(e.value) == (
        f"{path}: two bookings of the same GPU at the same time: slice 0/7 of n1 for alice "
        "until 2027-01-18 12:00+00:00 and GPU 0 of n1 for carol until 2027-01-18 12:00+00:00; "
        "change or remove one of them")
    model.parse(model.render([booking("0/7"), booking("0/8", user="bob")]), path, NOW)


def test_the_indexed_overlap_check_agrees_with_every_pair_for_slices() -> None:
    import random
    rng = random.Random(16)
    choices = ["0", "1", "0/7", "0/8", "1/2", "all", "0/7,1", "0/8,1/2"]
    for _ in range(300):
        booked = [booking(rng.choice(choices), user=f"u{i}", days=rng.uniform(-1, 6),
                          start_days=None if rng.random() < 0.3 else rng.uniform(-2, 5))
                  for i in range(rng.randint(0, 6))]
        booked = [b for b in booked if b.start is None or b.start < b.until]
        clash = any(a.overlaps(b) for i, a in enumerate(booked) for b in booked[i + 1:]
                    if not a.expired(NOW) and not b.expired(NOW))
        try:
            model.check_overlaps(booked, "f", NOW)
            found = False
        except ReservationError:
            found = True
        assert found == clash, [b.describe() for b in booked]


# -- giving back ----------------------------------------------------------------------------

def test_releasing_a_slice_keeps_the_others_and_a_whole_gpu_is_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    first = reservations.add(path, booking("1,0/7,0/8"), NOW)
    done = reservations.release(path, NOW, host="n1", gpus=reservations.parse_gpus("0/7"))
    assert done.removed == [first]
    kept = reservations.find(path, first.id, NOW)
    assert reservations.gpus_text(kept.gpus) == "1,0/8"
    with pytest.raises(ReservationError) as e:
        reservations.release(path, NOW, host="n1", gpus=reservations.parse_gpus("1/2"))
    assert str(e.value) == (f"{path}: GPUs 1,0/8 of n1 for alice until 2027-01-18 12:00+00:00 "
                            "books GPU 1 whole; release n1:1, then book the slices to keep")
    reservations.release(path, NOW, host="n1", gpus=reservations.parse_gpus("1"))
    assert reservations.gpus_text(reservations.find(path, first.id, NOW).gpus) == "0/8"


# -- the command, with --file ---------------------------------------------------------------

def test_reserve_list_and_release_slices(rfile: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    code, out = run("reserve", "n1:0/7,0/8", "--until", "2099-05-31T18:00+02:00")
    assert (code, out) == (0, "booked slices 0/7,0/8 of n1 for alice until "
                              "2099-05-31 18:00+02:00\n")
    code, out = run("reservations")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["n1", "0/7,0/8", "alice"]
    code, out = run("reservations", "--json")
    assert json.loads(out)[0]["gpus"] == ["0/7", "0/8"]
    err = one_error(capsys, "reserve", "n1:0", "--until", "+1d", "--user", "bob")
    assert "slices 0/7,0/8 of n1 are already booked: slices 0/7,0/8 of n1 for alice" in err
    err = one_error(capsys, "reserve", "n1:0/7-0/9", "--until", "+1d")
    assert "MIG slices as GPU/GPU-instance (0/7,0/8)" in err
    code, out = run("release", "n1:0/8")
    assert (code, out) == (0, "released slice 0/8 of n1 for alice until 2099-05-31 "
                              "18:00+02:00; slice 0/7 stays booked\n")
    assert reservations.gpus_text(reservations.load(rfile, NOW)[0].gpus) == "0/7"


# -- the service: bookings and claims of slices against the fleet ---------------------------

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ALICE = Identity("alice", via="proxy header", client="127.0.0.1")
BOB = Identity("bob", via="proxy header", client="127.0.0.1")
GB = 1e9


def cell(host: str, index: int, instance: int | None = None, state: str = "free",
         users: tuple[str, ...] = (), profile: str | None = None,
         memory_gb: float = 80.0) -> GpuStatus:
    """A whole GPU, or (with `instance`) a MIG slice of A100 `index`, as the fleet reads it."""
    slice_ = instance is not None
    return GpuStatus(
        host=host, instance=f"{host}:9839", gpu=index, uuid=f"GPU-{host}-{index}", state=state,
        users=users, model="NVIDIA A100-SXM4-80GB",
        display_name=f"A100-SXM4-80GB {profile}" if slice_ else "A100-SXM4-80GB",
        memory_used_bytes=0.0, memory_total_bytes=memory_gb * GB,
        utilization_ratio=None if slice_ else 0.0, inactive_since=None,
        gpu_instance_id=instance, profile=profile if slice_ else None,
        mig_uuid=f"MIG-{host}-{index}-{instance}" if slice_ else None)


def mig_fleet() -> list[GpuStatus]:
    """n1: GPU 0 in 1g.10gb slices 7, 8, 9 (9 busy), GPU 1 with a 3g.40gb (2) and a 1g.10gb
    (9), GPU 2 and 3 whole."""
    return [cell("n1", 0, 7, profile="1g.10gb", memory_gb=10),
            cell("n1", 0, 8, profile="1g.10gb", memory_gb=10),
            cell("n1", 0, 9, state="busy", users=("carol",), profile="1g.10gb", memory_gb=10),
            cell("n1", 1, 2, profile="3g.40gb", memory_gb=40),
            cell("n1", 1, 9, profile="1g.10gb", memory_gb=10),
            cell("n1", 2), cell("n1", 3)]


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service(tmp_path: Path) -> Service:
    gpus = mig_fleet()
    made = Service(tmp_path / "reservations.yml", lambda: list(gpus), clock=Clock())
    made.gpus = gpus  # type: ignore[attr-defined]  # what the tests change
    return made


def refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as e:
        call()
    assert "\n" not in e.value.message
    return e.value.status, e.value.message


def test_a_slice_booking_must_name_a_slice_the_fleet_has(service: Service) -> None:
    made = service.create_reservation(ALICE, {"host": "n1", "gpus": ["0/7", "0/8"],
                                              "until": "+2h"})
    assert made["gpus"] == ["0/7", "0/8"]
    assert service.create_reservation(BOB, {"host": "n1", "gpus": "1/9", "until": "+2h"}
                                      )["gpus"] == ["1/9"]
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": ["0/3"], "until": "+2h"}))
    assert status == 400 and message.endswith("; it has no slice 0/3")
    assert "GPUs 2-3,0/7,0/8,0/9,1/2,1/9" in message
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": ["2/1"], "until": "+2h"}))  # GPU 2 has no MIG
    assert status == 400 and message.endswith("it has no slice 2/1")
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": [4], "until": "+2h"}))
    assert status == 400 and message.endswith("it has no GPU 4")
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": ["0"], "until": "+2h"}))
    assert status == 400 and "'0' is not a GPU: write an index as a number" in message


def test_a_mig_gpus_index_books_its_slices_and_overlaps_their_bookings(service: Service
                                                                       ) -> None:
    service.create_reservation(ALICE, {"host": "n1", "gpus": ["0/7"], "until": "+2h"})
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": [0], "until": "+2h"}))
    assert status == 409 and message.startswith("slice 0/7 of n1 is already booked: slice "
                                                "0/7 of n1 for alice")
    whole = service.create_reservation(BOB, {"host": "n1", "gpus": "1", "until": "+2h"})
    assert whole["gpus"] == [1]  # GPU 1 is MIG-enabled: the booking covers 1/2 and 1/9
    status, message = refusal(lambda: service.create_reservation(
        ALICE, {"host": "n1", "gpus": ["1/2"], "until": "+2h"}))
    assert status == 409 and "is already booked: GPU 1 of n1 for bob" in message
    # a claim takes what the asker booked first, and never what someone else booked
    claim = service.create_claim(ALICE, {"host": "n1", "count": 1, "model": "1g.10gb"})
    assert claim["gpus"] == ["0/7"]  # hers, before the free 0/8
    status, _ = refusal(lambda: service.create_claim(
        ALICE, {"host": "n1", "count": 1, "model": "3g.40gb"}))  # 1/2: bob's GPU 1
    assert status == 409
    bob_claim = service.create_claim(BOB, {"host": "n1", "count": 1, "model": "3g.40gb"})
    assert bob_claim["gpus"] == ["1/2"] and bob_claim["uuids"] == ["MIG-n1-1-2"]


def test_a_claim_takes_whole_gpus_first_and_a_slice_only_for_one(service: Service) -> None:
    first = service.create_claim(ALICE, {"host": "n1", "count": 2})
    assert (first["gpus"], first["uuids"]) == ([2, 3], ["GPU-n1-2", "GPU-n1-3"])
    # no whole GPU left: a count of 1 gets a slice, the most memory first
    one = service.create_claim(ALICE, {"host": "n1", "count": 1})
    assert (one["gpus"], one["uuids"]) == (["1/2"], ["MIG-n1-1-2"])
    small = service.create_claim(BOB, {"host": "n1", "count": 1, "model": "1G.10GB"})
    assert (small["gpus"], small["uuids"]) == (["0/7"], ["MIG-n1-0-7"])
    status, message = refusal(lambda: service.create_claim(BOB, {"host": "n1", "count": 2}))
    assert status == 409 and message == ("n1 has 0 GPUs and 2 MIG slices, one per process "
                                         "(-n 1) free to claim (of 7), 2 wanted")
    by_display = service.create_claim(BOB, {"host": "n1", "count": 1,
                                            "model": "A100-SXM4-80GB 1g.10gb"})
    assert by_display["gpus"] == ["0/8"]  # 0/9 is busy (carol), 0/7 claimed
    listed = {c["id"]: c["gpus"] for c in service.list_claims()}
    assert listed[small["id"]] == ["0/7"] and listed[first["id"]] == [2, 3]


def test_a_model_only_slices_match_is_refused_for_more_than_one(service: Service) -> None:
    status, message = refusal(lambda: service.create_claim(
        ALICE, {"host": "n1", "count": 2, "model": "1g.10gb"}))
    assert status == 409 and message == ("'1g.10gb' names MIG slices of n1: CUDA runs one MIG "
                                         "slice per process; ask for -n 1")
    status, message = refusal(lambda: service.create_claim(
        ALICE, {"host": "n1", "count": 1, "model": "7g.80gb"}))
    assert status == 409 and message == "n1 has no GPU of the model '7g.80gb'"


def test_a_mig_enabled_gpu_itself_is_never_claimed(service: Service) -> None:
    # rules older than MIG could still show the parent as a cell: never hand it out
    service.gpus.append(cell("n1", 0))  # type: ignore[attr-defined]
    service.gpus[5:7] = []  # type: ignore[attr-defined]  # no whole GPU free
    claim = service.create_claim(ALICE, {"host": "n1", "count": 1})
    assert claim["gpus"] == ["1/2"]
    status, _ = refusal(lambda: service.create_claim(ALICE, {"host": "n1", "count": 2}))
    assert status == 409


def test_claims_and_bookings_of_a_gpu_and_its_slices_exclude_each_other(service: Service
                                                                        ) -> None:
    claim = service.create_claim(ALICE, {"host": "n1", "count": 1, "model": "3g.40gb"})
    status, message = refusal(lambda: service.create_reservation(
        BOB, {"host": "n1", "gpus": [1], "until": "+2h"}))
    assert status == 409 and message.startswith("slice 1/2 of n1 is claimed by alice until")
    service.create_reservation(BOB, {"host": "n1", "gpus": ["1/9"], "until": "+2h"})
    service.delete_claim(ALICE, claim["id"])
    taken = [service.create_claim(ALICE, {"host": "n1", "count": 1, "model": "1g.10gb"})
             ["gpus"] for _ in range(2)]
    assert taken == [["0/7"], ["0/8"]]
    status, _ = refusal(lambda: service.create_claim(
        ALICE, {"host": "n1", "count": 1, "model": "1g.10gb"}))
    assert status == 409  # 0/9 is busy, 1/9 booked by bob


def test_a_slice_claim_ends_once_its_owner_runs_on_that_slice(service: Service) -> None:
    claim = service.create_claim(ALICE, {"host": "n1", "count": 1, "model": "1g.10gb"})
    assert claim["gpus"] == ["0/7"]
    gpus: list[GpuStatus] = service.gpus  # type: ignore[attr-defined]
    # alice on a sibling slice, or on the parent's other slice, does not count
    gpus[1] = replace(gpus[1], users=("alice",), state="busy")
    assert service.end_claims_in_use() == []
    gpus[0] = replace(gpus[0], users=("alice",), state="busy")
    assert [c.id for c in service.end_claims_in_use()] == [claim["id"]]
    assert service.list_claims() == []


def test_metrics_label_booked_and_claimed_slices_by_their_cell(service: Service,
                                                               tmp_path: Path) -> None:
    service.create_reservation(ALICE, {"host": "n1", "gpus": ["0/7", 2], "until": "+2h"})
    service.create_reservation(BOB, {"host": "n1", "gpus": [1], "until": "+2h"})
    claim = service.create_claim(BOB, {"host": "n1", "count": 1, "model": "1g.10gb"})
    assert claim["gpus"] == ["1/9"]  # his booking of GPU 1 holds 1/9: his before a free one
    registry, exporter = build_registry(service.path, service.claims, service.clock,
                                        own_process_metrics=False)
    try:
        samples = [s for f in registry.collect() for s in f.samples]
    finally:
        exporter.close()
    booked = sorted((s.labels["gpu"], s.labels["user"]) for s in samples
                    if s.name == metrics.RESERVATION_END.name)
    claimed = [(s.labels["gpu"], s.labels["user"], s.labels["id"]) for s in samples
               if s.name == metrics.CLAIM_END.name]
    assert booked == [("0/7", "alice"), ("1", "bob"), ("2", "alice")]
    assert claimed == [("1/9", "bob", claim["id"])]


def test_over_http_a_slice_is_booked_and_served_on_metrics(tmp_path: Path) -> None:
    fleet = test_serve.Fleet(mig_fleet())
    with test_serve.serving(tmp_path, fleet, test_serve.Clock()) as s:
        client = test_serve.Client(s)
        status, made = test_serve.book(client, "alice", gpus=["0/7"], host="n1")
        assert status == 201 and made["gpus"] == ["0/7"]
        status, answer = test_serve.book(client, "bob", gpus="0", host="n1")
        assert status == 409 and "slice 0/7 of n1 is already booked" in \
            test_serve.one_line_error(answer)
        status, claim = client.json("POST", "/api/v1/claims",
                                    {"host": "n1", "count": 1, "model": "1g.10gb"}, user="bob")
        assert status == 201 and (claim["gpus"], claim["uuids"]) == (["0/8"], ["MIG-n1-0-8"])
        status, _, page = client.call("GET", "/metrics")
    assert status == 200
    served = {(s.name, s.labels["gpu"], s.labels["user"])
              for f in text_string_to_metric_families(page.decode()) for s in f.samples
              if s.name in (metrics.RESERVATION_END.name, metrics.CLAIM_END.name)}
    assert served == {(metrics.RESERVATION_END.name, "0/7", "alice"),
                      (metrics.CLAIM_END.name, "0/8", "bob")}


def test_run_reads_a_slice_claim_and_names_the_slice() -> None:
    held = run_command.Claim.from_api(
        {"id": "c1", "host": "n1", "gpus": ["0/7"], "uuids": ["MIG-n1-0-7"], "user": "alice",
         "until": "2027-01-15T08:05:00+00:00"}, "http://127.0.0.1:1")
    assert held.gpus == (Cell(0, 7),)
    assert held.describe() == "slice 0/7 of n1 for alice until 2027-01-15 08:05+00:00"
    whole = run_command.Claim.from_api(
        {"id": "c2", "host": "n1", "gpus": [2, 3], "uuids": ["GPU-2", "GPU-3"], "user": "bob",
         "until": "2027-01-15T08:05:00+00:00"}, "http://127.0.0.1:1")
    assert whole.describe().startswith("GPUs 2,3 of n1 for bob")
    with pytest.raises(client.ServiceError, match="answered a claim the client cannot read"):
        run_command.Claim.from_api(
            {"id": "c3", "host": "n1", "gpus": ["0"], "uuids": ["GPU-0"], "user": "bob",
             "until": "2027-01-15T08:05:00+00:00"}, "http://127.0.0.1:1")


def test_the_commands_book_release_and_run_on_slices_through_the_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    password = "pw-alice-s3cret"
    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n  alice: " + bcrypt.hashpw(
        password.encode(), bcrypt.gensalt(rounds=4)).decode() + "\n")
    gpus = mig_fleet()
    options = ServeOptions(reservations_file=tmp_path / "reservations.yml",
                           listen_address="127.0.0.1:0", web_config_file=config,
                           own_process_metrics=False, claim_poll_seconds=3600)
    monkeypatch.delenv(reservations.ENV_FILE, raising=False)
    monkeypatch.setenv(client.ENV_USER, "alice")
    monkeypatch.setenv(client.ENV_PASSWORD, password)
    monkeypatch.setenv(client.ENV_NETRC, str(tmp_path / "none"))
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    with start(options, fleet=lambda: gpus) as s:
        monkeypatch.setenv(client.ENV_SERVER, s.url)
        code, out = run("reserve", "n1:0/7,0/8", "--until", "+1d")
        assert code == 0 and out.startswith("booked slices 0/7,0/8 of n1 for alice until "), out
        assert "it has no slice 0/3" in one_error(capsys, "reserve", "n1:0/3", "--until", "+1d")
        code, out = run("release", "n1:0/8")
        assert code == 0 and out.startswith("released slice 0/8 of n1 for alice until ") and \
            out.endswith("; slice 0/7 stays booked\n"), out
        (kept,) = json.loads(run("reservations", "--json")[1])
        assert kept["gpus"] == ["0/7"]
        code, _ = run("run", "-n", "1", "--host", "n1", "--model", "1g.10gb", "--", "sh", "-c",
                      'test "$CUDA_VISIBLE_DEVICES" = MIG-n1-0-7')  # her booked slice
        assert code == 0 and "claimed slice 0/7 of n1 for alice" in capsys.readouterr().err
        assert "ask for -n 1" in one_error(capsys, "run", "-n", "2", "--host", "n1", "--model",
                                           "1g.10gb", "--", "true")


def test_a_claim_takes_a_booked_slice_before_a_free_whole_gpu_as_pick_does(service: Service
                                                                          ) -> None:
    """One order for gpuwatch pick and gpuwatch serve's claims (fleet.choose): what the asker
    booked before what is free, even a slice before a whole GPU."""
    service.create_reservation(ALICE, {"host": "n1", "gpus": ["1/9"], "until": "+2h"})
    hers = ActiveReservation(user="alice", until="2027-01-15T10:00:00+00:00",
                             until_timestamp=START + 7200, comment="")
    booked = [replace(g, state="reserved", reservation=hers) if str(g.cell) == "1/9" else g
              for g in service.fleet()]
    service.gpus[:] = booked  # type: ignore[attr-defined]  # the rules show it reserved
    claim = service.create_claim(ALICE, {"host": "n1", "count": 1})
    assert claim["gpus"] == ["1/9"]
    assert [str(g.cell) for g in pick(booked, 1, user="alice")] == ["1/9"]
    assert service.create_claim(BOB, {"host": "n1", "count": 1})["gpus"] == [2]

"""Bookings of MIG slices (issue 16): a booking holds cells, whole GPUs and slices ("0/7"), in
the file, the CLI's targets and text, and the reservation metrics; a whole GPU's booking holds
its slices. Old files read exactly as before."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path

import pytest
import yaml
from cli_run import one_error, run

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.reservations import Reservation, ReservationError, model

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

@pytest.fixture
def rfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "reservations.yml"
    monkeypatch.setenv(reservations.ENV_FILE, str(path))
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    return path


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

"""gpuwatch.cells: how a whole GPU and a MIG slice are written, read and compared."""

from __future__ import annotations

import pytest

from gpuwatch.cells import Cell


@pytest.mark.parametrize(("text", "cell"), [("0", Cell(0)), (" 3 ", Cell(3)),
                                            ("0/7", Cell(0, 7)), ("12/0", Cell(12, 0))])
def test_parse(text: str, cell: Cell) -> None:
    assert Cell.parse(text) == cell
    assert Cell.parse(str(cell)) == cell


@pytest.mark.parametrize("text", ["", "a", "-1", "0/", "/7", "0/7/0", "0.5", "1e3", "99999",
                                  "0/x", "MIG-0"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected an index"):
        Cell.parse(text)


def test_bounds() -> None:
    with pytest.raises(ValueError, match="from 0 to 1023"):
        Cell.parse("1024")
    with pytest.raises(ValueError, match="GPU instance id"):
        Cell(0, 5000)
    with pytest.raises(ValueError):
        Cell(True)  # type: ignore[arg-type]


def test_json_round_trip() -> None:
    assert Cell(2).to_json() == 2
    assert Cell(0, 7).to_json() == "0/7"
    for cell in (Cell(2), Cell(0, 7)):
        assert Cell.from_json(cell.to_json()) == cell
    for bad in ("2", 2.0, None, True, [0], "0/x"):
        with pytest.raises(ValueError):
            Cell.from_json(bad)


def test_covers_and_overlaps() -> None:
    whole, slice_, other = Cell(0), Cell(0, 7), Cell(0, 8)
    assert whole.covers(slice_) and not slice_.covers(whole)
    assert whole.overlaps(slice_) and slice_.overlaps(whole)
    assert not slice_.overlaps(other)
    assert not Cell(1).overlaps(slice_)
    assert slice_.whole == whole


def test_sorted_slices_follow_their_gpu() -> None:
    cells = [Cell(1), Cell(0, 9), Cell(0), Cell(0, 7)]
    assert sorted(cells, key=Cell.sort_key) == [Cell(0), Cell(0, 7), Cell(0, 9), Cell(1)]


def test_labels() -> None:
    assert Cell(0).labels() == {"gpu": "0"}
    assert Cell(0, 7).labels() == {"gpu": "0", "gpu_instance_id": "7"}
    assert Cell.from_labels({"gpu": "0", "gpu_instance_id": "7"}) == Cell(0, 7)
    assert Cell.from_labels({"gpu": "3"}) == Cell(3)
    assert Cell.from_labels({"gpu": "all"}) is None
    assert Cell.from_labels({}) is None


def test_labels_of_a_rules_record() -> None:
    """The recording rules write a slice's cell text in gpu, beside gpu_instance_id."""
    assert Cell.from_labels({"gpu": "0/7", "gpu_instance_id": "7"}) == Cell(0, 7)
    assert Cell.from_labels({"gpu": "0/7"}) == Cell(0, 7)
    assert Cell.from_labels({"gpu": "0/7", "gpu_instance_id": "8"}) is None

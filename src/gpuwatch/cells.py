"""A cell of the grid: a whole GPU, or one MIG slice of a MIG-enabled GPU.

A whole GPU is its NVML index (``0``); a slice is its parent's index and its GPU instance id,
as nvidia-smi numbers them, written ``GPU/GI`` (``0/7``). That is how people write a slice
(``gpuwatch reserve node1:0/7``), how JSON carries it (the index as a number, a slice as the
string ``"0/7"``) and how the series label it (``gpu="0"``, plus ``gpu_instance_id="7"`` for
a slice, as the exporter serves them). A MIG-enabled GPU itself is not a cell: CUDA runs on
its slices, not on it; a booking of the whole GPU covers every slice of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpuwatch.contract.metrics import MIG_PROCESS_LABEL

MAX_INDEX = 1023
"""The highest GPU index and GPU instance id taken (NVML's are far below)."""
_CELL = re.compile(r"(\d{1,4})(?:/(\d{1,4}))?")


@dataclass(frozen=True)
class Cell:
    gpu: int
    """The GPU's NVML index; for a slice, its parent's."""
    instance: int | None = None
    """The slice's GPU instance id (``gpu_instance_id``); None for a whole GPU."""

    def __post_init__(self) -> None:
        for what, n in (("GPU index", self.gpu), ("GPU instance id", self.instance)):
            if n is not None and (type(n) is not int or not 0 <= n <= MAX_INDEX):
                raise ValueError(f"{what} {n!r}: expected a whole number from 0 to {MAX_INDEX}")

    @property
    def is_slice(self) -> bool:
        return self.instance is not None

    @property
    def whole(self) -> Cell:
        """The GPU this cell is (a whole GPU) or is a slice of."""
        return Cell(self.gpu)

    def __str__(self) -> str:
        return str(self.gpu) if self.instance is None else f"{self.gpu}/{self.instance}"

    def sort_key(self) -> tuple[int, int]:
        """Slices right after their GPU, by GPU instance id."""
        return self.gpu, -1 if self.instance is None else self.instance

    def covers(self, other: Cell) -> bool:
        """Whether holding this cell holds `other`: the same cell, or `other` is a slice of
        this whole GPU."""
        return self == other or (self.instance is None and other.gpu == self.gpu)

    def overlaps(self, other: Cell) -> bool:
        """Whether two cells share hardware (one covers the other)."""
        return self.covers(other) or other.covers(self)

    def to_json(self) -> int | str:
        """An index for a whole GPU, "GPU/GI" for a slice."""
        return self.gpu if self.instance is None else str(self)

    def labels(self) -> dict[str, str]:
        """The labels of its series: gpu, and gpu_instance_id for a slice."""
        out = {"gpu": str(self.gpu)}
        if self.instance is not None:
            out[MIG_PROCESS_LABEL] = str(self.instance)
        return out

    @classmethod
    def parse(cls, text: str) -> Cell:
        """``0`` or ``0/7``; ValueError that says what is expected."""
        found = _CELL.fullmatch(text.strip())
        if not found:
            raise ValueError(f"{text.strip()[:40]!r} is not a GPU: expected an index (0) or a "
                             "MIG slice as GPU/GPU-instance (0/7)")
        gpu, instance = found.group(1), found.group(2)
        return cls(int(gpu), int(instance) if instance is not None else None)

    @classmethod
    def from_json(cls, raw: object) -> Cell:
        """An index (0) or a slice ("0/7") as JSON has it; ValueError otherwise."""
        if type(raw) is int:
            return cls(raw)
        if isinstance(raw, str) and "/" in raw:
            return cls.parse(raw)
        raise ValueError(f"{str(raw)[:40]!r} is not a GPU: expected an index (0) or a MIG "
                         "slice as \"GPU/GPU-instance\" (\"0/7\")")

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Cell | None:
        """The cell of a series: an exporter's (gpu, and gpu_instance_id for a slice) or a
        recording rule's (gpu the cell text, "0/7", beside gpu_instance_id); None when its
        labels are not one."""
        gpu, instance = labels.get("gpu", ""), labels.get(MIG_PROCESS_LABEL, "")
        try:
            cell = cls.parse(gpu if "/" in gpu or not instance else f"{gpu}/{instance}")
        except ValueError:
            return None
        if instance and (not instance.isdigit() or int(instance) != cell.instance):
            return None  # a cell text and an instance id that disagree
        return cell

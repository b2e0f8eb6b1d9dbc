"""MIG slices as cells of the fleet: gpuwatch.fleet reads them from the rules and the
exporter's series, `gpuwatch status` shows them under their GPU, `gpuwatch pick` hands one out
by its MIG UUID."""

from __future__ import annotations

import pytest

from gpuwatch import fleet
from gpuwatch.cells import Cell
from gpuwatch.contract import states


def status(gpu: int = 0, instance: int | None = None, *, model: str = "NVIDIA A100-SXM4-80GB",
           display_name: str = "A100-SXM4-80GB", profile: str | None = None,
           state: str = states.FREE.name, memory_total: float | None = None) -> fleet.GpuStatus:
    return fleet.GpuStatus(
        host="node-a", instance="node-a:9839", gpu=gpu, uuid=f"GPU-{gpu}", state=state,
        users=(), model=model, display_name=display_name, memory_used_bytes=0.0,
        memory_total_bytes=memory_total, utilization_ratio=None, inactive_since=None,
        gpu_instance_id=instance, profile=profile,
        mig_uuid=None if instance is None else f"MIG-{gpu}-{instance}")


def test_a_status_is_a_whole_gpu_cell_unless_it_has_a_gpu_instance() -> None:
    assert status(3).cell == Cell(3)
    assert status(0, 7, profile="1g.10gb").cell == Cell(0, 7)
    assert str(status(0, 7, profile="1g.10gb").cell) == "0/7"


@pytest.mark.parametrize(("model", "matches"), [
    ("a100", True), ("NVIDIA A100", True), ("A100-SXM4-80GB", True), ("h100", False),
    ("1g.10gb", False)])
def test_a_whole_gpu_matches_part_of_its_model_or_its_display_name(model: str,
                                                                   matches: bool) -> None:
    assert fleet.matches_model(status(0), model) is matches


@pytest.mark.parametrize(("model", "matches"), [
    ("1g.10gb", True), ("1G.10GB", True), (" 1g.10gb ", True),
    ("A100-SXM4-80GB 1g.10gb", True), ("a100-sxm4-80gb 1G.10gb", True),
    ("1g", False), ("10gb", False), ("2g.20gb", False), ("a100", False),
    ("A100-SXM4-80GB", False)])
def test_a_slice_matches_its_profile_exactly_or_its_display_name(model: str,
                                                                  matches: bool) -> None:
    piece = status(0, 7, profile="1g.10gb", display_name="A100-SXM4-80GB 1g.10gb")
    assert fleet.matches_model(piece, model) is matches

"""MIG slices as cells of the fleet: gpuwatch.fleet reads them from the rules and the
exporter's series, `gpuwatch status` shows them under their GPU, `gpuwatch pick` hands one out
by its MIG UUID."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from cli_run import one_error, run
from seriesprom import SeriesPrometheus

from gpuwatch import fleet
from gpuwatch.cells import Cell
from gpuwatch.cli import common
from gpuwatch.contract import metrics, states
from gpuwatch.fleet.prometheus import Sample


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


# -- a MIG node as the rules and the exporter publish it ----------------------------------------

GIB = float(1 << 30)
END = 4_102_444_800.0  # 2100-01-01T00:00:00Z
A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"


def ids(host: str, gpu: int) -> dict[str, str]:
    return {"job": states.JOB, "instance": f"{host}:9839", "host": host, "gpu": str(gpu),
            "uuid": f"GPU-{host}-{gpu}"}


def add_parent(prom: SeriesPrometheus, host: str, gpu: int, model: str, *, up: bool = True,
               mig: bool = True, temperature: float = 66.0) -> None:
    """A GPU's own series (the exporter's): with MIG on, no state of its own."""
    prom.add(metrics.UP.name, 1 if up else 0, **ids(host, gpu))
    prom.add(metrics.INFO.name, 1, **ids(host, gpu), name=model,
             display_name=model.removeprefix("NVIDIA "),
             mig_mode="enabled" if mig else "disabled")
    prom.add(metrics.TEMPERATURE.name, temperature, **ids(host, gpu))
    prom.add(metrics.MEMORY_TOTAL.name, 80 * GIB, **ids(host, gpu))
    prom.add(metrics.MEMORY_USED.name, 30 * GIB, **ids(host, gpu))
    prom.add(metrics.UTILIZATION.name, 0.85, **ids(host, gpu))


def add_slice(prom: SeriesPrometheus, host: str, gpu: int, instance: int, profile: str,
              state: states.State, users: str = "", *, model: str = A100,
              total_gib: float = 10, used_gib: float = 0.002,
              processes: tuple[tuple[int, str, float, float], ...] = (),
              reservation: str | None = None, claim: tuple[str, str] | None = None,
              labelled: bool = True) -> None:
    """A slice: its cell series (the rules: gpu="G/I") and raw series (the exporter: gpu="G",
    gpu_instance_id="I"); processes: (pid, user, memory GiB, start); labelled: whether the
    state rule carries profile and mig_uuid (else only nvidia_gpu_mig_info has them)."""
    raw = {**ids(host, gpu), "gpu_instance_id": str(instance)}
    cell = {**raw, "gpu": f"{gpu}/{instance}"}
    mig_uuid = f"MIG-{host}-{gpu}-{instance}"
    prom.add(states.STATE_INFO, 1, **cell, state=state.name, model=model,
             **({"profile": profile, "mig_uuid": mig_uuid} if labelled else {}),
             **({"users": users} if users else {}))
    prom.add(metrics.MIG_INFO.name, 1, **raw, compute_instance_id="0", profile=profile,
             mig_uuid=mig_uuid)
    prom.add(metrics.MIG_MEMORY_TOTAL.name, total_gib * GIB, **raw)
    prom.add(metrics.MIG_MEMORY_USED.name, used_gib * GIB, **raw)
    for pid, user, memory, start in processes:
        process = {**raw, "pid": str(pid), "user": user, "command": "python"}
        prom.add(metrics.PROCESS_MEMORY.name, memory * GIB, **process)
        prom.add(metrics.PROCESS_START.name, start, **process)
    if reservation is not None:
        prom.add(states.RESERVED_UNTIL, END, **cell, user=reservation,
                 until="2100-01-01T00:00:00+00:00")
    if claim is not None:
        prom.add(states.CLAIMED_UNTIL, END, **cell, user=claim[0], id=claim[1])


def add_whole(prom: SeriesPrometheus, host: str, gpu: int, state: states.State,
              users: str = "", processes: tuple[tuple[int, str, float, float], ...] = ()
              ) -> None:
    """A GPU without MIG: its state, and its processes without gpu_instance_id."""
    add_parent(prom, host, gpu, H100, mig=False, temperature=69.0)
    prom.add(states.STATE_INFO, 1, **ids(host, gpu), state=state.name, model=H100,
             **({"users": users} if users else {}))
    for pid, user, memory, start in processes:
        process = {**ids(host, gpu), "pid": str(pid), "user": user, "command": "train"}
        prom.add(metrics.PROCESS_MEMORY.name, memory * GIB, **process)
        prom.add(metrics.PROCESS_START.name, start, **process)


@pytest.fixture
def mig_fleet() -> SeriesPrometheus:
    prom = SeriesPrometheus()
    # node-a GPU 0: an A100 in 1g.10gb slices
    add_parent(prom, "node-a", 0, A100)
    add_slice(prom, "node-a", 0, 7, "1g.10gb", states.BUSY, "grace", used_gib=8.3,
              processes=((51001, "grace", 8.0, 1_799_992_800.0),))
    add_slice(prom, "node-a", 0, 8, "1g.10gb", states.BUSY, "heidi", used_gib=9.3,
              processes=((51002, "heidi", 3.0, 1_799_998_200.0),
                         (51004, "heidi", 6.0, 1_799_999_400.0)))
    add_slice(prom, "node-a", 0, 11, "1g.10gb", states.FREE, labelled=False)
    add_slice(prom, "node-a", 0, 12, "1g.10gb", states.FREE)
    add_slice(prom, "node-a", 0, 13, "1g.10gb", states.RESERVED, reservation="alice")
    # rules older than the exporter would still give the MIG-enabled GPU a state: no cell
    prom.add(states.STATE_INFO, 1, **ids("node-a", 0), state=states.FREE.name, model=A100)
    # node-a GPU 1: a mixed H100 (slices listed out of order on purpose)
    add_parent(prom, "node-a", 1, H100, temperature=71.0)
    add_slice(prom, "node-a", 1, 9, "1g.10gb", states.IDLE, "ivan", model=H100, used_gib=4)
    add_slice(prom, "node-a", 1, 3, "2g.20gb", states.CLAIMED, model=H100, total_gib=20,
              claim=("bob", "c-42"))
    add_slice(prom, "node-a", 1, 2, "3g.40gb", states.FREE, model=H100, total_gib=40)
    # node-a GPU 2: an H100 without MIG
    add_whole(prom, "node-a", 2, states.BUSY, "judy",
              processes=((70001, "judy", 40.0, 1_799_996_400.0),))
    # node-b: a MIG GPU that stopped answering while the rule still says free
    add_parent(prom, "node-b", 0, A100, up=False)
    add_slice(prom, "node-b", 0, 1, "7g.80gb", states.FREE, total_gib=80)
    # not a cell: skipped
    prom.add(states.STATE_INFO, 1, **{**ids("node-b", 0), "gpu": "0/x"}, state="free")
    # node-c: a free slice bigger than a free whole GPU
    add_parent(prom, "node-c", 0, A100)
    add_slice(prom, "node-c", 0, 0, "7g.80gb", states.FREE, total_gib=80)
    add_whole(prom, "node-c", 1, states.FREE)
    return prom


def cells(gpus: list[fleet.GpuStatus]) -> list[tuple[str, str]]:
    return [(g.host, str(g.cell)) for g in gpus]


# -- the reader ---------------------------------------------------------------------------------

def test_the_reader_gives_each_slice_a_cell_in_order_and_no_cell_to_a_mig_gpu(
        mig_fleet: SeriesPrometheus) -> None:
    assert cells(fleet.read_fleet(mig_fleet)) == [
        ("node-a", "0/7"), ("node-a", "0/8"), ("node-a", "0/11"), ("node-a", "0/12"),
        ("node-a", "0/13"), ("node-a", "1/2"), ("node-a", "1/3"), ("node-a", "1/9"),
        ("node-a", "2"), ("node-b", "0/1"), ("node-c", "0/0"), ("node-c", "1")]


def test_a_slice_has_its_own_memory_and_processes_and_its_parents_temperature(
        mig_fleet: SeriesPrometheus) -> None:
    by = {(g.host, str(g.cell)): g for g in fleet.read_fleet(mig_fleet)}
    busy = by["node-a", "0/8"]
    assert (busy.gpu, busy.gpu_instance_id, busy.profile, busy.mig_uuid) == (
        0, 8, "1g.10gb", "MIG-node-a-0-8")
    assert (busy.uuid, busy.model, busy.display_name) == (
        "GPU-node-a-0", A100, "A100-SXM4-80GB 1g.10gb")
    assert (busy.state, busy.users) == ("busy", ("heidi",))
    assert (busy.memory_used_bytes, busy.memory_total_bytes) == (9.3 * GIB, 10 * GIB)
    assert busy.utilization_ratio is None  # NVML has none per slice: not the parent's 0.85
    assert busy.temperature_celsius == 66.0
    assert [(p.pid, p.user, p.memory_bytes) for p in busy.processes] == [
        (51004, "heidi", 6 * GIB), (51002, "heidi", 3 * GIB)]
    assert busy.since == 1_799_998_200.0  # its oldest process, not the GPU's
    assert [p.pid for p in by["node-a", "0/7"].processes] == [51001]
    assert by["node-a", "0/12"].processes == ()
    assert by["node-a", "1/9"].temperature_celsius == 71.0
    assert by["node-a", "1/9"].display_name == "H100 80GB HBM3 1g.10gb"


def test_a_whole_gpu_next_to_slices_reads_as_before(mig_fleet: SeriesPrometheus) -> None:
    by = {(g.host, str(g.cell)): g for g in fleet.read_fleet(mig_fleet)}
    whole = by["node-a", "2"]
    assert (whole.gpu, whole.gpu_instance_id, whole.profile, whole.mig_uuid) == (
        2, None, None, None)
    assert (whole.memory_used_bytes, whole.memory_total_bytes, whole.utilization_ratio) == (
        30 * GIB, 80 * GIB, 0.85)
    assert whole.display_name == "H100 80GB HBM3" and whole.temperature_celsius == 69.0
    assert [p.pid for p in whole.processes] == [70001]


def test_profile_and_mig_uuid_come_from_the_mig_info_when_the_rule_lacks_them(
        mig_fleet: SeriesPrometheus) -> None:
    # a second compute instance of the same GPU instance: the lowest one, every time
    mig_fleet.samples.insert(0, Sample({
        "__name__": metrics.MIG_INFO.name, **ids("node-a", 0), "gpu_instance_id": "11",
        "compute_instance_id": "1", "profile": "1g.10gb", "mig_uuid": "MIG-second-ci"}, 1.0))
    by = {(g.host, str(g.cell)): g for g in fleet.read_fleet(mig_fleet)}
    assert (by["node-a", "0/11"].profile, by["node-a", "0/11"].mig_uuid) == (
        "1g.10gb", "MIG-node-a-0-11")
    assert by["node-a", "0/11"].display_name == "A100-SXM4-80GB 1g.10gb"


def test_the_slices_of_a_gpu_that_does_not_answer_are_down(mig_fleet: SeriesPrometheus) -> None:
    down = [g for g in fleet.read_fleet(mig_fleet) if g.host == "node-b"]
    assert [(str(g.cell), g.state) for g in down] == [("0/1", "down")]
    with pytest.raises(fleet.FleetError, match="node-b has 0 free GPUs and 0 free MIG slices"):
        fleet.pick(down, 1)


def test_a_slice_has_its_own_booking_and_claim(mig_fleet: SeriesPrometheus) -> None:
    by = {(g.host, str(g.cell)): g for g in fleet.read_fleet(mig_fleet)}
    booked = by["node-a", "0/13"]
    assert booked.reservation is not None and booked.reservation.user == "alice"
    assert booked.claim is None
    claimed = by["node-a", "1/3"]
    assert claimed.claim == fleet.ActiveClaim("c-42", "bob", "2100-01-01T00:00:00+00:00")
    assert claimed.reservation is None
    assert all(by[k].reservation is None and by[k].claim is None
               for k in by if k not in (("node-a", "0/13"), ("node-a", "1/3")))


def test_json_carries_the_slice_keys_always(mig_fleet: SeriesPrometheus) -> None:
    by = {(g.host, str(g.cell)): g for g in fleet.read_fleet(mig_fleet)}
    piece = by["node-a", "0/8"].to_json()
    assert {k: piece[k] for k in ("gpu", "gpu_instance_id", "profile", "mig_uuid", "uuid",
                                  "utilization_ratio", "temperature_celsius", "display_name",
                                  "memory_total_bytes")} == {
        "gpu": 0, "gpu_instance_id": 8, "profile": "1g.10gb", "mig_uuid": "MIG-node-a-0-8",
        "uuid": "GPU-node-a-0", "utilization_ratio": None, "temperature_celsius": 66.0,
        "display_name": "A100-SXM4-80GB 1g.10gb", "memory_total_bytes": 10 * GIB}
    assert "processes" not in piece
    api = by["node-a", "0/8"].to_api()
    processes = api["processes"]
    assert isinstance(processes, list)
    assert [p["pid"] for p in processes] == [51004, 51002]
    assert api["since"] == 1_799_998_200.0
    whole = by["node-a", "2"].to_json()
    assert (whole["gpu_instance_id"], whole["profile"], whole["mig_uuid"]) == (None, None, None)


# -- pick ---------------------------------------------------------------------------------------

def node(mig_fleet: SeriesPrometheus, host: str) -> list[fleet.GpuStatus]:
    return [g for g in fleet.read_fleet(mig_fleet) if g.host == host]


def test_one_cell_is_a_whole_gpu_first_then_the_slice_with_the_most_memory(
        mig_fleet: SeriesPrometheus) -> None:
    assert cells(fleet.pick(node(mig_fleet, "node-c"), 1)) == [("node-c", "1")]
    assert cells(fleet.pick(node(mig_fleet, "node-a"), 1, user="zoe")) == [("node-a", "1/2")]
    # a booked slice of one's own comes first
    assert cells(fleet.pick(node(mig_fleet, "node-a"), 1, user="alice")) == [
        ("node-a", "0/13")]


def test_the_model_picks_a_profile_or_a_display_name(mig_fleet: SeriesPrometheus) -> None:
    gpus = node(mig_fleet, "node-a")
    assert cells(fleet.pick(gpus, 1, "zoe", "1g.10gb")) == [("node-a", "0/11")]
    assert cells(fleet.pick(gpus, 1, "zoe", "1G.10GB")) == [("node-a", "0/11")]
    assert cells(fleet.pick(gpus, 1, "zoe", "H100 80GB HBM3 3g.40gb")) == [("node-a", "1/2")]
    with pytest.raises(fleet.FleetError) as claimed:
        fleet.pick(gpus, 1, "zoe", "2g.20gb")
    assert str(claimed.value) == ("node-a has 0 free GPUs and 0 free MIG slices (of 0 GPUs and "
                                  "1 MIG slice 2g.20gb), 1 wanted")
    with pytest.raises(fleet.FleetError, match=re.escape("no GPU of the model '4g.40gb'")):
        fleet.pick(gpus, 1, "zoe", "4g.40gb")
    whole = node(mig_fleet, "node-c")
    assert cells(fleet.pick(whole, 1, "zoe", "h100")) == [("node-c", "1")]
    assert cells(fleet.pick(whole, 1, "zoe", "7g.80gb")) == [("node-c", "0/0")]


def test_several_cells_are_whole_gpus_only(mig_fleet: SeriesPrometheus) -> None:
    with pytest.raises(fleet.FleetError) as refused:
        fleet.pick(node(mig_fleet, "node-a"), 2, "zoe", "1g.10gb")
    assert str(refused.value) == ("node-a has '1g.10gb' only as MIG slices: "
                                  f"{fleet.ONE_SLICE}")
    assert fleet.ONE_SLICE == "CUDA runs one MIG slice per process; ask for -n 1"
    with pytest.raises(fleet.FleetError) as short:
        fleet.pick(node(mig_fleet, "node-a"), 2, "zoe")
    assert str(short.value) == ("node-a has 0 free GPUs and 3 free MIG slices (of 1 GPU and 8 "
                                f"MIG slices), 2 wanted; {fleet.ONE_SLICE}")
    with pytest.raises(fleet.FleetError) as one_whole:
        fleet.pick(node(mig_fleet, "node-c"), 2, "zoe")
    assert str(one_whole.value) == ("node-c has 1 free GPU and 1 free MIG slice (of 1 GPU and 1 "
                                    f"MIG slice), 2 wanted: 1; {fleet.ONE_SLICE}")


def test_a_slice_without_its_mig_uuid_is_never_handed_out() -> None:
    bare = dataclasses.replace(status(0, 7, profile="1g.10gb", memory_total=10 * GIB),
                               mig_uuid=None)
    with pytest.raises(fleet.FleetError, match="has 0 free GPUs"):
        fleet.pick([bare], 1)
    assert fleet.pick([bare, status(0, 8, profile="1g.10gb")], 1)[0].mig_uuid == "MIG-0-8"


# -- the command --------------------------------------------------------------------------------

@pytest.fixture
def asked(mig_fleet: SeriesPrometheus, monkeypatch: pytest.MonkeyPatch) -> SeriesPrometheus:
    """`gpuwatch` with its Prometheus client answered by mig_fleet."""
    monkeypatch.setattr(common, "prometheus", lambda args: mig_fleet)
    return mig_fleet


def test_pick_prints_a_slices_mig_uuid_and_whole_gpus_by_index(asked: SeriesPrometheus) -> None:
    assert run("pick", "1", "--host", "node-a", "--user", "zoe", "--model", "1g.10gb") == (
        0, "MIG-node-a-0-11\n")
    assert run("pick", "1", "--host", "node-a", "--user", "zoe") == (0, "MIG-node-a-1-2\n")
    assert run("pick", "1", "--host", "node-c", "--user", "zoe") == (0, "1\n")
    assert run("pick", "1", "--host", "node-c", "--user", "zoe", "--model", "7g.80gb") == (
        0, "MIG-node-c-0-0\n")


def test_pick_of_several_slices_is_one_line_refusing(asked: SeriesPrometheus,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = one_error(capsys, "pick", "2", "--host", "node-a", "--model", "1g.10gb")
    assert err.endswith(f"{fleet.ONE_SLICE}\n")


def column(lines: list[str], name: str, row: int) -> str:
    """The text of a row under a column of the grid (columns are two spaces apart; numbers
    are right-aligned under their name, the others left-aligned)."""
    at = re.search(rf"\b{name}\b", lines[0])
    assert at is not None, lines[0]
    line = lines[1 + row]
    if name in ("GPU", "MEMORY", "UTIL"):
        return line[:at.end()].rsplit("  ", 1)[-1].strip()
    return line[at.start():].split("  ", 1)[0].strip()


def test_status_shows_slices_under_their_gpu(asked: SeriesPrometheus) -> None:
    code, out = run("status", "--color", "never")
    lines = out.splitlines()
    assert code == 0
    assert [column(lines, "GPU", i) for i in range(12)] == [
        "0/7", "0/8", "0/11", "0/12", "0/13", "1/2", "1/3", "1/9", "2", "0/1", "0/0", "1"]
    assert [column(lines, "STATE", i).split()[0] for i in range(9)] == [
        "busy", "busy", "free", "free", "reserved", "free", "claimed", "idle", "busy"]
    assert column(lines, "MODEL", 1) == "A100-SXM4-80GB 1g.10gb"
    assert column(lines, "MODEL", 5) == "H100 80GB HBM3 3g.40gb"
    assert column(lines, "MODEL", 8) == "H100 80GB HBM3"
    assert column(lines, "MEMORY", 1) == "9.3/10.0 GiB"
    assert column(lines, "MEMORY", 8) == "30.0/80.0 GiB"
    assert (column(lines, "UTIL", 1), column(lines, "UTIL", 8)) == ("-", "85%")
    assert column(lines, "USERS", 1) == "heidi"
    assert column(lines, "RESERVATION", 4) == "alice until 2100-01-01 00:00+00:00"
    assert column(lines, "HOST", 0) == "node-a" and column(lines, "HOST", 1) == ""
    assert lines[-1] == ("2 GPUs and 10 MIG slices on 3 hosts: 5 free, 3 busy, 1 idle, "
                         "1 claimed, 1 reserved, 1 down")


def test_status_free_lists_free_slices_and_counts_every_cell(asked: SeriesPrometheus) -> None:
    lines = run("status", "--free", "--color", "never")[1].splitlines()
    assert [(column(lines, "HOST", i), column(lines, "GPU", i)) for i in range(5)] == [
        ("node-a", "0/11"), ("", "0/12"), ("", "1/2"), ("node-c", "0/0"), ("", "1")]
    assert len(lines) == 7
    assert lines[-1].startswith("2 GPUs and 10 MIG slices on 3 hosts: ")


def test_status_json_has_one_object_per_cell(asked: SeriesPrometheus) -> None:
    printed = json.loads(run("status", "--json")[1])
    assert [(g["host"], g["gpu"], g["gpu_instance_id"]) for g in printed][:3] == [
        ("node-a", 0, 7), ("node-a", 0, 8), ("node-a", 0, 11)]
    assert all({"gpu_instance_id", "profile", "mig_uuid"} <= g.keys() for g in printed)
    free = json.loads(run("status", "--json", "--free")[1])
    assert [(g["host"], g["gpu"], g["profile"], g["mig_uuid"]) for g in free] == [
        ("node-a", 0, "1g.10gb", "MIG-node-a-0-11"), ("node-a", 0, "1g.10gb", "MIG-node-a-0-12"),
        ("node-a", 1, "3g.40gb", "MIG-node-a-1-2"), ("node-c", 0, "7g.80gb", "MIG-node-c-0-0"),
        ("node-c", 1, None, None)]


def test_without_processes_the_reader_asks_for_no_process_series(
        mig_fleet: SeriesPrometheus) -> None:
    """`gpuwatch status` and `pick` show no processes: at 10,000 GPUs their series are most of
    Prometheus' answer (make bench-fleet), so the CLI does not ask for them."""
    prom = mig_fleet
    asked: list[str] = []
    answer = prom.query

    def query(expr: str, at: float | None = None) -> list[Sample]:
        asked.append(expr)
        return answer(expr, at)

    prom.query = query  # type: ignore[method-assign]
    full = fleet.read_fleet(prom)
    bare = fleet.read_fleet(prom, processes=False)
    assert any(metrics.PROCESS_MEMORY.name in q for q in asked[:3])
    assert not any(metrics.PROCESS_MEMORY.name in q or metrics.PROCESS_START.name in q
                   for q in asked[3:])
    assert any(g.processes for g in full) and not any(g.processes for g in bare)
    assert [g.to_json() for g in bare] == [g.to_json() for g in full]

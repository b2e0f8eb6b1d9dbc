"""End to end: simulated exporters and a real Prometheus on 127.0.0.1 (tests/prom_harness.py).

Nodes of the workstation, server and lost-gpu scenarios run gpuwatch-exporter on free ports;
Prometheus (Debian's package) runs this repository's prometheus.yml and rules, generated with
short intervals, a short idle duration and short `for` (tools.localstack; the files in
prometheus/ are the only source), reading a targets file the harness writes. What every GPU
should look like comes from the harness's oracle (`Fleet.expected()`: the scenarios, the
thresholds in prometheus/rules/thresholds.yml and the bookings), checked through the
Prometheus HTTP API and `gpuwatch status --json` / `gpuwatch pick`. `gpuwatch serve` is the
reservations endpoint: it serves a reservations file that the tests edit with `gpuwatch
reserve --file` and `gpuwatch release --file`, as an admin does, and takes bookings and
claims through its API, as people's `gpuwatch reserve` and `gpuwatch run` do.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prom_harness import Fleet, Node

from gpuwatch import reservations
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import IDLE_DURATION
from tools import localstack

THIS_HOST = socket.gethostname()
NODES = (Node(THIS_HOST, "workstation"), Node("gpu-server", "server"), Node(None, "lost-gpu"),
         Node("doomed", "workstation"), Node("leaving", "server"))
"""The workstation is this machine, for `gpuwatch pick`; lost-gpu keeps the host Prometheus
derives from its target. "doomed" and "leaving" are there to be killed and removed; started
with the others, they are discovered with them (Prometheus passes target changes on at most
every 5 s)."""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # a short idle duration and short `for`s; GpuHeldIdle keeps its hour: the idle GPU's
    # alert is seen pending
    with Fleet(tmp_path_factory.mktemp("e2e"), NODES,
               thresholds={IDLE_DURATION: 3},
               alert_for={"GpuLost": "2s", "GpuXidCritical": "2s", "GpuXidError": "2s",
                          "GpuExporterDown": "2s", "GpuReservationViolated": "2s"}) as f:
        yield f


Grid = dict[tuple[str, int], tuple[str, tuple[str, ...], str]]


def grid(fleet: Fleet) -> Grid:
    """(host, gpu) -> (state, users, model), from the recording rule."""
    return {(s.labels["host"], int(s.labels["gpu"])):
            (s.labels["state"], tuple(u for u in s.labels.get("users", "").split(",") if u),
             s.labels.get("model", ""))
            for s in fleet.api.query(states.STATE_INFO)}


def expected_grid(fleet: Fleet) -> Grid:
    return {key: (gpu.state, gpu.users, gpu.model) for key, gpu in fleet.expected().items()}


def settled(fleet: Fleet) -> None:
    fleet.wait_for("every GPU in its state, with its users and model", lambda: grid(fleet),
                   lambda g: g == expected_grid(fleet))


def by(fleet: Fleet, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.get(label, "") for label in labels): s.value
            for s in fleet.api.query(expr)}


def eventually(fleet: Fleet, expected: dict[tuple[str, ...], float], expr: str,
               *labels: str) -> None:
    """`expr` by `labels` becomes `expected`: rule groups are evaluated one after the other,
    so a group reading another's results follows it by up to one evaluation."""
    fleet.wait_for(expr, lambda: by(fleet, expr, *labels), lambda found: found == expected)


def gpus_of(fleet: Fleet, host: str, state: str) -> list[int]:
    return sorted(i for (h, i), gpu in fleet.expected().items()
                  if h == host and gpu.state == state)


# -- the fleet as the rules see it ----------------------------------------------------------------

def test_the_scenarios_cover_every_state_but_reserved_and_claimed(fleet: Fleet) -> None:
    """Reserved and claimed come from bookings and claims, which the tests below make."""
    settled(fleet)  # idle needs the idle duration to have passed
    seen = {gpu.state for gpu in fleet.expected().values()}
    assert seen == {s.name for s in states.ALL} - {states.RESERVED.name, states.CLAIMED.name}


def test_every_gpu_has_its_state_users_and_model(fleet: Fleet) -> None:
    settled(fleet)
    assert grid(fleet) == expected_grid(fleet)


def test_host_is_derived_from_the_target_unless_the_targets_file_sets_it(fleet: Fleet) -> None:
    settled(fleet)
    hosts = by(fleet, 'up{job="gpuwatch"}', "instance", "host")
    assert set(hosts) == {(n.instance, n.host) for n in fleet.nodes}
    assert (fleet.node(localstack.LOCALHOST).instance, localstack.LOCALHOST) in hosts


def test_every_rule_evaluates_without_error(fleet: Fleet) -> None:
    settled(fleet)
    rules = [r for g in fleet.api.rules() for r in g["rules"]]
    assert len(rules) == sum(len(localstack.rules(localstack.load_rules(p)))
                             for p in localstack.rule_files())
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_free_counts_per_node_per_model_and_for_the_fleet(fleet: Fleet) -> None:
    settled(fleet)
    expected = fleet.expected().values()
    free = [(gpu.host, gpu.model) for gpu in expected if gpu.state == states.FREE.name]
    per_host = Counter(host for host, _ in free)
    assert by(fleet, "instance:gpuwatch_gpus_free:count", "host") == {
        (n.host,): per_host[n.host] for n in fleet.nodes}
    per_model = Counter(model for _, model in free)
    models = {gpu.model for gpu in expected}
    assert by(fleet, "model:gpuwatch_gpus_free:count", "model") == {
        (m,): per_model[m] for m in models}
    per_host_model = Counter(free)
    assert by(fleet, "instance_model:gpuwatch_gpus_free:count", "host", "model") == {
        (gpu.host, gpu.model): per_host_model[gpu.host, gpu.model] for gpu in expected}
    assert by(fleet, "job:gpuwatch_gpus_free:count", "job") == {(states.JOB,): len(free)}
    per_state = Counter(gpu.state for gpu in expected)
    assert by(fleet, "state:gpuwatch_gpus:count", "state") == {
        (s,): n for s, n in per_state.items()}


def test_per_user_gpus_memory_and_idle_gpus(fleet: Fleet) -> None:
    settled(fleet)
    gpus = fleet.expected().values()
    held = Counter(user for gpu in gpus for user in gpu.users)
    eventually(fleet, {(u,): n for u, n in held.items()}, "user:gpuwatch_gpus_held:count",
               "user")
    memory: Counter[str] = Counter()
    for gpu in gpus:
        memory.update(gpu.user_memory)
    # the exporter reports whole bytes per process; the sums are exact
    eventually(fleet, {(u,): m for u, m in memory.items()},
               "user:nvidia_gpu_user_memory_used_bytes:sum", "user")
    idle = Counter(user for gpu in gpus if gpu.state == states.IDLE.name for user in gpu.users)
    assert idle, "the scenarios have a GPU held but idle"
    eventually(fleet, {(u,): n for u, n in idle.items()}, "user:gpuwatch_gpus_idle:count",
               "user")


# -- alerts ---------------------------------------------------------------------------------------

def alerts(fleet: Fleet) -> list[dict[str, Any]]:
    return fleet.api.alerts()


def test_idle_held_gpu_alert_is_pending_and_names_the_users(fleet: Fleet) -> None:
    settled(fleet)
    idle = {key: gpu for key, gpu in fleet.expected().items() if gpu.state == states.IDLE.name}
    assert idle
    # one alert per user holding an idle GPU, that user in its user label
    holders = {(*key, user) for key, gpu in idle.items() for user in gpu.users}
    assert holders
    pending = fleet.wait_for(
        "GpuHeldIdle pending for every holder of an idle GPU",
        lambda: {(a["labels"]["host"], int(a["labels"]["gpu"]), a["labels"].get("user")): a
                 for a in alerts(fleet) if a["labels"]["alertname"] == "GpuHeldIdle"},
        lambda found: set(found) == holders)
    for (_, _, user), alert in pending.items():
        assert alert["state"] == "pending"  # its `for` is the production hour
        assert alert["labels"]["audience"] == "user"
        assert user in alert["annotations"]["summary"]
        assert user in alert["annotations"]["description"]


def test_lost_gpu_and_xid_alerts_fire(fleet: Fleet) -> None:
    settled(fleet)
    lost = {(gpu.host, str(gpu.gpu)) for gpu in fleet.expected().values()
            if gpu.state == states.DOWN.name}
    critical = re.search(r'xid=~"([\d|]+)"', next(
        r["expr"] for p in localstack.rule_files() for r in
        localstack.rules(localstack.load_rules(p)) if r.get("alert") == "GpuXidCritical"))
    assert critical
    xids = {("GpuXidCritical" if str(code) in critical.group(1).split("|") else "GpuXidError",
             n.host, str(i), str(code))
            for n in fleet.nodes for i, gpu in enumerate(n.scenario.gpus)
            for code, after in gpu.xid if after == 0}
    assert lost and xids

    def firing() -> set[tuple[str, ...]]:
        return {(a["labels"]["alertname"], a["labels"]["host"], a["labels"]["gpu"],
                 a["labels"].get("xid", "")) for a in alerts(fleet) if a["state"] == "firing"}

    wanted = {("GpuLost", host, gpu, "") for host, gpu in lost} | xids
    fleet.wait_for("GpuLost and the Xid alerts firing", firing, lambda f: wanted <= f)
    assert {a for a in firing() if a[0] in ("GpuLost", "GpuXidCritical", "GpuXidError")} == \
        wanted


# -- the gpuwatch command against it ------------------------------------------------------------

def gpuwatch(fleet: Fleet, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUWATCH_PROMETHEUS": fleet.url}
    return subprocess.run([sys.executable, "-m", "gpuwatch.cli", *argv], capture_output=True,
                          text=True, timeout=60, env=env)


def test_gpuwatch_status_json(fleet: Fleet) -> None:
    settled(fleet)
    result = gpuwatch(fleet, "status", "--json")
    assert result.returncode == 0, result.stderr
    gpus = {(g["host"], g["gpu"]): g for g in json.loads(result.stdout)}
    expected = fleet.expected()
    assert set(gpus) == set(expected)
    for key, gpu in gpus.items():
        want = expected[key]
        assert (gpu["state"], tuple(gpu["users"]), gpu["model"]) == \
            (want.state, want.users, want.model), key
        assert gpu["memory_total_bytes"] == want.memory_total_bytes, key
        if want.state == states.DOWN.name:
            assert gpu["utilization_ratio"] is None and gpu["memory_used_bytes"] is None
        else:
            assert 0 <= gpu["utilization_ratio"] <= 1 and gpu["memory_used_bytes"] >= 0
        assert (gpu["inactive_since"] is not None) == (want.state == states.IDLE.name), key
        assert gpu["reservation"] is None and gpu["claim"] is None, key
    result = gpuwatch(fleet, "status", "--free", "--json")
    assert {(g["host"], g["gpu"]) for g in json.loads(result.stdout)} == {
        key for key, gpu in expected.items() if gpu.state == states.FREE.name}


def test_gpuwatch_status_grid(fleet: Fleet) -> None:
    settled(fleet)
    result = gpuwatch(fleet, "status")
    assert result.returncode == 0, result.stderr
    assert "\033[" not in result.stdout  # not a terminal
    counts = Counter(gpu.state for gpu in fleet.expected().values())
    assert result.stdout.splitlines()[-1] == (
        f"{sum(counts.values())} GPUs on {len(fleet.nodes)} hosts: " + ", ".join(
            f"{counts[s.name]} {s.name}" for s in states.ALL if counts[s.name]))


def test_gpuwatch_pick_on_this_host_and_another(fleet: Fleet) -> None:
    settled(fleet)

    # the workstation, labelled with this machine's host name
    here = gpus_of(fleet, THIS_HOST, states.FREE.name)
    assert here, "the workstation scenario has a free GPU"
    result = gpuwatch(fleet, "pick", str(len(here)))
    assert (result.returncode, result.stdout) == (0, ",".join(map(str, here)) + "\n"), \
        result.stderr
    result = gpuwatch(fleet, "pick", str(len(here) + 1))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "free GPU" in result.stderr
    server = gpus_of(fleet, "gpu-server", states.FREE.name)
    result = gpuwatch(fleet, "pick", "2", "--host", "gpu-server")
    assert result.stdout == ",".join(map(str, server[:2])) + "\n", result.stderr


# -- reservations ---------------------------------------------------------------------------------

def status(fleet: Fleet) -> dict[tuple[str, int], dict[str, Any]]:
    result = gpuwatch(fleet, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {(g["host"], g["gpu"]): g for g in json.loads(result.stdout)}


def book(fleet: Fleet, *argv: str) -> str:
    result = gpuwatch(fleet, *argv, "--file", str(fleet.reservations_file))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_booking_made_with_gpuwatch_reserve_shows_in_status_and_goes_when_released(
        fleet: Fleet) -> None:
    settled(fleet)
    gpu = gpus_of(fleet, "gpu-server", states.FREE.name)[0]
    key = ("gpu-server", gpu)
    out = book(fleet, "reserve", f"gpu-server:{gpu}", "--user", "frank", "--until", "+1d",
               "--comment", "end-to-end deadline")
    (booked,) = reservations.load(fleet.reservations_file, dt.datetime.now(dt.timezone.utc))
    try:
        assert out == f"booked {booked.describe()}\n"
        shown = fleet.wait_for("the booking in gpuwatch status", lambda: status(fleet)[key],
                               lambda g: g["state"] == states.RESERVED.name)
        assert shown["users"] == []
        assert shown["reservation"] == {
            "user": "frank", "until": reservations.iso(booked.until),
            "until_timestamp": booked.until.timestamp(), "comment": "end-to-end deadline"}
        grid = gpuwatch(fleet, "status").stdout
        line = next(row for row in grid.splitlines() if " frank until " in row)
        assert f"frank until {reservations.short(booked.until)} (end-to-end deadline)" in line
        assert "reserved" in line.split()
        assert by(fleet, states.STATE_INFO + '{state="reserved"}', "host", "gpu",
                  "reservation") == {("gpu-server", str(gpu), f"frank until "
                                      f"{reservations.short(booked.until)} "
                                      "(end-to-end deadline)"): 1.0}
        # a reserved GPU is not free: not offered to others, but to frank
        assert str(gpu) not in gpuwatch(fleet, "pick", "3", "--host", "gpu-server",
                                        "--user", "zoe").stdout.strip().split(",")
        assert gpuwatch(fleet, "pick", "1", "--host", "gpu-server", "--user",
                        "frank").stdout == f"{gpu}\n"
    finally:
        book(fleet, "release", f"gpu-server:{gpu}", "--user", "frank")
    fleet.wait_for("the released GPU free again", lambda: status(fleet)[key],
                   lambda g: g["state"] == states.FREE.name and g["reservation"] is None)
    settled(fleet)


def test_a_booked_gpu_used_by_its_holder_is_busy_and_by_another_alerts(fleet: Fleet) -> None:
    settled(fleet)
    users = {i: gpu.users for (host, i), gpu in fleet.expected().items()
             if host == "gpu-server" and gpu.state == states.BUSY.name}
    by_one = sorted(i for i, held_by in users.items() if len(held_by) == 1)
    mine, theirs = by_one[0], next(i for i in by_one if users[i] != users[by_one[0]])
    (holder,), (squatter,) = users[mine], users[theirs]
    book(fleet, "reserve", f"gpu-server:{mine}", "--user", holder, "--until", "+2d")
    book(fleet, "reserve", f"gpu-server:{theirs}", "--user", "frank", "--until", "+2d",
         "--comment", "paper")
    try:
        gpus = fleet.wait_for("both bookings in gpuwatch status", lambda: status(fleet),
                              lambda g: g["gpu-server", theirs]["state"] == states.RESERVED.name
                              and g["gpu-server", mine]["reservation"] is not None)
        assert (gpus["gpu-server", mine]["state"], gpus["gpu-server", mine]["users"]) == \
            (states.BUSY.name, [holder])
        assert gpus["gpu-server", theirs]["users"] == [squatter]
        assert gpus["gpu-server", theirs]["reservation"]["user"] == "frank"
        firing = fleet.wait_for(
            "GpuReservationViolated firing",
            lambda: [a["labels"] for a in alerts(fleet)
                     if a["labels"]["alertname"] == "GpuReservationViolated"
                     and a["state"] == "firing"],
            lambda found: bool(found))
        assert [(a["host"], a["gpu"], a["user"], a["reserved_by"], a["comment"])
                for a in firing] == [("gpu-server", str(theirs), squatter, "frank", "paper")]
    finally:
        book(fleet, "release", "--user", "frank")
        book(fleet, "release", "--user", holder)
    settled(fleet)
    fleet.wait_for("GpuReservationViolated gone with the booking",
                   lambda: [a for a in alerts(fleet)
                            if a["labels"]["alertname"] == "GpuReservationViolated"],
                   lambda found: not found)


def test_a_booking_that_ends_drops_out_by_itself(fleet: Fleet) -> None:
    settled(fleet)
    gpu = gpus_of(fleet, "gpu-server", states.FREE.name)[-1]
    book(fleet, "reserve", f"gpu-server:{gpu}", "--user", "frank", "--until", "+8s")
    (booked,) = reservations.load(fleet.reservations_file, dt.datetime.now(dt.timezone.utc))
    fleet.wait_for("the booking to end", lambda: time.time(),
                   lambda t: t > booked.until.timestamp())
    fleet.wait_for("the GPU free again", lambda: status(fleet)["gpu-server", gpu],
                   lambda g: g["state"] == states.FREE.name and g["reservation"] is None)
    # it was reserved while the booking ran, and it stays in the file until tidied
    window = f"{int(time.time() - booked.until.timestamp()) + 12}s"
    assert by(fleet, f'count_over_time({states.STATE_INFO}{{host="gpu-server", gpu="{gpu}", '
              f'state="reserved"}}[{window}])', "gpu")[(str(gpu),)] > 0
    assert reservations.load(fleet.reservations_file, booked.until)[0].user == "frank"
    assert "released" in book(fleet, "release", "--expired")


# -- bookings and claims through gpuwatch serve ---------------------------------------------------

def samples(fleet: Fleet, selector: str, since: float) -> list[float]:
    """The times of the samples `selector` has had since `since` (raw, as scraped)."""
    window = f"{int(time.time() - since) + 2}s"
    found = fleet.api.api("query", {"query": f"{selector}[{window}]"})["result"]
    return sorted(t for series in found for t, _ in series["values"] if t >= since)


def test_a_claim_and_a_booking_show_in_the_grid_from_the_next_scrape(fleet: Fleet) -> None:
    """A booking and a claim made through gpuwatch serve's API are in the first scrape of the
    reservations job after the service answered, then in the grid and `gpuwatch status`
    (claimed, reserved); ended, the GPUs are free again."""
    settled(fleet)
    free = gpus_of(fleet, "gpu-server", states.FREE.name)
    assert len(free) >= 2, "the server scenario has two free GPUs"
    until = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=1)
    asked = time.time()
    status_code, booking = fleet.ask_service("POST", "/api/v1/reservations", "frank", {
        "host": "gpu-server", "gpus": [free[-1]], "until": until.isoformat(),
        "comment": "camera-ready"})
    assert status_code == 201, booking
    claim = None
    try:
        claim = fleet.claim("zoe", "gpu-server", count=1, minutes=10)
        answered = time.time()
        assert claim["gpus"] == [free[0]], "the lowest free GPU not booked"
        claimed_key, booked_key = ("gpu-server", free[0]), ("gpu-server", free[-1])
        expected = fleet.expected()
        assert (expected[claimed_key].state, expected[claimed_key].claim) == \
            (states.CLAIMED.name, "zoe")
        assert expected[booked_key].state == states.RESERVED.name
        settled(fleet)  # the grid: claimed by zoe, reserved for frank, the rest as it was
        assert by(fleet, states.STATE_INFO + '{state="claimed"}', "host", "gpu", "claim") == \
            {("gpu-server", str(free[0]), "zoe"): 1.0}

        # both were in the first scrape of the service that began after it answered
        scrapes = samples(fleet, f'up{{job="{states.RESERVATIONS_JOB}"}}', asked)
        first = next(t for t in scrapes if t >= answered)
        claim_seen = samples(fleet, f'nvidia_gpu_claim_end_timestamp_seconds{{id="{claim["id"]}"}}',
                             asked)
        booking_seen = samples(fleet, 'nvidia_gpu_reservation_end_timestamp_seconds'
                               '{user="frank", comment="camera-ready"}', asked)
        assert claim_seen and claim_seen[0] <= first, (claim_seen, scrapes, answered)
        assert booking_seen and booking_seen[0] <= first, (booking_seen, scrapes, answered)

        gpus = status(fleet)
        assert gpus[claimed_key]["claim"] == {"id": claim["id"], "user": "zoe",
                                              "until": claim["until"]}
        assert gpus[claimed_key]["state"] == states.CLAIMED.name
        assert gpus[booked_key]["reservation"]["user"] == "frank"
        assert gpus[booked_key]["claim"] is None
        grid_text = gpuwatch(fleet, "status").stdout
        line = next(row for row in grid_text.splitlines() if "claimed by zoe" in row)
        assert "claimed" in line.split()
        # a claimed GPU is not free: pick passes it over
        remaining = gpus_of(fleet, "gpu-server", states.FREE.name)
        assert free[0] not in remaining
        result = gpuwatch(fleet, "pick", str(len(remaining) + 1), "--host", "gpu-server")
        assert result.returncode == 1 and f"{len(remaining)} free GPU" in result.stderr
    finally:
        if claim is not None:
            fleet.end_claim(claim)
        assert fleet.ask_service("DELETE", f"/api/v1/reservations/{booking['id']}",
                                 "frank")[0] == 204
    assert fleet.active_claims() == []
    settled(fleet)  # both free again
    assert fleet.expected()["gpu-server", free[0]].state == states.FREE.name


# -- nodes that die and nodes that go -------------------------------------------------------------

def test_killed_exporter_turns_its_gpus_down(fleet: Fleet) -> None:
    node = fleet.node("doomed")
    settled(fleet)
    node.kill()  # the target stays in the targets file
    assert {gpu.state for (host, _), gpu in fleet.expected().items() if host == "doomed"} == \
        {states.DOWN.name}
    settled(fleet)  # down, keeping the model they had
    firing = fleet.wait_for(
        "GpuExporterDown firing", lambda: {a["labels"]["instance"] for a in alerts(fleet)
                                           if a["labels"]["alertname"] == "GpuExporterDown"
                                           and a["state"] == "firing"},
        lambda found: node.instance in found)
    assert firing == {node.instance}


def test_node_removed_from_the_targets_disappears_without_a_restart(fleet: Fleet) -> None:
    node = fleet.node("leaving")
    settled(fleet)
    assert any(host == "leaving" for host, _ in grid(fleet))
    fleet.remove_node(node)
    settled(fleet)  # its GPUs are gone, the other nodes' unchanged
    assert fleet.prometheus is not None and fleet.prometheus.running
    assert by(fleet, f'up{{instance="{node.instance}"}}', "instance") == {}
    assert by(fleet, f'instance_gpu:gpuwatch_inventory:info{{instance="{node.instance}"}}',
              "gpu") == {}


# -- a GPU that hangs ------------------------------------------------------------------------------

HUNG_NODE = """
description: Two GPUs, both idle; GPU 1's power reading never returns.
gpus:
  - {}
  - hang: [nvmlDeviceGetPowerUsage]
"""


def test_a_gpu_whose_nvml_call_hangs_is_down_and_never_picked(fleet: Fleet) -> None:
    scenario = fleet.workdir / "hung.yaml"
    scenario.write_text(HUNG_NODE)
    node = fleet.add_node(Node("hung-node", str(scenario),
                               flags=("--collection.timeout", "0.3")))
    # GPU 0 is GPU 1 without the hang
    assert [fleet.expected()["hung-node", i].state for i in (0, 1)] == \
        [states.FREE.name, states.DOWN.name]
    settled(fleet)  # GPU 0 free, GPU 1 down, the other nodes as they were
    assert status(fleet)["hung-node", 1]["state"] == states.DOWN.name
    result = gpuwatch(fleet, "pick", "1", "--host", "hung-node")
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr
    result = gpuwatch(fleet, "pick", "2", "--host", "hung-node")
    assert result.returncode == 1 and "1 free GPU (of 2)" in result.stderr
    assert by(fleet, f'nvidia_gpu_down_info{{instance="{node.instance}"}}', "gpu", "reason") \
        in ({("1", "timeout"): 1.0}, {("1", "hung"): 1.0})
    fleet.remove_node(node)

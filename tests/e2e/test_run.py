"""`gpuwatch run` as people start it: 20 processes at once against a real `gpuwatch serve` (in
this process, basic auth from its web config) over a simulated fleet of 16 GPUs on this
machine's host name. Each command holds its GPU until the test lets go, so that 20 claims are
alive together: 16 get one GPU each, none the same, and 4 are refused in one line.

And a MIG node end to end (issue 16): the simulator's mig scenario behind gpuwatch-exporter,
a real Prometheus with the project's rules and `gpuwatch serve` reading its fleet from it
(tests/prom_harness.py, 127.0.0.1 only): `gpuwatch run -n 1 --model 1g.10gb` gets a free
slice by its MIG UUID and the claim shows as that slice ("0/11"); a booking of a slice is
served as gpu="0/7" and takes the slice, and the whole GPU with it, from others."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from cli_run import run
from paths import REPO
from prom_harness import ExpectedCell, Fleet, Node
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.cells import Cell
from gpuwatch.cli import client
from gpuwatch.contract import metrics, states
from gpuwatch.fleet import GpuStatus
from gpuwatch.serve.app import Serving, start
from gpuwatch.serve.options import ServeOptions
from tests.e2e.test_mig_grid import HOST as MIG_HOST

HOST = socket.gethostname()
GPUS = 16
RUNS = 20
USERS = {f"user{i}": f"pw-{i}-s3cret" for i in range(4)}


def gpu(index: int) -> GpuStatus:
    return GpuStatus(host=HOST, instance=f"{HOST}:9839", gpu=index, uuid=f"GPU-sim-{index:02d}",
                     state="free", users=(), model="NVIDIA H100 80GB HBM3",
                     display_name="H100", memory_used_bytes=0.0, memory_total_bytes=80e9,
                     utilization_ratio=0.0, inactive_since=None)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n" + "".join(
        f"  {name}: {bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for name, pw in USERS.items()))
    fleet = [gpu(i) for i in range(GPUS)]
    options = ServeOptions(reservations_file=tmp_path / "reservations.yml",
                           listen_address="127.0.0.1:0", web_config_file=config,
                           own_process_metrics=False, claim_poll_seconds=3600)
    with start(options, fleet=lambda: fleet) as s:
        yield s


def test_twenty_runs_at_once_on_sixteen_gpus_never_share_one(serving: Serving,
                                                             tmp_path: Path) -> None:
    let_go = tmp_path / "let-go"
    command = f'echo "$CUDA_VISIBLE_DEVICES"; while [ ! -e {let_go} ]; do sleep 0.1; done'
    users = list(USERS.items())
    processes = []
    for i in range(RUNS):
        name, password = users[i % len(users)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
        env.update({client.ENV_SERVER: serving.url, client.ENV_USER: name,
                    client.ENV_PASSWORD: password, client.ENV_NETRC: str(tmp_path / "none"),
                    "PYTHONPATH": str(REPO / "src")})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "gpuwatch.cli", "run", "-n", "1", "--", "sh", "-c", command],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        # the refused ones end by themselves; the others hold their GPU until let go
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and \
                sum(p.poll() is not None for p in processes) < RUNS - GPUS:
            time.sleep(0.2)
        claims = serving.service.list_claims()
        let_go.touch()
        results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    finally:
        let_go.touch()
        for p in processes:
            p.kill()
            p.wait()
    granted = [out.strip() for code, out, _ in results if code == 0]
    refused = [err for code, _, err in results if code != 0]
    assert len(granted) == GPUS, results
    assert sorted(granted) == sorted(g.uuid for g in map(gpu, range(GPUS)))  # none shared
    assert len(refused) == RUNS - GPUS
    for err in refused:
        assert err.count("\n") == 1, err
        assert err.startswith(f"gpuwatch: error: gpuwatch serve at {serving.url}: "), err
    for code, _, err in results:
        assert all(pw not in err for pw in USERS.values())
        if code == 0:
            assert err.startswith("gpuwatch: claimed GPU "), err
    assert len(claims) == GPUS
    assert not serving.service.list_claims()  # each run ended its claim


# -- a MIG node, through Prometheus ---------------------------------------------------------

MIG_USERS = {"alice": "pw-alice-s3cret", "bob": "pw-bob-s3cret", "carol": "pw-carol-s3cret"}


@pytest.fixture(scope="module")
def mig_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("mig-run"), [Node(MIG_HOST, "mig")],
               web_users=MIG_USERS) as f:
        yield f


def free_slices(fleet: Fleet, profile: str) -> list[ExpectedCell]:
    """The free slices of `profile` as the simulator has them, in the order a claim takes
    them (the most memory first, then the lowest cell)."""
    return sorted((c for (host, _), c in fleet.expected_cells().items()
                   if host == MIG_HOST and c.profile == profile
                   and c.state == states.FREE.name),
                  key=lambda c: (-(c.memory_total_bytes or 0.0), c.cell.sort_key()))


def service_cells(fleet: Fleet) -> dict[str, str]:
    """Cell text -> state of the MIG node as gpuwatch serve's /api/v1/fleet has it."""
    status, answer = fleet.ask_service("GET", "/api/v1/fleet", "alice")
    if status != 200:
        return {}
    return {str(Cell(g["gpu"], g["gpu_instance_id"])): g["state"] for g in answer["gpus"]
            if g["host"] == MIG_HOST}


def served_series(fleet: Fleet, name: str) -> list[dict[str, str]]:
    """The labels of `name`'s series on gpuwatch serve's /metrics (as Prometheus scrapes)."""
    request = urllib.request.Request(fleet.service_url + "/metrics",
                                     headers=fleet.scraper_authorization())
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read().decode()
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name]


def run_env(fleet: Fleet, user: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
    env.update({client.ENV_SERVER: fleet.service_url, client.ENV_USER: user,
                client.ENV_PASSWORD: MIG_USERS[user],
                client.ENV_NETRC: str(fleet.workdir / "none"),
                "PYTHONPATH": str(REPO / "src")})
    return env


def test_run_hands_out_a_free_slice_by_its_mig_uuid_and_the_claim_shows(
        mig_fleet: Fleet, tmp_path: Path) -> None:
    fleet = mig_fleet
    wanted = free_slices(fleet, "1g.10gb")
    assert wanted, fleet.expected_cells()
    fleet.wait_for("the MIG node's free 1g.10gb slices in gpuwatch serve's fleet",
                   lambda: service_cells(fleet),
                   lambda seen: all(seen.get(str(c.cell)) == states.FREE.name for c in wanted))
    let_go = tmp_path / "let-go"
    command = f"env; until [ -e {let_go} ]; do sleep 0.1; done"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch.cli", "run", "-n", "1", "--host", MIG_HOST, "--model",
         "1g.10gb", "--", "sh", "-c", command],
        env=run_env(fleet, "alice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        claims = fleet.wait_for("alice's claim", lambda: fleet.active_claims(),
                                lambda found: len(found) == 1)
        claim = claims[0]
        taken = wanted[0]
        assert (claim["host"], claim["gpus"], claim["uuids"], claim["user"]) == (
            MIG_HOST, [str(taken.cell)], [taken.mig_uuid], "alice")
        assert [(s["gpu"], s["user"]) for s in served_series(fleet, metrics.CLAIM_END.name)
                ] == [(str(taken.cell), "alice")]
        # the rules make the slice claimed, by its cell
        fleet.wait_for("the claimed slice in Prometheus", lambda: [
            (s.labels.get("gpu"), s.labels.get("user"))
            for s in fleet.api.query(states.CLAIMED_UNTIL)],
            lambda found: found == [(str(taken.cell), "alice")])
        # another run of two slices is refused in one line: CUDA takes one slice per process
        refused = subprocess.run(
            [sys.executable, "-m", "gpuwatch.cli", "run", "-n", "2", "--host", MIG_HOST,
             "--model", "1g.10gb", "--", "true"], env=run_env(fleet, "bob"),
            capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "CUDA runs one MIG slice per process; ask for -n 1" in refused.stderr
    finally:
        let_go.touch()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"CUDA_VISIBLE_DEVICES={taken.mig_uuid}\n" in out
    assert err.startswith(f"gpuwatch: claimed slice {taken.cell} of {MIG_HOST} for alice "), err
    assert fleet.active_claims() == []  # the run ended its claim


def test_a_slice_booking_is_served_by_its_cell_and_holds_its_gpu(
        mig_fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = mig_fleet
    fleet.wait_for("slice 0/7 in gpuwatch serve's fleet", lambda: service_cells(fleet),
                   lambda seen: "0/7" in seen)
    status, made = fleet.ask_service("POST", "/api/v1/reservations", "bob", {
        "host": MIG_HOST, "gpus": ["0/7"], "until": "+2h", "comment": "MIG test"})
    assert status == 201 and made["gpus"] == ["0/7"], made
    try:
        assert [(s["reserved_host"], s["gpu"], s["user"])
                for s in served_series(fleet, metrics.RESERVATION_END.name)] == [
            (MIG_HOST, "0/7", "bob")]
        # the whole GPU 0 overlaps it; a slice of a GPU without MIG does not exist
        status, answer = fleet.ask_service("POST", "/api/v1/reservations", "carol", {
            "host": MIG_HOST, "gpus": [0], "until": "+1h"})
        assert status == 409 and "slice 0/7 of mig-node is already booked" in answer["error"]
        status, answer = fleet.ask_service("POST", "/api/v1/reservations", "carol", {
            "host": MIG_HOST, "gpus": ["2/1"], "until": "+1h"})
        assert status == 400 and answer["error"].endswith("it has no slice 2/1"), answer
        for name, value in run_env(fleet, "bob").items():
            monkeypatch.setenv(name, value)
        code, out = run("reservations", "--host", MIG_HOST)
        assert code == 0 and out.splitlines()[1].split()[1:4] == [MIG_HOST, "0/7", "bob"], out
        fleet.wait_for("the booked slice in Prometheus", lambda: [
            (s.labels.get("gpu"), s.labels.get("user"))
            for s in fleet.api.query(states.RESERVED_UNTIL)],
            lambda found: found == [("0/7", "bob")])
    finally:
        fleet.ask_service("DELETE", f"/api/v1/reservations/{made['id']}", "bob")

"""`gpuwatch run` as people start it: 20 processes at once against a real `gpuwatch serve` (in
this process, basic auth from its web config) over a simulated fleet of 16 GPUs on this
machine's host name. Each command holds its GPU until the test lets go, so that 20 claims are
alive together: 16 get one GPU each, none the same, and 4 are refused in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from paths import REPO

from gpuwatch.cli import client
from gpuwatch.fleet import GpuStatus
from gpuwatch.serve.app import Serving, start
from gpuwatch.serve.options import ServeOptions

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

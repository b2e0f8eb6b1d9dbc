"""Fault injection: the exporter as a process on the fake libnvidia-ml, as it runs on a node.

The fake (tests/fakenvml) is loaded through the real nvidia-ml-py and ctypes, and the test
changes its faults while the exporter runs: hung calls at read and at open, an UNKNOWN
error on one field, a lost GPU with its Xid 79 and its return, processes whose names are not
UTF-8, a hundred scrapes at once, a thousand idle connections, silent TLS clients, and the
basic-auth cases. Bounds on time are generous behaviour checks (a hung call must not hang the
scrape), not speed targets.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import self_signed
from fakenvml import GCC, WARNINGS, Control, Gpu, Process, build, environment, logged_calls
from paths import REPO as ROOT
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed: the fake "
                                "libnvidia-ml cannot be built")

ROLE = ROOT / "ansible" / "roles" / "gpuwatch_exporter"
EXPORTER = [sys.executable, "-m", "gpuwatch.exporter"]
TIMEOUT = 1.0
"""--collection.timeout of the exporters here."""
MARGIN = 4.0
"""What a scrape may take beyond the collection timeout on a slow, shared machine."""
PR_SET_NAME = 15


# -- the exporter as a process -----------------------------------------------------------------


@dataclass
class Response:
    status: int
    body: str
    seconds: float


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Node:
    """A running exporter on the fake NVML."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path,
                 tls: ssl.SSLContext | None) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.tls = tls

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=self.tls)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str = "/metrics", timeout: float = TIMEOUT + MARGIN,
            auth: tuple[str, str | bytes] | None = None) -> Response:
        headers = {}
        if auth is not None:
            user, password = auth
            raw = user.encode() + b":" + (password if isinstance(password, bytes)
                                          else password.encode())
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        began = time.monotonic()
        connection = self.connection(timeout)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read().decode("utf-8", "replace")
            return Response(response.status, body, time.monotonic() - began)
        finally:
            connection.close()

    def scrape(self, timeout: float = TIMEOUT + MARGIN) -> list[Sample]:
        """One scrape that must answer 200 within timeout; its samples."""
        try:
            response = self.get(timeout=timeout)
        except OSError as e:
            pytest.fail(f"no answer to /metrics within {timeout:g} s ({e!r})\n{self.tail()}")
        assert response.status == 200, f"{response.status}: {response.body[:500]}\n{self.tail()}"
        return [Sample(s.name, dict(s.labels), s.value)
                for family in text_string_to_metric_families(response.body)
                for s in family.samples]

    def wait_for(self, check: Callable[[list[Sample]], bool], what: str,
                 seconds: float = 15.0) -> list[Sample]:
        end = time.monotonic() + seconds
        while True:
            samples = self.scrape()
            if check(samples):
                return samples
            if time.monotonic() > end:
                pytest.fail(f"not within {seconds:g} s: {what}\n{_gpu_lines(samples)}\n"
                            f"{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 15) -> str:
        return "exporter log:\n" + "\n".join(self.log.read_text(errors="replace")
                                             .splitlines()[-lines:])

    def proc_status(self, field: str) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
        assert match, field
        return int(match.group(1))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the exporter so far (/proc/PID/stat)."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def fresh(samples: list[Sample], gpu: int) -> bool:
    """The GPU answered this scrape: up 1 and a reading of its own."""
    return value(samples, "nvidia_gpu_up", gpu=str(gpu)) == 1 and \
        value(samples, "nvidia_gpu_temperature_celsius", gpu=str(gpu)) is not None


def marked_not_fresh(samples: list[Sample], gpu: int) -> bool:
    """The exporter says the GPU has no fresh reading: nvidia_gpu_up 0, or a per-GPU success
    metric at 0; it is not simply left out (the rules must see it as down, not missing)."""
    g = str(gpu)
    if value(samples, "nvidia_gpu_up", gpu=g) == 0:
        return True
    return any(s.labels.get("gpu") == g and s.value == 0 and s.name.startswith("nvidia_gpu_")
               and ("success" in s.name or "fresh" in s.name) for s in samples)


def _gpu_lines(samples: list[Sample]) -> str:
    return "\n".join(f"{s.name}{s.labels} {s.value}" for s in samples
                     if s.name in ("nvidia_gpu_up", "nvidia_gpu_nvml_up",
                                   "nvidia_gpu_scrape_collector_success")
                     or s.name.startswith("nvidia_gpu_xid"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def fake_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("fakenvml"))


Start = Callable[..., Node]


@pytest.fixture
def start(fake_library: Path, tmp_path: Path) -> Iterator[Start]:
    """start(control, *flags, tls=None, nofile=None): an exporter on the fake, serving."""
    nodes: list[Node] = []

    def _start(control: Control, *flags: str, tls: ssl.SSLContext | None = None,
               nofile: int | None = None, timeout: float = TIMEOUT) -> Node:
        port = free_port()
        log = tmp_path / f"exporter-{port}.log"
        env = environment(fake_library, control.path, tmp_path / "calls.log")
        limit = None if nofile is None else \
            (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*EXPORTER, "--web.listen-address", f"127.0.0.1:{port}",
                 "--collection.timeout", f"{timeout:g}", *flags],
                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
        node = Node(process, port, log, tls)
        nodes.append(node)
        _wait_until_serving(node)
        return node

    yield _start
    for node in nodes:  # no graceful stop: a call may hang in the fake on purpose
        node.process.kill()
        node.process.wait()


def _wait_until_serving(node: Node, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if node.process.poll() is not None:
            pytest.fail(f"the exporter exited with {node.process.returncode}\n{node.tail()}")
        with contextlib.suppress(OSError):
            node.get("/-/healthy", timeout=2)  # any answer: 401 too
            return
        time.sleep(0.1)
    pytest.fail(f"the exporter did not serve within {seconds:g} s\n{node.tail()}")


@pytest.fixture
def control(tmp_path: Path) -> Control:
    return Control.healthy(tmp_path / "control")


@pytest.fixture
def children() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """spawn(argv): a child process, ended at teardown; it prints "ready" once set up."""
    started: list[subprocess.Popen[str]] = []

    def spawn(argv: list[str | bytes]) -> subprocess.Popen[str]:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        return child

    yield spawn
    for child in started:
        child.kill()
        child.wait()


def test_the_fake_libnvidia_ml_compiles_without_warnings(fake_library: Path) -> None:
    assert (fake_library / WARNINGS).read_text() == ""


# -- hung calls ---------------------------------------------------------------------------------


def test_a_call_hung_at_read_costs_that_gpu_its_freshness_not_the_scrape(
        start: Start, control: Control) -> None:
    node = start(control)
    assert fresh(node.scrape(), 1)
    control.set_faults("hang 1 nvmlDeviceGetPowerUsage")
    for _ in range(2):  # the scrape that meets the hang, and one while it still hangs
        samples = node.scrape()
        assert fresh(samples, 0), _gpu_lines(samples)
        assert value(samples, "nvidia_gpu_power_usage_watts", gpu="0") is not None
        assert marked_not_fresh(samples, 1), \
            f"a hung GPU must not look up and fresh:\n{_gpu_lines(samples)}"
    control.set_faults()
    node.wait_for(lambda s: fresh(s, 1) and value(s, "nvidia_gpu_power_usage_watts", gpu="1")
                  is not None, "GPU 1 answers again once the call returns")


def test_calls_hung_when_a_gpu_is_opened_obey_the_collection_timeout(
        start: Start, tmp_path: Path) -> None:
    # GPU 1 hangs in its handle, GPU 2 in its UUID, GPU 3 in its memory: all at open
    control = Control(tmp_path / "control", [Gpu(i) for i in range(4)], faults=[
        "hang 1 nvmlDeviceGetHandleByIndex_v2", "hang 2 nvmlDeviceGetUUID",
        "hang 3 nvmlDeviceGetMemoryInfo", "hang 3 nvmlDeviceGetMemoryInfo_v2"])
    control.write()
    node = start(control)
    for _ in range(2):
        samples = node.scrape()
        assert fresh(samples, 0), _gpu_lines(samples)
        for gpu in (1, 2, 3):
            assert marked_not_fresh(samples, gpu), \
                f"GPU {gpu} hangs at open:\n{_gpu_lines(samples)}"
    control.set_faults()
    node.wait_for(lambda s: all(fresh(s, g) for g in range(4)), "every GPU opened")


def test_a_hung_nvml_init_and_device_count_obey_the_collection_timeout(
        start: Start, control: Control) -> None:
    control.set_faults("hang * nvmlInitWithFlags")
    node = start(control)

    def reported_failing(samples: list[Sample]) -> bool:
        return value(samples, "nvidia_gpu_nvml_up") == 0 or \
            value(samples, "nvidia_gpu_scrape_collector_success", collector="gpu") == 0

    samples = node.scrape()
    assert reported_failing(samples), _gpu_lines(samples)
    control.set_faults()
    node.wait_for(lambda s: fresh(s, 0) and fresh(s, 1), "NVML initialised after the hang")
    control.set_faults("hang * nvmlDeviceGetCount_v2")
    samples = node.scrape()
    assert reported_failing(samples) or not (fresh(samples, 0) or fresh(samples, 1)), \
        _gpu_lines(samples)
    control.set_faults()
    node.wait_for(lambda s: fresh(s, 0) and fresh(s, 1), "GPUs again after the count returned")


# -- errors of one field, lost GPUs, Xid --------------------------------------------------------


def test_unknown_error_of_one_field_leaves_only_that_field_out(
        start: Start, control: Control) -> None:
    control.set_faults("error 1 nvmlDeviceGetPowerUsage 999")
    node = start(control)
    samples = node.scrape()
    assert fresh(samples, 0) and fresh(samples, 1), _gpu_lines(samples)
    assert value(samples, "nvidia_gpu_power_usage_watts", gpu="1") is None
    assert value(samples, "nvidia_gpu_power_usage_watts", gpu="0") is not None
    for name in ("nvidia_gpu_power_limit_watts", "nvidia_gpu_memory_used_bytes",
                 "nvidia_gpu_utilization_ratio", "nvidia_gpu_processes"):
        assert value(samples, name, gpu="1") is not None, name


def test_a_lost_gpu_counts_its_xid_79_and_is_watched_again_when_it_returns(
        start: Start, control: Control) -> None:
    node = start(control)
    uuid = control.gpus[1].uuid
    assert fresh(node.scrape(), 1)
    time.sleep(0.5)  # the Xid watcher registers its event set after the first scrape
    control.set_faults("lost 1", "xid 1 79 fell-off-the-bus")

    def xid_79(samples: list[Sample]) -> float | None:
        return value(samples, "nvidia_gpu_xid_errors_total", gpu="1", uuid=uuid, xid="79")

    node.wait_for(lambda s: xid_79(s) == 1 and value(s, "nvidia_gpu_up", gpu="1") == 0,
                  f"Xid 79 counted for {uuid} and the GPU reported down")
    control.set_faults("xid 1 79 fell-off-the-bus")  # back on the bus; delivered already
    samples = node.wait_for(lambda s: fresh(s, 1), "GPU 1 up again after its return")
    assert fresh(samples, 0) and xid_79(samples) == 1
    control.set_faults("xid 1 79 fell-off-the-bus", "xid 1 79 and-again")
    node.wait_for(lambda s: xid_79(s) == 2, "a later Xid on the returned GPU counted")


def test_a_gpu_that_vanishes_from_the_count_is_reported_down(
        start: Start, control: Control) -> None:
    node = start(control)
    assert fresh(node.scrape(), 1)
    control.gpus = control.gpus[:1]
    control.write()
    samples = node.scrape()
    assert fresh(samples, 0)
    assert marked_not_fresh(samples, 1), _gpu_lines(samples)


def test_a_missing_driver_is_one_log_line_and_nvml_is_initialised_again_later(
        start: Start, control: Control) -> None:
    control.set_faults("init_error 9")  # NVML_ERROR_DRIVER_NOT_LOADED
    node = start(control)
    for _ in range(3):
        samples = node.scrape()
        assert value(samples, "nvidia_gpu_nvml_up") == 0, _gpu_lines(samples)
    complaints = [line for line in node.log.read_text().splitlines()
                  if re.search(r"level=(WARNING|ERROR|CRITICAL)", line)]
    assert len(complaints) == 1, "\n".join(complaints)
    assert "driver" in complaints[0]
    control.set_faults()
    node.wait_for(lambda s: fresh(s, 0) and fresh(s, 1), "GPUs once the driver is loaded")


def test_nvml_initialised_is_not_logged_on_every_scrape_while_calls_fail(
        start: Start, control: Control) -> None:
    node = start(control)
    assert fresh(node.scrape(), 0)
    control.set_faults("error * nvmlDeviceGetCount_v2 9")  # the driver went away after init
    for _ in range(5):
        node.scrape()
    initialised = [line for line in node.log.read_text().splitlines()
                   if "NVML initialised" in line]
    assert len(initialised) <= 2, "\n".join(initialised)


# -- labels that are not UTF-8 ------------------------------------------------------------------

_RENAME = ("import ctypes, time\n"
           f"ctypes.CDLL(None).prctl({PR_SET_NAME}, b'\\xff\\xfejob\\x80', 0, 0, 0)\n"
           "print('ready', flush=True)\ntime.sleep(60)\n")
_SLEEP = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.mark.parametrize(("mode", "argv"), [
    ("name", [sys.executable, "-c", _RENAME]),
    ("cmdline", [sys.executable, "-c", _SLEEP, b"--token=\xff\xfe\x80"]),
])
def test_a_process_name_or_command_line_that_is_not_utf8_is_served_with_replacement(
        start: Start, control: Control, children: Callable[..., subprocess.Popen[str]],
        mode: str, argv: list[str | bytes]) -> None:
    child = children(argv)
    control.processes = [Process(0, child.pid, 512 * 2**20)]
    control.write()
    node = start(control, f"--process.command={mode}")
    samples = node.scrape()
    commands = [s.labels.get("command", "") for s in samples
                if s.name == "nvidia_gpu_process_memory_used_bytes"
                and s.labels.get("pid") == str(child.pid)]
    assert commands, f"no series for pid {child.pid}\n{node.tail()}"
    assert "\ufffd" in commands[0], commands


# -- HTTP under load ----------------------------------------------------------------------------


def test_100_concurrent_scrapes_all_answer_and_share_a_few_collections(
        start: Start, control: Control, tmp_path: Path) -> None:
    # each collection takes at least 0.3 s, so scrapes arriving together overlap
    control.logged = ["nvmlDeviceGetUtilizationRates"]
    control.set_faults("hang 0 nvmlDeviceGetUtilizationRates 300")
    node = start(control, timeout=5.0)
    node.scrape(timeout=10)
    calls = tmp_path / "calls.log"
    before = logged_calls(calls, "nvmlDeviceGetUtilizationRates", gpu=0)
    barrier = threading.Barrier(100)
    statuses: list[int | str] = []

    def one() -> None:
        barrier.wait()
        try:
            statuses.append(node.get(timeout=15).status)
        except OSError as e:
            statuses.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert statuses == [200] * 100, sorted(map(str, statuses))
    backlog = listen_backlog(node.port)
    assert backlog is None or backlog >= 128, f"listen backlog {backlog}: SYNs get dropped"
    collections = logged_calls(calls, "nvmlDeviceGetUtilizationRates", gpu=0) - before
    assert 1 <= collections <= 10, f"{collections} collections for 100 scrapes"


def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on 127.0.0.1:port (ss shows it as Send-Q)."""
    try:
        done = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    backlogs = [int(line.split()[2]) for line in done.stdout.splitlines() if line.strip()]
    return min(backlogs) if backlogs else None


def unit_nofile_limit() -> int:
    """The soft LimitNOFILE of the shipped unit (a number, or a role variable's default)."""
    unit = (ROLE / "templates" / "gpuwatch-exporter.service.j2").read_text()
    match = re.search(r"^LimitNOFILE=(.+)$", unit, re.MULTILINE)
    if match is None:
        pytest.fail("the exporter's unit sets no LimitNOFILE")
    setting = match.group(1).strip()
    variable = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", setting)
    if variable is not None:
        defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
        setting = str(defaults[variable.group(1)])
    return int(setting.split(":")[0])


def test_1000_idle_connections_leave_a_scrape_answered_under_the_units_fd_limit(
        start: Start, control: Control) -> None:
    limit = unit_nofile_limit()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < max(limit, 1100):
        pytest.skip(f"the hard fd limit here ({hard}) is below what the test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, 1100) if hard ==
                                                resource.RLIM_INFINITY else hard, hard))
    node = start(control, nofile=limit)
    node.scrape()
    idle: list[socket.socket] = []
    end = time.monotonic() + 10
    try:
        while len(idle) < 1000 and time.monotonic() < end:
            with contextlib.suppress(OSError):  # a server at its cap may refuse some
                idle.append(socket.create_connection(("127.0.0.1", node.port), timeout=2))
        assert len(idle) == 1000, f"only {len(idle)} connections within 10 s"
        time.sleep(1.0)
        cpu = node.cpu_seconds()
        samples = node.scrape(timeout=TIMEOUT + 10)
        assert fresh(samples, 0)
        time.sleep(1.0)
        # a loop that spins at the fd limit burns the whole window
        assert node.cpu_seconds() - cpu < 1.5
        threads = node.proc_status("Threads")
        assert threads < 300, f"{threads} threads for 1000 idle connections: not bounded"
    finally:
        for s in idle:
            s.close()


def test_silent_tls_clients_do_not_hold_up_an_https_scrape_and_are_closed_in_time(
        start: Start, control: Control, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = tmp_path / "web.yml"
    config.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": str(cert),
                                                            "key_file": str(key)}}))
    client = ssl.create_default_context(cafile=str(cert))
    read_timeout = 2.0
    node = start(control, f"--web.config.file={config}", f"--web.read-timeout={read_timeout:g}",
                 tls=client)
    silent = []
    try:
        for i in range(64):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02")  # the first bytes of a ClientHello, no more
            silent.append(s)
        began = time.monotonic()
        samples = node.scrape(timeout=TIMEOUT + 10)
        assert fresh(samples, 0)
        for s in silent:  # the server hangs up on each once the handshake timeout is over
            s.settimeout(max(0.1, began + read_timeout + MARGIN - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail(f"a silent TLS client still connected {read_timeout + MARGIN:g} s "
                            f"after connecting, with --web.read-timeout={read_timeout:g}")
    finally:
        for s in silent:
            s.close()


# -- basic auth ---------------------------------------------------------------------------------

PASSWORD = "correct horse"


@pytest.fixture
def auth_node(start: Start, control: Control, tmp_path: Path) -> Node:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    config = tmp_path / "web.yml"
    config.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed}}))
    return start(control, f"--web.config.file={config}")


def test_basic_auth_answers_401_to_wrong_and_overlong_passwords(auth_node: Node) -> None:
    assert auth_node.get(auth=("prometheus", PASSWORD)).status == 200
    assert auth_node.get().status == 401
    assert auth_node.get(auth=("prometheus", "wrong")).status == 401
    assert auth_node.get(auth=("prometheus", "x" * 73)).status == 401
    assert auth_node.get(auth=("prometheus", PASSWORD + "x" * 80)).status == 401
    assert auth_node.get(auth=("prometheus", b"\xff\xfe")).status == 401
    assert "Traceback" not in auth_node.log.read_text(errors="replace"), auth_node.tail()


def test_200_wrong_passwords_cost_a_bounded_amount_of_cpu(auth_node: Node) -> None:
    # a bcrypt check at cost 10 takes ~70 ms here: 200 of them would be 14 s of CPU
    bound = 3.0
    before = auth_node.cpu_seconds()
    end = time.monotonic() + 30
    statuses = set()
    for attempt in range(200):
        statuses.add(auth_node.get(auth=("prometheus", "guess"), timeout=10).status)
        if attempt % 20 == 19 and (auth_node.cpu_seconds() - before > bound
                                   or time.monotonic() > end):
            break
    spent = auth_node.cpu_seconds() - before
    assert statuses <= {401, 429}, statuses
    assert spent < bound, f"{attempt + 1} wrong attempts cost {spent:.1f} s of CPU"


def test_a_malformed_bcrypt_hash_is_refused_at_start(
        fake_library: Path, control: Control, tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text(yaml.safe_dump({"basic_auth_users": {"alice": "$2b$10$tooshort"}}))
    port = free_port()
    process = subprocess.Popen(
        [*EXPORTER, "--web.listen-address", f"127.0.0.1:{port}", f"--web.config.file={config}"],
        env=environment(fake_library, control.path), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 20
    while process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            process.kill()
            process.communicate()
            pytest.fail("the exporter started serving with a malformed bcrypt hash")
        if time.monotonic() > end:
            process.kill()
            pytest.fail("the exporter neither exited nor served")
        time.sleep(0.1)
    err = process.communicate()[1]
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and "alice" in lines[0], err

"""The fleet as Prometheus sees it: one record per cell (a whole GPU or a MIG slice, see
gpuwatch.cells), and which free cells to take.

The state and the users come from the recording rule ``instance_gpu:gpuwatch_state:info``
(its ``cluster`` label too, where the targets file sets one, and its evaluation time: when
the grid was computed); model, memory, utilisation, temperature and the processes (pid, user,
command, memory, start time) from the exporter's series, the reservation of a booked GPU from
``instance_gpu:gpuwatch_reserved_until:timestamp_seconds`` and the claim of a claimed one
(``gpuwatch run``) from ``instance_gpu:gpuwatch_claimed_until:timestamp_seconds``, joined by
(instance, gpu) where ``gpu`` is the cell ("0", "0/7"; a slice's raw series carry its
parent's index in ``gpu`` and ``gpu_instance_id``).
A GPU whose latest ``nvidia_gpu_up`` is not 1 is down whatever the rule says, and so are its
slices: the rule was evaluated before the scrape that found the GPU hung, or by rules older
than the exporter, and a GPU is never free (never picked) without a fresh reading.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from gpuwatch.cells import Cell
from gpuwatch.contract import metrics, states
from gpuwatch.fleet.prometheus import Prometheus, Sample

# One query for what the grid shows besides the state: names known to be plain series
_DETAILS = (metrics.MEMORY_USED.name, metrics.MEMORY_TOTAL.name, metrics.UTILIZATION.name,
            metrics.INFO.name, metrics.UP.name, metrics.TEMPERATURE.name, states.INACTIVE_SINCE,
            states.RESERVED_UNTIL, states.CLAIMED_UNTIL, metrics.MIG_MEMORY_USED.name,
            metrics.MIG_MEMORY_TOTAL.name, metrics.MIG_INFO.name)
# Several series per GPU (one per process), in the same query
_PROCESS_SERIES = (metrics.PROCESS_MEMORY.name, metrics.PROCESS_START.name)
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ActiveReservation:
    """The active reservation of a GPU, as Prometheus has it."""

    user: str
    until: str
    """ISO 8601, in the reservation's own time zone."""
    until_timestamp: float
    comment: str

    @property
    def text(self) -> str:
        """alice until 2024-05-31 23:59+02:00 (NeurIPS deadline)"""
        until = dt.datetime.fromisoformat(self.until).isoformat(sep=" ", timespec="minutes")
        return f"{self.user} until {until}" + (f" ({self.comment})" if self.comment else "")


def _active_reservation(sample: Sample) -> ActiveReservation:
    """The reservation of a sample of the reserved-until rule: its end exactly (the value), in
    the zone the reservation was written in (the until label)."""
    try:
        zone = dt.datetime.fromisoformat(sample.labels.get("until", "")).tzinfo
    except ValueError:
        zone = None
    until = dt.datetime.fromtimestamp(sample.value, zone or dt.timezone.utc)
    return ActiveReservation(user=sample.labels.get("user", ""),
                             until=until.isoformat(timespec="seconds"),
                             until_timestamp=sample.value,
                             comment=sample.labels.get("comment", ""))


@dataclass(frozen=True)
class ActiveClaim:
    """The active claim of a GPU (``gpuwatch run``, through ``gpuwatch serve``), as Prometheus
    has it; ``gpuwatch status --json`` prints exactly these fields."""

    id: str
    """The claim's id in gpuwatch serve (``DELETE /api/v1/claims/{id}``)."""
    user: str
    until: str
    """ISO 8601, in UTC: when the claim ends unless its owner's job starts before."""

    @property
    def text(self) -> str:
        """claimed by alice until 2024-05-31 21:59+00:00"""
        until = dt.datetime.fromisoformat(self.until).isoformat(sep=" ", timespec="minutes")
        return f"claimed by {self.user} until {until}"


def _active_claim(sample: Sample) -> ActiveClaim:
    """The claim of a sample of the claimed-until rule: its end is the value."""
    until = dt.datetime.fromtimestamp(sample.value, dt.timezone.utc)
    return ActiveClaim(id=sample.labels.get("id", ""), user=sample.labels.get("user", ""),
                       until=until.isoformat(timespec="seconds"))


@dataclass(frozen=True)
class GpuProcess:
    """A process on a GPU, as the exporter's process collector lists it."""

    pid: int
    user: str
    command: str
    memory_bytes: float | None
    """Device memory it holds; None when the exporter does not say."""
    start_time: float | None
    """Unix time it started; None when the exporter does not say."""


@dataclass(frozen=True)
class GpuStatus:
    host: str
    instance: str
    gpu: int
    uuid: str
    state: str
    users: tuple[str, ...]
    model: str
    display_name: str
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    utilization_ratio: float | None
    inactive_since: float | None
    """Unix time since which the GPU has been held without work; None while it works."""
    reservation: ActiveReservation | None = None
    """Its active reservation (gpuwatch reserve), whatever its state; None when not booked."""
    claim: ActiveClaim | None = None
    """Its active claim (gpuwatch run), whatever its state; None when not claimed."""
    temperature_celsius: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    """Its processes, the most memory first (those the exporter could not look up are not
    here: nvidia_gpu_processes_unresolved counts them)."""
    since: float | None = None
    """Unix time since which it has been in its state, where the series tell: idle since it
    went without work, busy since its oldest process started; None when unknown."""
    cluster: str | None = None
    """The target's ``cluster`` label (the targets file), None without one."""
    updated: float | None = None
    """Unix time of the rule evaluation its state comes from (how fresh it is)."""
    gpu_instance_id: int | None = None
    """For a MIG slice, its GPU instance id (``gpu`` is then its parent's index); None for a
    whole GPU."""
    profile: str | None = None
    """For a MIG slice, its profile (``1g.10gb``); None for a whole GPU."""
    mig_uuid: str | None = None
    """For a MIG slice, its MIG UUID (what CUDA_VISIBLE_DEVICES takes); None for a whole GPU."""

    @property
    def cell(self) -> Cell:
        """The cell of the grid it is: a whole GPU (0) or a MIG slice (0/7)."""
        return Cell(self.gpu, self.gpu_instance_id)

    def to_json(self) -> dict[str, object]:
        """What ``gpuwatch status --json`` prints: the same from Prometheus and from
        VictoriaMetrics and from one question to the next while nothing changes (so without
        the processes, ``since`` and ``updated``, which to_api() adds)."""
        out = asdict(self)
        out["users"] = list(self.users)
        for moving in _API_ONLY:
            del out[moving]
        return out

    def to_api(self) -> dict[str, object]:
        """The GPU in gpuwatch serve's /api/v1/fleet: to_json() and the processes, since when
        it is in its state and when that was evaluated."""
        out = self.to_json()
        out["processes"] = [asdict(p) for p in self.processes]
        out["since"] = self.since
        out["updated"] = self.updated
        return out


_API_ONLY = ("processes", "since", "updated")


def matches_model(gpu: GpuStatus, model: str) -> bool:
    """Whether `gpu` is of the model asked for (``--model``, a claim's model), ignoring case:
    a whole GPU when `model` is part of its model or is its display name; a MIG slice when
    `model` is its profile (``1g.10gb``) or its display name (``A100-SXM4-80GB 1g.10gb``)."""
    wanted = model.strip().lower()
    if not wanted:
        return True
    if wanted == gpu.display_name.lower():
        return True
    if gpu.gpu_instance_id is not None:
        return wanted == (gpu.profile or "").lower()
    return wanted in gpu.model.lower()


class FleetError(Exception):
    """A question about the fleet that has no answer (not enough free GPUs, unknown host)."""


Key = tuple[str, str]


def _key(labels: Mapping[str, str]) -> Key:
    """(instance, cell text) of a series: a rule's cell series carries the cell in ``gpu``
    ("0", "0/7"); a raw series of a slice its parent's index in ``gpu`` and the GPU instance
    in ``gpu_instance_id``. A series that names no cell keeps its gpu label as it is."""
    instance, gpu = labels.get("instance", ""), labels.get("gpu", "")
    slice_ = labels.get(metrics.MIG_PROCESS_LABEL)
    if slice_ and "/" not in gpu:  # plain string work: 100,000 series at 10,000 GPUs
        return instance, f"{gpu}/{slice_}"
    return instance, gpu


def _mig_enabled(info: Sample | None) -> bool:
    return info is not None and info.labels.get("mig_mode", "") == "enabled"


def read_fleet(prometheus: Prometheus, processes: bool = True) -> list[GpuStatus]:
    """Every cell Prometheus knows (whole GPUs and MIG slices), sorted by host, instance and
    cell (a GPU's slices right after the lower whole GPUs, by GPU instance id).

    A MIG slice: its memory from the slice's series, its temperature from its parent (NVML has
    neither utilisation nor temperature per slice), its processes those on its GPU instance,
    its profile and MIG UUID from the rule (or nvidia_gpu_mig_info), down when its parent is.
    A MIG-enabled GPU is not a cell (CUDA runs on its slices): rules older than the exporter
    that still give it a state are not believed. Without `processes` the process series are
    not asked for (`gpuwatch status` and `pick` show none of them; at 10,000 GPUs they are
    most of the answer), so each GPU's processes are () and `since` is known only for idle."""
    rows = prometheus.query(states.STATE_INFO)
    evaluated = {_key(s.labels): s.value
                 for s in prometheus.query(f"timestamp({states.STATE_INFO})")}
    details: dict[str, dict[Key, Sample]] = {name: {} for name in _DETAILS}
    by_pid: dict[Key, dict[str, dict[str, Sample]]] = {}
    names = _DETAILS + (_PROCESS_SERIES if processes else ())
    for s in prometheus.query(f'{{__name__=~"{"|".join(names)}"}}'):
        name, key = s.labels.get("__name__", ""), _key(s.labels)
        if name in _PROCESS_SERIES:
            by_pid.setdefault(key, {}).setdefault(s.labels.get("pid", ""), {})[name] = s
        elif name == metrics.MIG_INFO.name:
            # one per compute instance of the GPU instance: the lowest, to be the same each time
            other = details[name].get(key)
            if other is None or _compute_instance(s) < _compute_instance(other):
                details[name][key] = s
        else:
            details.setdefault(name, {})[key] = s

    def value(name: str, key: Key) -> float | None:
        found = details[name].get(key)
        return found.value if found is not None else None

    fleet = []
    for row in rows:
        labels, key = row.labels, _key(row.labels)
        try:
            cell = Cell.parse(labels.get("gpu", ""))
        except ValueError:
            continue  # not a cell series of ours
        parent = (key[0], str(cell.whole))
        info = details[metrics.INFO.name].get(parent)
        if not cell.is_slice and _mig_enabled(info):
            continue
        reserved = details[states.RESERVED_UNTIL].get(key)
        claimed = details[states.CLAIMED_UNTIL].get(key)
        model = labels.get("model", "")
        state = labels.get("state", "")
        if state != states.DOWN.name and value(metrics.UP.name, parent) != 1:
            state = states.DOWN.name
        inactive_since = value(states.INACTIVE_SINCE, key)
        running = _processes(by_pid.get(key, {}))
        display_name = (info.labels.get("display_name", "") if info else "") or model
        profile = mig_uuid = None
        if cell.is_slice:
            mig = details[metrics.MIG_INFO.name].get(key)
            mig_labels = mig.labels if mig is not None else {}
            profile = labels.get("profile") or mig_labels.get("profile") or None
            mig_uuid = labels.get("mig_uuid") or mig_labels.get("mig_uuid") or None
            display_name = f"{display_name} {profile or ''}".strip()
            memory_used = value(metrics.MIG_MEMORY_USED.name, key)
            memory_total = value(metrics.MIG_MEMORY_TOTAL.name, key)
            utilization = None
        else:
            memory_used = value(metrics.MEMORY_USED.name, key)
            memory_total = value(metrics.MEMORY_TOTAL.name, key)
            utilization = value(metrics.UTILIZATION.name, key)
        fleet.append(GpuStatus(
            host=labels.get("host") or labels.get("instance", ""),
            instance=labels.get("instance", ""),
            gpu=cell.gpu,
            uuid=labels.get("uuid", ""),
            state=state,
            users=tuple(u for u in labels.get("users", "").split(",") if u),
            model=model,
            display_name=display_name,
            memory_used_bytes=memory_used,
            memory_total_bytes=memory_total,
            utilization_ratio=utilization,
            inactive_since=inactive_since,
            reservation=_active_reservation(reserved) if reserved is not None else None,
            claim=_active_claim(claimed) if claimed is not None else None,
            temperature_celsius=value(metrics.TEMPERATURE.name, parent),
            processes=running,
            since=_since(state, inactive_since, running),
            cluster=labels.get("cluster") or None,
            updated=evaluated.get(key),
            gpu_instance_id=cell.instance,
            profile=profile,
            mig_uuid=mig_uuid,
        ))
    return sorted(fleet, key=lambda g: (g.host, g.instance, g.cell.sort_key()))


def _compute_instance(sample: Sample) -> tuple[int, str]:
    raw = sample.labels.get("compute_instance_id", "")
    return (int(raw), raw) if raw.isdigit() else (1 << 30, raw)


def _processes(series: Mapping[str, Mapping[str, Sample]]) -> tuple[GpuProcess, ...]:
    """A GPU's processes from their memory and start-time series (keyed by pid)."""
    found = []
    for pid, by_name in series.items():
        try:
            number = int(pid)
        except ValueError:
            continue
        memory = by_name.get(metrics.PROCESS_MEMORY.name)
        start = by_name.get(metrics.PROCESS_START.name)
        either = memory or start
        labels = either.labels if either is not None else {}
        found.append(GpuProcess(pid=number, user=labels.get("user", ""),
                                command=labels.get("command", ""),
                                memory_bytes=memory.value if memory is not None else None,
                                start_time=start.value if start is not None else None))
    return tuple(sorted(found, key=lambda p: (-(p.memory_bytes or 0.0), p.pid)))


def _since(state: str, inactive_since: float | None,
           running: Sequence[GpuProcess]) -> float | None:
    """Since when the GPU is in its state, where its series tell."""
    if state == states.IDLE.name:
        return inactive_since
    starts = [p.start_time for p in running if p.start_time is not None]
    if state == states.BUSY.name and starts:
        return min(starts)
    return None


def local_names(prometheus_url: str) -> list[str]:
    """The names this machine may have as a target, most specific first.

    The loopback names count only when Prometheus runs here too: a target "localhost" is
    Prometheus' own machine.
    """
    hostname = socket.gethostname()
    names = [socket.getfqdn(), hostname, hostname.split(".")[0]]
    prometheus_host = urllib.parse.urlsplit(prometheus_url).hostname or ""
    if _is_loopback(prometheus_host) or prometheus_host in names:
        names += _LOOPBACK_NAMES
    return list(dict.fromkeys(n for n in names if n))


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def gpus_of_host(fleet: Sequence[GpuStatus], names: Iterable[str]) -> list[GpuStatus]:
    """The GPUs of the first of `names` that is a host (or an instance) in the fleet.

    FleetError when none is, or when that host has several targets (indices would clash).
    """
    names = list(names)
    for name in names:
        gpus = [g for g in fleet if name.lower() in (g.host.lower(), g.instance.lower())]
        if not gpus:
            continue
        instances = sorted({g.instance for g in gpus})
        if len(instances) > 1:
            raise FleetError(f"{name} has several exporters ({', '.join(instances)}); "
                             "pass --host with one of them")
        return gpus
    hosts = sorted({g.host for g in fleet})
    raise FleetError(f"{' / '.join(names) or 'this host'} is not among the hosts Prometheus "
                     f"knows ({', '.join(hosts) or 'none'}); pass --host")


ONE_SLICE = "CUDA runs one MIG slice per process; ask for -n 1"
"""Why more than one MIG slice is never handed out together."""


def pick(gpus: Sequence[GpuStatus], count: int, user: str | None = None,
         model: str | None = None) -> list[GpuStatus]:
    """`count` cells of one host to run on: those reserved for `user` and not in use first,
    then free ones; whole GPUs before slices, lowest first; a MIG slice only when one cell is
    wanted (CUDA runs one MIG device per process), the most memory first, and only with its
    MIG UUID (what CUDA_VISIBLE_DEVICES takes). `model` keeps those matches_model() takes.
    FleetError when there are fewer."""
    host = gpus[0].host if gpus else "this host"
    if model:
        gpus = [g for g in gpus if matches_model(g, model)]
        if not gpus:
            raise FleetError(f"{host} has no GPU of the model {model!r}")
        if count > 1 and all(g.gpu_instance_id is not None for g in gpus):
            raise FleetError(f"{host} has {model!r} only as MIG slices: {ONE_SLICE}")

    def mine(g: GpuStatus) -> bool:
        return bool(user) and g.state == states.RESERVED.name and not g.users and \
            g.reservation is not None and g.reservation.user == user

    whole = [g for g in gpus if g.gpu_instance_id is None]
    slices = [g for g in gpus if g.gpu_instance_id is not None and g.mig_uuid]
    cells = whole + slices
    chosen = choose([g for g in cells if mine(g)],
                    [g for g in cells if g.state == states.FREE.name], count)
    if len(chosen) == count:
        return chosen
    mine_whole = [g for g in whole if mine(g)]
    free_whole = [g for g in whole if g.state == states.FREE.name]
    free_slices = [g for g in slices if g.state == states.FREE.name]
    found = mine_whole + free_whole
    which = f": {', '.join(str(g.gpu) for g in found)}" if found else ""
    reserved = f" (and {len(mine_whole)} booked by {user})" if mine_whole else ""
    of_model = f" {model}" if model else ""
    if len(whole) == len(gpus):  # no MIG here
        raise FleetError(f"{host} has {_count(len(free_whole), 'free GPU')}{reserved} "
                         f"(of {len(whole)}{of_model}), {count} wanted{which}")
    pieces = len(gpus) - len(whole)
    raise FleetError(f"{host} has {_count(len(free_whole), 'free GPU')}{reserved} and "
                     f"{_count(len(free_slices), 'free MIG slice')} (of "
                     f"{_count(len(whole), 'GPU')} and {_count(pieces, 'MIG slice')}"
                     f"{of_model}), {count} wanted{which}"
                     + (f"; {ONE_SLICE}" if free_slices else ""))


def choose(mine: Sequence[GpuStatus], free: Sequence[GpuStatus],
           count: int) -> list[GpuStatus]:
    """What a pick or a claim of `count` cells takes (`gpuwatch pick`, gpuwatch serve's
    claims): the asker's booked cells before free ones; in each, whole GPUs lowest first,
    then MIG slices, but only for a count of 1 (CUDA runs one MIG device per process), the
    most memory first, then the lowest cell. Fewer than `count` when there are not enough."""
    def ranked(cells: Sequence[GpuStatus]) -> list[GpuStatus]:
        whole = sorted((g for g in cells if not g.cell.is_slice), key=lambda g: g.cell.sort_key())
        if count != 1:
            return whole
        return whole + sorted((g for g in cells if g.cell.is_slice),
                              key=lambda g: (-(g.memory_total_bytes or 0.0), g.cell.sort_key()))

    return (ranked(mine) + ranked(free))[:count]


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"

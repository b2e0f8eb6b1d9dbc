"""The metric contract: every series gpuwatch-exporter serves, defined once.

Collectors build their families from these definitions; the README's metrics reference,
the rule and dashboard checks and the tests read them from here. Names follow the
Prometheus conventions: prefix ``nvidia_gpu_``, base units, ``_total`` on counters.
Device series carry the labels ``gpu`` (the NVML index) and ``uuid`` and nothing else
descriptive: model, driver and bus id live on ``nvidia_gpu_info``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

DEVICE_LABELS = ("gpu", "uuid")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()
    """Labels beyond the device labels (or all labels, for exporter metrics)."""
    device: bool = True
    """Carries ``gpu`` and ``uuid``."""
    field: str | None = None
    """The GpuReading attribute holding a scalar value, for plain per-device series."""
    collector: str = "gpu"
    """The collector that serves it (``--no-collector.<name>`` turns it off)."""

    @property
    def label_names(self) -> tuple[str, ...]:
        return (DEVICE_LABELS + self.labels) if self.device else self.labels

    @property
    def family_name(self) -> str:
        """The name prometheus_client expects: counters without their ``_total``."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


def _gauge(name: str, help: str, field: str | None = None, labels: tuple[str, ...] = (),
           collector: str = "gpu") -> MetricDef:
    return MetricDef(name, "gauge", help, labels, field=field, collector=collector)


def _counter(name: str, help: str, field: str | None = None, labels: tuple[str, ...] = (),
             collector: str = "gpu") -> MetricDef:
    return MetricDef(name, "counter", help, labels, field=field, collector=collector)


INFO_LABELS = ("name", "display_name", "pci_bus_id", "driver_version", "cuda_version",
               "vbios_version", "mig_mode", "compute_mode")

INFO = _gauge("nvidia_gpu_info", "Descriptive attributes of the GPU; always 1.", labels=INFO_LABELS)
UP = _gauge("nvidia_gpu_up", "1 when the GPU answered this scrape (opened, its handle and UUID "
            "answered, and its reading finished within --collection.timeout); 0 when it did "
            "not, and nvidia_gpu_down_info says why.", collector="")
DOWN_INFO = _gauge("nvidia_gpu_down_info",
                   "Why the GPU reports nvidia_gpu_up 0, only while it does; always 1. reason: "
                   "lost (NVML says so), timeout (no answer within --collection.timeout), "
                   "hung (a call from an earlier scrape has not returned), open_failed (no "
                   "handle or UUID for another reason), missing (no longer in NVML's device "
                   "count).", labels=("reason",), collector="")

UTILIZATION = _gauge("nvidia_gpu_utilization_ratio",
                     "Fraction of the last sample period in which a kernel ran (nvidia-smi "
                     "utilization.gpu).", "utilization_ratio")
MEMORY_UTILIZATION = _gauge("nvidia_gpu_memory_utilization_ratio",
                            "Fraction of the last sample period in which device memory was read "
                            "or written (nvidia-smi utilization.memory).",
                            "memory_utilization_ratio")
MEMORY_TOTAL = _gauge("nvidia_gpu_memory_total_bytes", "Installed device memory in bytes.",
                      "memory_total_bytes")
MEMORY_USED = _gauge("nvidia_gpu_memory_used_bytes", "Device memory allocated, in bytes.",
                     "memory_used_bytes")
MEMORY_FREE = _gauge("nvidia_gpu_memory_free_bytes", "Device memory free, in bytes.",
                     "memory_free_bytes")
MEMORY_RESERVED = _gauge("nvidia_gpu_memory_reserved_bytes",
                         "Device memory reserved by the driver and firmware, in bytes.",
                         "memory_reserved_bytes")
TEMPERATURE = _gauge("nvidia_gpu_temperature_celsius", "GPU die temperature in degrees Celsius.",
                     "temperature_celsius")
TEMPERATURE_SLOWDOWN = _gauge("nvidia_gpu_temperature_slowdown_celsius",
                              "Temperature at which the GPU starts to slow down, in degrees "
                              "Celsius.", "temperature_slowdown_celsius")
TEMPERATURE_SHUTDOWN = _gauge("nvidia_gpu_temperature_shutdown_celsius",
                              "Temperature at which the GPU shuts down, in degrees Celsius.",
                              "temperature_shutdown_celsius")
POWER_USAGE = _gauge("nvidia_gpu_power_usage_watts", "Power drawn by the whole board, in watts.",
                     "power_usage_watts")
POWER_LIMIT = _gauge("nvidia_gpu_power_limit_watts", "Enforced power limit, in watts.",
                     "power_limit_watts")
ENERGY = _counter("nvidia_gpu_energy_joules_total",
                  "Energy consumed since the driver was loaded, in joules.", "energy_joules")
FAN_SPEED = _gauge("nvidia_gpu_fan_speed_ratio", "Fan speed as a fraction of its maximum.",
                   "fan_speed_ratio")
PERFORMANCE_STATE = _gauge("nvidia_gpu_performance_state",
                           "Performance state: 0 (P0, maximum) to 15 (P15, minimum).",
                           "performance_state")
ENCODER_UTILIZATION = _gauge("nvidia_gpu_encoder_utilization_ratio",
                             "Fraction of time the video encoder was busy.",
                             "encoder_utilization_ratio")
DECODER_UTILIZATION = _gauge("nvidia_gpu_decoder_utilization_ratio",
                             "Fraction of time the video decoder was busy.",
                             "decoder_utilization_ratio")
CLOCK = _gauge("nvidia_gpu_clock_hertz", "Current clock frequency in hertz.", labels=("clock",))
CLOCK_MAX = _gauge("nvidia_gpu_clock_max_hertz", "Maximum clock frequency in hertz.",
                   labels=("clock",))
CLOCK_EVENT = _gauge("nvidia_gpu_clock_event_active",
                     "1 while the reason is holding the clocks down (throttling), else 0; a "
                     "reason is served from the first time it is active on the GPU.",
                     labels=("reason",))
ECC_ERRORS = _counter("nvidia_gpu_ecc_errors_total",
                      "ECC memory errors; scope volatile since the last driver load, aggregate "
                      "over the GPU's life.", labels=("type", "scope"))

# Health signals. The PCIe link is served always; the others are zero on a healthy GPU and
# are served from the first time they are not (one series per GPU and signal would be a
# third of a GPU's series budget, docs/scale.md): absent means zero or not supported.
PCIE_LINK_GENERATION = _gauge("nvidia_gpu_pcie_link_generation",
                              "PCIe generation the GPU's link runs at now (nvidia-smi "
                              "pcie.link.gen.current); many GPUs drop it while idle to save "
                              "power. Read at most once a minute.", "pcie_link_generation")
PCIE_LINK_GENERATION_MAX = _gauge("nvidia_gpu_pcie_link_generation_max",
                                  "Highest PCIe generation the GPU and the slot allow "
                                  "(nvidia-smi pcie.link.gen.max).", "pcie_link_generation_max")
PCIE_LINK_WIDTH = _gauge("nvidia_gpu_pcie_link_width",
                         "PCIe lanes the GPU's link runs with now (nvidia-smi "
                         "pcie.link.width.current). Read at most once a minute.",
                         "pcie_link_width")
PCIE_LINK_WIDTH_MAX = _gauge("nvidia_gpu_pcie_link_width_max",
                             "Most PCIe lanes the GPU and the slot allow (nvidia-smi "
                             "pcie.link.width.max).", "pcie_link_width_max")
PCIE_REPLAYS = _counter("nvidia_gpu_pcie_replays_total",
                        "PCIe packets the GPU's link had to send again (nvidia-smi "
                        "pcie.replay_counter) since the driver was loaded; served from the "
                        "first replay on.")
REMAPPED_ROWS = _counter("nvidia_gpu_remapped_rows_total",
                         "Memory rows remapped to spare rows over the GPU's life, by the cause "
                         "(correctable or uncorrectable ECC errors; nvidia-smi -q "
                         "\"Remapped Rows\"); served from the first remapped row of the cause "
                         "on.", labels=("cause",))
ROW_REMAP_PENDING = _gauge("nvidia_gpu_row_remap_pending",
                           "1 while a row remapping waits for a GPU reset to take effect; "
                           "served from the first time one does.")
ROW_REMAP_FAILURE = _gauge("nvidia_gpu_row_remap_failure",
                           "1 when a row remapping failed (no spare row left): the GPU needs "
                           "replacing; served from the first time one fails.")
RETIRED_PAGES = _counter("nvidia_gpu_retired_pages_total",
                         "Memory pages retired over the GPU's life (GPUs before row remapping), "
                         "by the cause (single_bit_ecc: many corrected errors, double_bit_ecc); "
                         "served from the first retired page of the cause on.",
                         labels=("cause",))
RETIRED_PAGES_PENDING = _gauge("nvidia_gpu_retired_pages_pending",
                               "1 while a page retirement waits for a GPU reset or reboot; "
                               "served from the first time one does.")
NVLINK_ERRORS = _counter("nvidia_gpu_nvlink_errors_total",
                         "NVLink errors summed over the GPU's links, by type (crc_flit, "
                         "crc_data, replay, recovery), since the driver was loaded; served from "
                         "the first error of the type on.", labels=("type",))
NVLINK_LINKS_INACTIVE = _gauge("nvidia_gpu_nvlink_links_inactive",
                               "NVLinks of the GPU that are not active; served from the first "
                               "time one is not.")

# MIG. A slice is addressed like a GPU: `gpu` and `uuid` are its parent's, and
# `gpu_instance_id` (the GPU instance, as nvidia-smi and CUDA number it) tells the slices of a
# GPU apart; the profile, the compute instance and the MIG UUID (what CUDA_VISIBLE_DEVICES
# takes) are on nvidia_gpu_mig_info only. What NVML does not report per slice (utilisation,
# temperature, power, clocks, health) stays on the parent GPU's series.
MIG_LABELS = ("gpu_instance_id",)
MIG_INFO_LABELS = ("gpu_instance_id", "compute_instance_id", "profile", "mig_uuid")
MIG_INFO = _gauge("nvidia_gpu_mig_info",
                  "One MIG device (a compute instance of a GPU instance) of a MIG-enabled GPU: "
                  "its profile as nvidia-smi names it (1g.10gb), its MIG UUID; always 1. The "
                  "slices are walked again at most once a minute, or when one fails.",
                  labels=MIG_INFO_LABELS)
MIG_MEMORY_TOTAL = _gauge("nvidia_gpu_mig_memory_total_bytes",
                          "Device memory of the MIG slice (GPU instance), in bytes.",
                          labels=MIG_LABELS)
MIG_MEMORY_USED = _gauge("nvidia_gpu_mig_memory_used_bytes",
                         "Device memory allocated on the MIG slice (GPU instance), in bytes.",
                         labels=MIG_LABELS)
MIG_MODE_PENDING = _gauge("nvidia_gpu_mig_mode_change_pending",
                          "1 while a change of the GPU's MIG mode (nvidia_gpu_info mig_mode is "
                          "the current one) waits for a GPU reset; served only while it does.")

XID_ERRORS = _counter("nvidia_gpu_xid_errors_total",
                      "Xid critical errors reported by the driver since the exporter started.",
                      labels=("xid",), collector="xid")
XID_LAST = _gauge("nvidia_gpu_xid_last_timestamp_seconds",
                  "Unix time of the last Xid error of this code.", labels=("xid",),
                  collector="xid")

PROCESS_LABELS = ("pid", "user", "command", "container_id", "slurm_job_id")
PROCESSES = _gauge("nvidia_gpu_processes",
                   "Compute and graphics processes on the GPU as NVML lists them, counted once "
                   "per pid (those the host could not look up included).", collector="process")
PROCESSES_UNRESOLVED = _gauge("nvidia_gpu_processes_unresolved",
                              "Processes on the GPU that the host could not look up (exited "
                              "since NVML listed them, or in another pid namespace): counted "
                              "in nvidia_gpu_processes, without per-process series.",
                              collector="process")
PROCESS_MEMORY = _gauge("nvidia_gpu_process_memory_used_bytes",
                        "Device memory held by the process, in bytes.", labels=PROCESS_LABELS,
                        collector="process")
PROCESS_START = _gauge("nvidia_gpu_process_start_time_seconds",
                       "Unix time the process started.", labels=PROCESS_LABELS,
                       collector="process")
PROCESS_DROPPED = _counter("nvidia_gpu_process_series_dropped_total",
                           "Processes left out of the per-process series by the per-GPU cap "
                           "(--process.max-per-gpu), summed over collections.",
                           collector="process")
USER_MEMORY = _gauge("nvidia_gpu_user_memory_used_bytes",
                     "Device memory held by all processes of the user, in bytes.",
                     labels=("user",), collector="process")
USER_PROCESSES = _gauge("nvidia_gpu_user_processes", "Processes of the user on the GPU.",
                        labels=("user",), collector="process")
USERS_INFO = _gauge("nvidia_gpu_users_info",
                    "The users holding the GPU, sorted and comma-separated (empty when free); "
                    "always 1.", labels=("users",), collector="process")
MIG_PROCESSES = _gauge("nvidia_gpu_mig_processes",
                       "Processes on the MIG slice (GPU instance), counted as "
                       "nvidia_gpu_processes counts them.", labels=MIG_LABELS,
                       collector="process")
MIG_USERS_INFO = _gauge("nvidia_gpu_mig_users_info",
                        "The users holding the MIG slice (GPU instance), sorted and "
                        "comma-separated (empty when free); always 1.",
                        labels=(*MIG_LABELS, "users"), collector="process")
MIG_PROCESS_LABEL = "gpu_instance_id"
"""On a MIG-enabled GPU only, the process series (nvidia_gpu_process_*) and the per-user
roll-ups (nvidia_gpu_user_*) carry this label too: the slice the process runs on. A GPU
without MIG serves them without it."""

RESERVATION_LABELS = ("reserved_host", "gpu", "user", "until", "comment")
RESERVATION_END = MetricDef(
    "nvidia_gpu_reservation_end_timestamp_seconds", "gauge",
    "Unix time at which an active booking of the reservations file ends. reserved_host is "
    "the booked host as `gpuwatch status` names it (the scraping job's own host label stays "
    "apart), gpu its index, a MIG slice as GPU/GPU-instance (0/7), or all, user who booked "
    "it, until the end in the booking's own time zone, comment why.", RESERVATION_LABELS,
    device=False, collector="reservation")
CLAIM_LABELS = ("reserved_host", "gpu", "user", "id")
CLAIM_END = MetricDef(
    "nvidia_gpu_claim_end_timestamp_seconds", "gauge",
    "Unix time at which an active claim (gpuwatch run, through gpuwatch serve) of the GPU "
    "ends, unless a process of its user shows up on every claimed GPU before. reserved_host "
    "is the host as `gpuwatch status` names it, gpu its index or a MIG slice as "
    "GPU/GPU-instance (0/7), user who claimed it, id the claim's.", CLAIM_LABELS,
    device=False, collector="claim")

COLLECTOR_SUCCESS = MetricDef("nvidia_gpu_scrape_collector_success", "gauge",
                           "1 when the collector's last collection succeeded.",
                           ("collector",), device=False, collector="")
COLLECTOR_DURATION = MetricDef("nvidia_gpu_scrape_collector_duration_seconds", "gauge",
                            "Wall time the collector took, in seconds.", ("collector",),
                            device=False, collector="")
NVML_UP = MetricDef("nvidia_gpu_nvml_up", "gauge",
                 "1 when the NVML library is loaded and initialised, 0 when it is not "
                 "(no driver, driver/library mismatch); absent when no collector reads GPUs.",
                 device=False, collector="")
BUILD_INFO = MetricDef("nvidia_gpu_exporter_build_info", "gauge",
                    "The exporter's version; always 1.", ("version",), device=False,
                    collector="")

ALL: tuple[MetricDef, ...] = tuple(v for v in dict(globals()).values()
                                   if isinstance(v, MetricDef))
SCALARS: tuple[MetricDef, ...] = tuple(m for m in ALL if m.field is not None)


def reference_table() -> str:
    """The README's metrics reference, as a Markdown table."""
    rows = ["| metric | type | labels | collector | description |", "|---|---|---|---|---|"]
    for m in ALL:
        labels = ", ".join(m.label_names) or "-"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {m.collector or 'always'} | "
                    f"{m.help} |")
    return "\n".join(rows)


def names() -> Iterator[str]:
    return (m.name for m in ALL)


if __name__ == "__main__":
    print(reference_table())

"""MIG devices of a GPU: walked the way NVML and its peers do (nvidia-smi, nvitop,
dcgm-exporter), kept between scrapes, walked again once a minute or when a slice fails.

A MIG device is one compute instance of one GPU instance of the parent GPU. What NVML
reports per MIG device is its identity (GPU and compute instance ids, MIG UUID, profile) and
its memory; utilisation, temperature, power and the rest stay on the parent GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gpuwatch.exporter.nvml import ERROR_NOT_FOUND, Nvml, NVMLError, decode

WALK_SECONDS = 60.0
"""How often the MIG devices of a GPU are walked again (a reconfiguration is seen by then):
a walk costs a handful of calls per slice, a scrape one per slice."""
_PROFILE_IN_NAME = re.compile(r"\bMIG\s+((?:\d+c\.)?\d+g\.\d+gb(?:\+[a-z]+)*)(?!\S)")
"""nvidia-smi's profile names: 1g.10gb, a compute instance sharing its GPU instance
1c.3g.20gb, media extensions 1g.10gb+me."""


@dataclass(frozen=True)
class MigSlice:
    """One MIG device as the last walk found it."""

    handle: Any
    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    """As nvidia-smi names it (1g.10gb); "" where the driver names it neither way."""
    mig_uuid: str


@dataclass(frozen=True)
class MigMode:
    enabled: bool
    pending: bool
    """A change of the mode waits for a GPU reset."""


def parse_mode(mode: Any) -> MigMode | None:
    """nvmlDeviceGetMigMode's answer ([current, pending]); None where the GPU has no MIG (or
    the driver does not say)."""
    if not mode:
        return None
    current, pending = int(mode[0]), int(mode[1])
    return MigMode(enabled=current == 1, pending=current != pending)


def walk(nvml: Nvml, handle: Any) -> tuple[MigSlice, ...] | None:
    """The MIG devices of a MIG-enabled GPU, in NVML's order; None when the walk failed (a
    slice went away under it: try again next scrape)."""
    count = nvml.query("nvmlDeviceGetMaxMigDeviceCount", handle)
    if not count:
        return ()
    slices = []
    for index in range(int(count)):
        try:
            mig = nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", handle, index)
        except NVMLError as e:
            if getattr(e, "value", None) == ERROR_NOT_FOUND:
                continue  # no MIG device in this place
            nvml.query("nvmlDeviceGetMigDeviceHandleByIndex", handle, index)  # logged once
            return None
        gi = nvml.query("nvmlDeviceGetGpuInstanceId", mig)
        ci = nvml.query("nvmlDeviceGetComputeInstanceId", mig)
        uuid = nvml.query("nvmlDeviceGetUUID", mig)
        if gi is None or ci is None or uuid is None:
            return None
        slices.append(MigSlice(mig, int(gi), int(ci), _profile(nvml, mig), decode(uuid)))
    return tuple(slices)


def _profile(nvml: Nvml, mig: Any) -> str:
    """The profile from the MIG device's name ("NVIDIA A100-SXM4-80GB MIG 1g.10gb"), else
    from its attributes (compute slices, memory rounded up to GB, as the profiles are)."""
    name = decode(nvml.query("nvmlDeviceGetName", mig) or "")
    match = _PROFILE_IN_NAME.search(name)
    if match:
        return match.group(1)
    attributes = nvml.query("nvmlDeviceGetAttributes", mig)
    if attributes is None or not attributes.gpuInstanceSliceCount:
        return ""
    gb = math.ceil(int(attributes.memorySizeMB) / 1024)
    return f"{int(attributes.gpuInstanceSliceCount)}g.{gb}gb"

"""Simulated GPUs at the pynvml boundary, for the demo, the tests and the benchmarks.

- `scenario`: scenarios (GPUs, their processes and faults) as data, read from YAML files
  (scenarios/*.yaml ship with the package);
- `node`: a scenario running on a clock (which processes live now, the load);
- `nvml`: `SimulatedNvml`, pynvml's functions, return types and errors over the node;
- `psutil`: `SimulatedPsutil`, psutil's Process and the cgroup file over the node.
"""

from gpuwatch.sim.node import LiveProcess, SimulatedNode
from gpuwatch.sim.nvml import SimulatedNvml, gpu_uuid
from gpuwatch.sim.psutil import SimulatedPsutil
from gpuwatch.sim.scenario import (
    GIB,
    MIB,
    Scenario,
    ScenarioError,
    SimGpu,
    SimProcess,
    load_scenario,
    parse_scenario,
    scenario_names,
)

__all__ = ["GIB", "MIB", "LiveProcess", "Scenario", "ScenarioError", "SimGpu", "SimProcess",
           "SimulatedNode", "SimulatedNvml", "SimulatedPsutil", "gpu_uuid", "load_scenario",
           "parse_scenario", "scenario_names"]

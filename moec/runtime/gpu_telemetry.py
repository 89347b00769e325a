"""GPU power, utilisation, memory and energy from NVML (nvidia-ml-py, imported as `pynvml`).

Telemetry is an extra, never a reason to fail: without pynvml (CPU-only installs), without a
driver, or for a device NVML cannot open, a `GpuTelemetry` says `available = False` with the
reason, and every reading is None. Readings that fail later (a GPU that does not report power)
are None too.

    gpu = GpuTelemetry.for_device(engine.device)
    with gpu.measure() as run:          # samples every 100 ms on a background thread
        engine.generate(prompts, max_tokens=64, ignore_eos=True)
    run.energy_j, run.mean_power_w, run.mean_utilization_percent

Energy comes from NVML's total-energy counter (mJ since the driver loaded; Volta and later),
differenced over the run. The counter moves in coarse steps (an H100 showed no change over 6 ms),
so a run shorter than COUNTER_MIN_S, or a GPU without the counter, gets mean sampled power x
duration instead; `energy_source` says which.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any


COUNTER_MIN_S = 1.0


@dataclass(frozen=True)
class GpuSample:
    power_w: float | None
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


class GpuTelemetry:
    """One GPU, by its NVML index (which is not the CUDA index under CUDA_VISIBLE_DEVICES: see `for_device`)."""

    def __init__(self, device_index: int = 0):
        self._blank(device_index)
        try:
            nvml = _import_pynvml()
        except Exception as e:  # ImportError, or a broken install
            self.reason = f"pynvml is not importable ({type(e).__name__}: {e}); pip install nvidia-ml-py"
            return
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError: no driver, no libnvidia-ml.so, ...
            self.reason = f"NVML did not initialise: {e}"
            return
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
            name = nvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as e:
            self.reason = f"NVML cannot open GPU {device_index}: {e}"
            _quietly(nvml.nvmlShutdown)
            return
        self._nvml = nvml
        self.available = True

    def _blank(self, device_index: int) -> None:
        self.device_index = device_index
        self.available = False
        self.reason: str | None = None
        self.name: str | None = None
        self._nvml: Any = None
        self._handle: Any = None

    @classmethod
    def unavailable(cls, reason: str) -> GpuTelemetry:
        """A telemetry that reads nothing (NVML is not even tried)."""
        gpu = cls.__new__(cls)
        gpu._blank(-1)
        gpu.reason = reason
        return gpu

    @classmethod
    def for_device(cls, device: Any) -> GpuTelemetry:
        """The GPU behind a torch device, CUDA_VISIBLE_DEVICES taken into account; unavailable
        for a device that is not CUDA."""
        if getattr(device, "type", None) != "cuda":
            return cls.unavailable(f"device {device} is not a CUDA GPU")
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # private, but it is the one place that maps CUDA ordinals (or UUIDs) to NVML's
            index = torch.cuda._get_nvml_device_index(index)
        except Exception:
            pass
        return cls(index)

    def _read(self, fn: str, *args: Any) -> Any:
        if not self.available:
            return None
        try:
            return getattr(self._nvml, fn)(self._handle, *args)
        except Exception:  # NVMLError_NotSupported and friends: this reading is absent
            return None

    def sample(self) -> GpuSample | None:
        """Power (W), utilisation (% of the last sample period with a kernel running), memory (bytes)."""
        if not self.available:
            return None
        power_mw = self._read("nvmlDeviceGetPowerUsage")
        util = self._read("nvmlDeviceGetUtilizationRates")
        mem = self._read("nvmlDeviceGetMemoryInfo")
        return GpuSample(
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            utilization_percent=float(util.gpu) if util is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
        )

    def energy_j(self) -> float | None:
        """Joules since the driver loaded: difference two readings to get a run's energy."""
        mj = self._read("nvmlDeviceGetTotalEnergyConsumption")
        return mj / 1000.0 if mj is not None else None

    def measure(self, interval_s: float = 0.1) -> RunMeasurement:
        return RunMeasurement(self, interval_s)

    def close(self) -> None:
        if self.available:
            self.available = False
            _quietly(self._nvml.nvmlShutdown)


class RunMeasurement:
    """Energy, mean power and mean utilisation of the code run inside `with`; all None when the
    GPU cannot say. Samples at entry, every `interval_s` on a daemon thread, and at exit."""

    def __init__(self, telemetry: GpuTelemetry, interval_s: float = 0.1):
        self.telemetry = telemetry
        self.interval_s = interval_s
        self.samples: list[GpuSample] = []
        self.duration_s = 0.0
        self.energy_j: float | None = None
        self.energy_source: str | None = None  # "counter" or "mean power x time"
        self.mean_power_w: float | None = None
        self.mean_utilization_percent: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_energy: float | None = None
        self._t0 = 0.0

    def _take(self) -> None:
        s = self.telemetry.sample()
        if s is not None:
            self.samples.append(s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __enter__(self) -> RunMeasurement:
        self._t0 = time.perf_counter()
        if self.telemetry.available:
            self._start_energy = self.telemetry.energy_j()
            self._take()
            self._thread = threading.Thread(target=self._loop, name="moec-gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.duration_s = time.perf_counter() - self._t0
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._take()
        powers = [s.power_w for s in self.samples if s.power_w is not None]
        utils = [s.utilization_percent for s in self.samples if s.utilization_percent is not None]
        self.mean_power_w = statistics.fmean(powers) if powers else None
        self.mean_utilization_percent = statistics.fmean(utils) if utils else None
        end_energy = self.telemetry.energy_j()
        if self._start_energy is not None and end_energy is not None and self.duration_s >= COUNTER_MIN_S:
            self.energy_j, self.energy_source = end_energy - self._start_energy, "counter"
        elif self.mean_power_w is not None:
            self.energy_j, self.energy_source = self.mean_power_w * self.duration_s, "mean power x time"


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass

"""Prometheus metrics of `moe-runtime serve`, under vLLM's de-facto names with a `moec:` prefix.

Every series carries a `model_name` label, so dashboards built for vLLM work after swapping the
prefix. Exposed (check with `curl /metrics`):

    moec:time_to_first_token_seconds      histogram  arrival → first generated token, per choice
    moec:inter_token_latency_seconds      histogram  between consecutive generated tokens
    moec:e2e_request_latency_seconds      histogram  arrival → last event, per choice
    moec:request_queue_time_seconds       histogram  submit → first scheduled, per choice
    moec:num_requests_running             gauge      sequences in the running batch   } read from
    moec:num_requests_waiting             gauge      sequences queued                 } EngineLoop.stats()
    moec:kv_cache_usage_perc              gauge      used KV blocks, 0..1 (as vLLM)   } at scrape time
    moec:prompt_tokens_total              counter    prompt tokens, per choice (counted at its first event)
    moec:generation_tokens_total          counter    tokens generated
    moec:request_success_total            counter    finished choices, label finished_reason=stop|length|abort
    moec:gpu_power_watts                  gauge      } the engine's GPU, read from NVML at scrape time;
    moec:gpu_utilization_percent          gauge      } label gpu = NVML index. Only when the engine
    moec:gpu_memory_used_bytes            gauge      } runs on CUDA and NVML answers: absent on CPU
    moec:gpu_memory_total_bytes           gauge      } (moec.runtime.gpu_telemetry)

Each choice of a request (n > 1, several prompts) is one engine sequence and counts as one.
The metrics live in their own CollectorRegistry, so several apps in one process (tests) do not clash.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "moec:"
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                 160.0, 640.0, 2560.0)


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None, gpu: Any | None = None):
        """`gpu`: a GpuTelemetry of the engine's GPU, or None for no GPU gauges."""
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, labels, registry=r, buckets=buckets).labels(model_name)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            # prometheus-client adds "_total" itself; the name is given without it.
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time from request arrival to the first generated token.",
                         TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Time from request arrival to its last token.",
                        LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time a request waited before it was first scheduled.",
                               QUEUE_BUCKETS)
        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success = success
        if gpu is not None and gpu.available:
            r.register(GpuCollector(gpu, model_name))
        # expert-parallel serving: the group's expert load, per MoE layer
        self.expert_tokens = Gauge(PREFIX + "expert_tokens", "(token, choice) assignments routed to each expert "
                                   "since load, all ranks.", ["model_name", "layer", "expert"], registry=r)
        self.rank_tokens = Gauge(PREFIX + "expert_rank_tokens", "Assignments each rank's experts received since "
                                 "load.", ["model_name", "layer", "rank"], registry=r)
        self.rank_imbalance = Gauge(PREFIX + "expert_rank_imbalance", "Max over mean of the ranks' assignments.",
                                    ["model_name", "layer"], registry=r)

    def refresh(self, stats: dict[str, Any]) -> None:
        """Set the gauges from `EngineLoop.stats()`."""
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_usage", 0.0))
        load = stats.get("expert_load")
        for layer in (load or {}).get("layers", []):
            name = str(layer["layer"])
            for expert, tokens in enumerate(layer["tokens_per_expert"]):
                self.expert_tokens.labels(self.model_name, name, str(expert)).set(tokens)
            for rank, tokens in enumerate(layer["tokens_per_rank"]):
                self.rank_tokens.labels(self.model_name, name, str(rank)).set(tokens)
            if layer["rank_imbalance"] is not None:
                self.rank_imbalance.labels(self.model_name, name).set(layer["rank_imbalance"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def track(self, arrival: float) -> RequestTracker:
        """A tracker for one engine sequence (one choice) of a request that arrived at `arrival`."""
        return RequestTracker(self, arrival)

    def finished(self, reason: str) -> None:
        child = self.success.get(reason)
        if child is None:
            child = self.success[reason] = self._success.labels(self.model_name, reason)
        child.inc()


class GpuCollector:
    """The GPU gauges, read from NVML when Prometheus scrapes, so they are never staler than the scrape."""

    GAUGES = (
        ("gpu_power_watts", "power_w", "GPU power draw in watts."),
        ("gpu_utilization_percent", "utilization_percent",
         "Percent of the last NVML sample period during which a kernel ran on the GPU."),
        ("gpu_memory_used_bytes", "memory_used_bytes", "GPU memory in use, all processes (bytes)."),
        ("gpu_memory_total_bytes", "memory_total_bytes", "GPU memory in total (bytes)."),
    )

    def __init__(self, telemetry: Any, model_name: str):
        self.telemetry = telemetry
        self.labels = [model_name, str(telemetry.device_index)]

    def collect(self) -> Any:
        sample = self.telemetry.sample()
        if sample is None:
            return
        for name, field, doc in self.GAUGES:
            value = getattr(sample, field)
            if value is not None:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "gpu"])
                family.add_metric(self.labels, value)
                yield family


class RequestTracker:
    """Turns one sequence's StreamEvents into metric observations, as they arrive."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.seen = False

    def on_event(self, ev: Any) -> None:
        m = self.metrics
        t = ev.time or time.perf_counter()
        if ev.queue_time_s is not None:
            m.queue_time.observe(max(ev.queue_time_s, 0.0))
        n_new = len(ev.token_ids)
        if n_new:
            if self.first_token_at is None:
                self.first_token_at = t
                m.ttft.observe(max(t - self.arrival, 0.0))
                n_gaps = n_new - 1
            else:
                n_gaps = n_new
            if n_gaps and self.last_token_at is not None:
                gap = max(t - self.last_token_at, 0.0) / n_gaps
                for _ in range(n_gaps):
                    m.itl.observe(gap)
            self.last_token_at = t
        # Counted as they come, so a long generation shows on the counters before it ends.
        if not self.seen:
            self.seen = True
            m.prompt_tokens.inc(ev.prompt_tokens)
        self.prompt_tokens = ev.prompt_tokens
        if ev.completion_tokens > self.completion_tokens:
            m.generation_tokens.inc(ev.completion_tokens - self.completion_tokens)
            self.completion_tokens = ev.completion_tokens
        if ev.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = ev.finish_reason
            m.e2e.observe(max(t - self.arrival, 0.0))
            m.finished(ev.finish_reason)

    def abandon(self) -> None:
        """The stream ended without a final event (the engine died or never answered): count an abort."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.metrics.e2e.observe(max(time.perf_counter() - self.arrival, 0.0))
            self.metrics.finished("abort")

"""The server's counters, gauges and histograms, written in the Prometheus text format (`/metrics`).

Hand-written (a few dozen lines) rather than a dependency: each metric is a name, a help line and
values per label set; histograms keep cumulative bucket counts, a sum and a count.
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metric:
    def __init__(self, name: str, kind: str, help: str, buckets: tuple = ()):
        self.name, self.kind, self.help, self.buckets = name, kind, help, tuple(buckets)
        self.values: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] = float(value)

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self.values.setdefault(key, {"buckets": [0] * len(self.buckets), "sum": 0.0, "count": 0})
            for i, edge in enumerate(self.buckets):
                if value <= edge:
                    h["buckets"][i] += 1
            h["sum"] += float(value)
            h["count"] += 1

    def get(self, **labels):
        return self.values.get(tuple(sorted(labels.items())))

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            for key, v in sorted(self.values.items()):
                labels = dict(key)
                if self.kind != "histogram":
                    out.append(f"{self.name}{_labels(labels)} {_num(v)}")
                    continue
                for edge, n in zip(self.buckets, v["buckets"]):
                    out.append(f"{self.name}_bucket{_labels({**labels, 'le': _num(edge)})} {n}")
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {v['count']}")
                out.append(f"{self.name}_sum{_labels(labels)} {_num(v['sum'])}")
                out.append(f"{self.name}_count{_labels(labels)} {v['count']}")
        return out


def _num(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and math.isfinite(x) else repr(x)


class Metrics:
    """Every metric the server keeps (one instance per app)."""

    def __init__(self):
        m = Metric
        self.requests = m("worldloom_requests_total", "counter", "HTTP requests answered, by path and status")
        self.prompt_tokens = m("worldloom_prompt_tokens_total", "counter", "prompt tokens prefilled")
        self.completion_tokens = m("worldloom_completion_tokens_total", "counter", "tokens generated")
        self.cancelled = m("worldloom_rows_cancelled_total", "counter", "rows dropped because their client went away")
        self.rejected = m("worldloom_queue_rejected_total", "counter", "requests refused with 503 (queue full)")
        self.queue = m("worldloom_queue_depth", "gauge", "requests waiting to join a decode batch")
        self.running = m("worldloom_running_rows", "gauge", "rows in the running decode batch")
        self.sessions = m("worldloom_world_sessions", "gauge", "open world sessions")
        self.batch = m("worldloom_batch_size", "histogram", "rows per decoding step", BATCH_BUCKETS)
        self.ttft = m("worldloom_time_to_first_token_seconds", "histogram", "request arrival to first token",
                      LATENCY_BUCKETS)
        self.latency = m("worldloom_request_duration_seconds", "histogram", "request arrival to last token",
                         LATENCY_BUCKETS)
        self.itl = m("worldloom_inter_token_seconds", "histogram", "time between a row's tokens", LATENCY_BUCKETS)

    def text(self) -> str:
        lines = []
        for metric in vars(self).values():
            if isinstance(metric, Metric):
                lines += metric.lines()
        return "\n".join(lines) + "\n"

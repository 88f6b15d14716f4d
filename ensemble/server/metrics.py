"""Server metrics in the Prometheus text exposition format (no client library needed)."""
from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters, gauges and histograms of one server; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()          # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.expert_tokens: Counter = Counter()     # cluster_id -> tokens it helped produce
        self.latency = Histogram()
        self.first_token = Histogram()
        self.queue_depth = 0
        self.active_rows = 0
        self.expert_lanes: dict[int, int] = {}      # cluster_id -> lanes in the running batch
        self.steps, self.step_seconds, self.step_rows = 0, 0.0, 0

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def tokens(self, prompt: int = 0, completion: int = 0, experts=()) -> None:
        """Count tokens; ``completion`` tokens are also counted for each cluster id in ``experts``."""
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            for cid in experts:
                self.expert_tokens[int(cid)] += completion

    def step(self, seconds: float, rows: int) -> None:
        """One decoding step of the batch: how long it took and how many rows it served."""
        with self._lock:
            self.steps, self.step_seconds, self.step_rows = self.steps + 1, self.step_seconds + seconds, \
                self.step_rows + rows

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def batch(self, queue_depth: int, active_rows: int, expert_lanes: dict[int, int]) -> None:
        with self._lock:
            self.queue_depth, self.active_rows, self.expert_lanes = queue_depth, active_rows, dict(expert_lanes)

    def render(self, experts: list[int]) -> str:
        with self._lock:
            lines = ["# HELP cbtm_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE cbtm_requests_total counter"]
            lines += [f'cbtm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP cbtm_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE cbtm_prompt_tokens_total counter", f"cbtm_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP cbtm_completion_tokens_total Generated tokens.",
                      "# TYPE cbtm_completion_tokens_total counter",
                      f"cbtm_completion_tokens_total {self.completion_tokens}",
                      "# HELP cbtm_queue_depth Requests waiting to join the batch.", "# TYPE cbtm_queue_depth gauge",
                      f"cbtm_queue_depth {self.queue_depth}",
                      "# HELP cbtm_active_rows Prompts decoding in the running batch.", "# TYPE cbtm_active_rows gauge",
                      f"cbtm_active_rows {self.active_rows}",
                      "# HELP cbtm_expert_lanes Lanes (rows routed to it) each expert serves in the running batch.",
                      "# TYPE cbtm_expert_lanes gauge"]
            lines += [f'cbtm_expert_lanes{{cluster_id="{c}"}} {self.expert_lanes.get(c, 0)}' for c in experts]
            lines += ["# HELP cbtm_expert_tokens_total Tokens generated with each expert in the mixture.",
                      "# TYPE cbtm_expert_tokens_total counter"]
            lines += [f'cbtm_expert_tokens_total{{cluster_id="{c}"}} {self.expert_tokens.get(c, 0)}' for c in experts]
            lines += ["# HELP cbtm_steps_total Decoding steps of the running batch.", "# TYPE cbtm_steps_total counter",
                      f"cbtm_steps_total {self.steps}",
                      "# HELP cbtm_step_seconds_total Time spent in decoding steps.",
                      "# TYPE cbtm_step_seconds_total counter", f"cbtm_step_seconds_total {self.step_seconds:.6f}",
                      "# HELP cbtm_step_rows_total Rows served by decoding steps (divide by steps: batch occupancy).",
                      "# TYPE cbtm_step_rows_total counter", f"cbtm_step_rows_total {self.step_rows}"]
            lines += ["# HELP cbtm_request_latency_seconds Time from arrival to the last token.",
                      "# TYPE cbtm_request_latency_seconds histogram",
                      *self.latency.lines("cbtm_request_latency_seconds"),
                      "# HELP cbtm_time_to_first_token_seconds Time from arrival to the first token.",
                      "# TYPE cbtm_time_to_first_token_seconds histogram",
                      *self.first_token.lines("cbtm_time_to_first_token_seconds")]
        return "\n".join(lines) + "\n"

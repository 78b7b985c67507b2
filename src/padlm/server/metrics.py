"""``/metrics`` in the Prometheus text format, under the names vLLM users already chart.

Each app has its own registry (tests run several apps in one process). Gauges read the
worker's state when scraped; counters and histograms are fed by the worker thread, whose
observer (:class:`~padlm.server.worker.WorkerObserver`) this is, as tokens come out, by the
handlers as requests are queued and by the HTTP gate as responses go out (prometheus_client
is thread-safe).

vLLM counterparts: ``vllm:num_requests_running``/``waiting``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, ``vllm:request_success_total{finished_reason}``,
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds`` (vLLM's newer
name for ``time_per_output_token``), ``vllm:e2e_request_latency_seconds`` and
``vllm:request_queue_time_seconds``. HTTP requests by status use the
``http_requests_total{method, handler, status}`` of the instrumentator vLLM mounts. padlm's
own: ``padlm:live_rows`` and ``padlm:queued_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    """The app's metrics, and the decode worker's observer."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Tokens generated (best-of-n samples included).")
        self.request_success = counter("vllm:request_success", "Requests finished normally.",
                                       ("finished_reason",))
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Submission to the first generated token.", LATENCY_BUCKETS)
        self.inter_token = histogram("vllm:inter_token_latency_seconds",
                                     "Time between two tokens of one choice.", LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Submission to the last token of a request.", REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited for rows.", REQUEST_BUCKETS)
        self.http = Counter("http_requests_total", "HTTP responses by route and status.",
                            ["method", "handler", "status"], registry=self.registry)

    def watch(self, snapshot: Callable[[], dict]) -> None:
        """Gauges read from the worker's ``snapshot`` at scrape time, so they are never
        stale and the worker never updates them."""
        readers = {
            "vllm:num_requests_running": ("Requests decoding.", "running"),
            "vllm:num_requests_waiting": ("Requests waiting for rows.", "waiting"),
            "padlm:live_rows": ("Rows in the decode batches.", "live_rows"),
            "padlm:queued_tokens": ("Prompt tokens to prefill plus max_tokens x rows, of the "
                                    "waiting requests.", "queued_tokens"),
        }
        for name, (doc, key) in readers.items():
            Gauge(name, doc, ["model_name"], registry=self.registry).labels(
                self.model_name).set_function(lambda key=key: snapshot()[key])

    # ---- the worker's events (WorkerObserver) --------------------------------------------
    def waited(self, seconds: float) -> None:
        self.labelled(self.queue_time).observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.labelled(self.ttft).observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.labelled(self.inter_token).observe(seconds)

    def generated(self, tokens: int) -> None:
        self.labelled(self.generation_tokens).inc(tokens)

    def job_done(self, finish_reasons: Sequence[str], seconds: float) -> None:
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()
        self.labelled(self.e2e).observe(seconds)

    def labelled(self, metric):
        return metric.labels(self.model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""`GET /metrics`: the server's counters in Prometheus' text format, through `prometheus-client`.

Names follow vLLM's (`vllm:` becomes `llmcli:`), so dashboards written for vLLM read them: requests
running and waiting, prompt and generated tokens, time to first token and end-to-end latency, and
the prefix cache's queries and hits counted in tokens, as vLLM counts them. Each server has its own
registry, so several apps in one process (tests) do not share counters.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (the route's media type)

# seconds; vLLM's buckets for a first token and a whole request, cut to what a CPU server sees
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)  # seconds: a tiny GGUF to a 70B


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int],
                 decoded: Callable[[], int] | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        if decoded is not None:
            registry.register(DecodedTokens(decoded))
        Gauge("llmcli:num_requests_running", "Requests being generated now.",
              registry=registry).set_function(running)
        Gauge("llmcli:num_requests_waiting", "Requests queued for the engine.",
              registry=registry).set_function(waiting)
        self.prompt_tokens = Counter("llmcli:prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=registry)
        self.generation_tokens = Counter("llmcli:generation_tokens", "Tokens generated for finished requests.",
                                         registry=registry)
        self.success = Counter("llmcli:request_success", "Requests ended, by why they ended.",
                               ["finished_reason"], registry=registry)
        self.ttft = Histogram("llmcli:time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token.", buckets=TTFT_BUCKETS, registry=registry)
        self.latency = Histogram("llmcli:e2e_request_latency_seconds", "From a request's arrival to its last "
                                 "token.", buckets=LATENCY_BUCKETS, registry=registry)
        self.cache_queries = Counter("llmcli:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                     "cache.", registry=registry)
        # vLLM's names: drafted tokens checked, and of those the ones kept (speculative decoding)
        self.draft_tokens = Counter("llmcli:spec_decode_num_draft_tokens", "Drafted tokens checked by the model.",
                                    registry=registry)
        self.accepted_tokens = Counter("llmcli:spec_decode_num_accepted_tokens", "Drafted tokens the model "
                                       "kept.", registry=registry)
        # per model (a server may offer several, loaded on demand): llama-server and ollama log these
        self.model_loads = Counter("llmcli:model_loads", "Loads of each model.", ["model"], registry=registry)
        self.model_unloads = Counter("llmcli:model_unloads", "Unloads of each model (idle, LRU or asked).",
                                     ["model"], registry=registry)
        self.model_load_seconds = Histogram("llmcli:model_load_seconds", "Time to load each model.", ["model"],
                                            buckets=LOAD_BUCKETS, registry=registry)
        self.cache_hits = Counter("llmcli:prefix_cache_hits", "Prompt tokens found in the prefix cache (not "
                                  "decoded again).", registry=registry)

    def finished(self, usage: dict, reasons: list[str], arrived: float, first_token_at: float | None,
                 ended: float, prefix_cache: bool) -> None:
        """A request answered: its usage, each choice's finish reason, its times (perf_counter)."""
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        for reason in reasons:
            self.success.labels(finished_reason=reason).inc()
        if first_token_at is not None:
            self.ttft.observe(max(0.0, first_token_at - arrived))
        self.latency.observe(ended - arrived)
        details = usage.get("completion_tokens_details", {})
        if details:
            self.accepted_tokens.inc(details["accepted_prediction_tokens"])
            self.draft_tokens.inc(details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"])
        if prefix_cache:
            self.cache_queries.inc(usage["prompt_tokens"])
            self.cache_hits.inc(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))

    def model_loaded(self, name: str, seconds: float) -> None:
        self.model_loads.labels(model=name).inc()
        self.model_load_seconds.labels(model=name).observe(seconds)

    def model_unloaded(self, name: str) -> None:
        self.model_unloads.labels(model=name).inc()

    def aborted(self) -> None:
        self.success.labels(finished_reason="abort").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class DecodedTokens:
    """Tokens the model actually ran (prompt tokens not found in the prefix cache, and each generated
    token fed back), read from the engine's counter when scraped: what prefix reuse and a freed
    sequence save shows here."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def collect(self):
        yield CounterMetricFamily("llmcli:tokens_decoded", "Tokens run through the model.", value=self.read())

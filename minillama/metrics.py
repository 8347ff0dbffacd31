"""The server's Prometheus metrics (``GET /metrics``), in the text exposition format 0.0.4, written by hand.

Every name is vLLM's with the prefix ``minillama:`` in place of ``vllm:`` (a vLLM dashboard works once the
prefix is replaced), every sample has vLLM's ``model_name`` label, and the histograms have vLLM's buckets.
A *request* here is a scheduler request: one choice of an HTTP request (a prompt of ``n`` choices makes
``n``), as vLLM counts each of ``n`` samples.

Gauges and token counters are read from :meth:`Scheduler.stats` at each scrape. The times are measured
in the server, on its event loop, as each scheduler event reaches it (:class:`RequestTimer`): per token,
a clock read and a histogram observation (a bisect, two additions); the text is built only when scraped.

Reference: https://prometheus.io/docs/instrumenting/exposition_formats/ and vLLM's
``vllm/v1/metrics/loggers.py``.
"""
import bisect
import math
import time
from typing import List, Optional, Sequence

from minillama.scheduler import Failed, Finished, Token

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "minillama:"

# vLLM's buckets, in seconds
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
E2E_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# the scheduler's finish_reason -> vLLM's finished_reason label; a Failed request is "error"
FINISHED_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


def one_two_five_buckets(limit: int) -> List[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's buckets of token counts, up to the context)."""
    out, scale = [], 1
    while scale <= limit:
        out += [m * scale for m in (1, 2, 5) if m * scale <= limit]
        scale *= 10
    return out


class Histogram:
    """Observations counted per bucket: ``counts[i]`` those in (bounds[i - 1], bounds[i]], the last one
    those above every bound; made cumulative only when rendered."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(float(b) for b in bounds)
        assert list(self.bounds) == sorted(set(self.bounds)), "bucket bounds must increase"
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class ServerMetrics:
    """What the server measures of the requests it serves; :meth:`render` writes it with the scheduler's
    counters. Used on the event loop only (no lock)."""

    def __init__(self, max_seq_len: int):
        self.time_to_first_token = Histogram(TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = Histogram(INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_request_latency = Histogram(E2E_REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = Histogram(one_two_five_buckets(max_seq_len))
        self.request_generation_tokens = Histogram(one_two_five_buckets(max_seq_len))
        self.finished = dict.fromkeys([*FINISHED_REASONS.values(), "error"], 0)  # requests by finished_reason

    def render(self, model_name: str, stats: dict, max_batch: int) -> str:
        """The exposition text: gauges and token counters from ``stats`` (:meth:`Scheduler.stats`) of a
        pool of ``max_batch`` cache rows, then what this server measured."""
        label = f'model_name="{_escape_label(model_name)}"'
        lines: List[str] = []

        def family(name: str, kind: str, help_text: str) -> str:
            name = PREFIX + name
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            return name

        for name, kind, help_text, value in (
            ("num_requests_running", "gauge",
             "Requests in the batch: each holds a cache row, prefilling its prompt or decoding.", stats["running"]),
            ("num_requests_waiting", "gauge", "Requests waiting for a free cache row.", stats["waiting"]),
            ("kv_cache_usage_perc", "gauge",
             "KV-cache usage, 1 means 100 percent: the share of the pool's cache rows (--max-batch) held by "
             "requests. A request holds a whole row (room for its prompt and max_tokens), so this counts rows "
             "in use, not tokens stored; at 1 new requests wait.", stats["running"] / max_batch),
            ("prompt_tokens_total", "counter",
             "Prompt tokens of the requests that took a cache row, prefix-cache hits included (a prompt with "
             "n choices counts n times).", stats["prompt_tokens"]),
            ("generation_tokens_total", "counter",
             "Generated tokens, a stop id that ended a request included (as usage.completion_tokens).",
             stats["generated_tokens"]),
            ("prefix_cache_queries_total", "counter",
             "Prefix cache queries, in tokens: the prompt tokens of the requests that took a cache row.",
             stats["prompt_tokens"]),
            ("prefix_cache_hits_total", "counter",
             "Prefix cache hits, in tokens: prompt tokens whose keys and values a free row kept from an "
             "earlier request.", stats["cached_tokens"]),
        ):
            lines.append(f"{family(name, kind, help_text)}{{{label}}} {value!r}")

        name = family("request_success_total", "counter",
                      "Requests ended, by finished_reason: stop (a stop id or string; replies returned as "
                      "tool_calls too), length (max_tokens), abort (cancelled: client gone, request timeout, "
                      "shutdown), error (generation failed).")
        for reason, count in self.finished.items():
            lines.append(f'{name}{{{label},finished_reason="{reason}"}} {count}')

        for name, help_text, histogram in (
            ("time_to_first_token_seconds", "Seconds from the arrival of the HTTP request to the first token "
             "of a request, as the server receives it from the scheduler.", self.time_to_first_token),
            ("inter_token_latency_seconds", "Seconds between two consecutive tokens of a request, as the "
             "server receives them.", self.inter_token_latency),
            ("e2e_request_latency_seconds", "Seconds from the arrival of the HTTP request to the end of a "
             "request (every finished_reason but error).", self.e2e_request_latency),
            ("request_prompt_tokens", "Prompt tokens of a request (every finished_reason but error).",
             self.request_prompt_tokens),
            ("request_generation_tokens", "Generated tokens of a request, a stop id included (every "
             "finished_reason but error).", self.request_generation_tokens),
        ):
            name = family(name, "histogram", help_text)
            cumulative = 0
            for bound, count in zip(histogram.bounds + (math.inf,), histogram.counts):
                cumulative += count
                lines.append(f'{name}_bucket{{{label},le="{_le(bound)}"}} {cumulative}')
            lines.append(f"{name}_sum{{{label}}} {histogram.sum!r}")
            lines.append(f"{name}_count{{{label}}} {cumulative}")
        return "\n".join(lines) + "\n"


class RequestTimer:
    """Measures the scheduler requests of one HTTP request (``arrival``: when it came, by
    ``time.monotonic()``) from their events, each taken as it reaches the server. A :class:`Token`, or
    the :class:`Finished` of a stop id (the last token: it counts in ``completion_tokens``), is a token;
    a request's first token is timed from the arrival, the others from the token before."""

    __slots__ = ("metrics", "arrival", "last_token")

    def __init__(self, metrics: ServerMetrics, arrival: float, requests: int):
        self.metrics = metrics
        self.arrival = arrival
        self.last_token: List[Optional[float]] = [None] * requests  # when each request's last token came

    def record(self, index: int, event) -> None:
        """Take an event of scheduler request ``index``; a
        :class:`~minillama.scheduler.PromptLogprobs` counts nothing."""
        metrics = self.metrics
        if isinstance(event, Failed):
            metrics.finished["error"] += 1
            return
        finished = isinstance(event, Finished)
        if not (finished or isinstance(event, Token)):
            return
        now = time.monotonic()
        if not finished or isinstance(event.stop, int):
            last = self.last_token[index]
            if last is None:
                metrics.time_to_first_token.observe(now - self.arrival)
            else:
                metrics.inter_token_latency.observe(now - last)
            self.last_token[index] = now
        if finished:
            metrics.finished[FINISHED_REASONS[event.finish_reason]] += 1
            metrics.e2e_request_latency.observe(now - self.arrival)
            metrics.request_prompt_tokens.observe(event.prompt_tokens)
            metrics.request_generation_tokens.observe(event.completion_tokens)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' clients write it: 0.5, 1.0, +Inf."""
    return "+Inf" if bound == math.inf else repr(bound)

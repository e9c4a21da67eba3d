"""Prometheus metrics for one app, on its own registry, named after vLLM's with a `hyprjax:` prefix.

Engine-wide gauges are read from `engine.stats()` when /metrics is scraped; per-request numbers
(tokens, time to first token, inter-token latency, end-to-end latency, finish reasons) are
measured here from the timing of each request's stream, so the engine does no bookkeeping for us.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Labels on every per-request metric. Adapter traffic is counted again under its own metrics,
# labelled "lora_name": the adapter, or a mix's names sorted and joined by "+".
REQUEST_LABELS = ("model_name",)
LORA_LABELS = ("model_name", "lora_name")

# Bucket edges copied from vLLM, so dashboards built for it read ours.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """All metrics of one app; `render()` is the /metrics body."""

    def __init__(self, engine, learner=None):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        if learner is not None:
            self.registry.register(_LearnCollector(learner))
        r = self.registry
        self.prompt_tokens = Counter("hyprjax:prompt_tokens", "Prompt tokens of requests started.",
                                     REQUEST_LABELS, registry=r)
        self.generation_tokens = Counter("hyprjax:generation_tokens", "Tokens generated.", REQUEST_LABELS,
                                         registry=r)
        self.ttft = Histogram("hyprjax:time_to_first_token_seconds", "Request arrival to its first token.",
                              REQUEST_LABELS, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hyprjax:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             REQUEST_LABELS, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("hyprjax:e2e_request_latency_seconds", "Request arrival to its last token.",
                             REQUEST_LABELS, buckets=_E2E_BUCKETS, registry=r)
        self.success = Counter("hyprjax:request_success", "Requests finished, by finish reason.",
                               (*REQUEST_LABELS, "finished_reason"), registry=r)
        self.lora_requests = Counter("hyprjax:lora_requests", "Requests started per adapter (or mix).",
                                     LORA_LABELS, registry=r)
        self.lora_e2e = Histogram("hyprjax:lora_request_latency_seconds",
                                  "Request arrival to its last token, per adapter (or mix).", LORA_LABELS,
                                  buckets=_E2E_BUCKETS, registry=r)

    def request(self, arrival: float, *, model_name: str, lora_name: str | None = None) -> RequestTimer:
        """A timer for one engine request that arrived at `arrival` (time.monotonic())."""
        return RequestTimer(self, (model_name,), arrival, None if lora_name is None else (model_name, lora_name))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Times one engine request from the outputs the server reads off its stream."""

    def __init__(self, metrics: ServerMetrics, labels: tuple[str, ...], arrival: float,
                 lora_labels: tuple[str, str] | None = None):
        self._m, self._labels, self._arrival, self._lora = metrics, labels, arrival, lora_labels
        self._last: float | None = None  # when the latest token arrived
        self._started = self._finished = False

    def observe(self, out, now: float | None = None) -> None:
        """Record one RequestOutput as it arrives."""
        now = time.monotonic() if now is None else now
        m, labels = self._m, self._labels
        if not self._started:
            self._started = True
            m.prompt_tokens.labels(*labels).inc(out.num_prompt_tokens)
            if self._lora is not None:
                m.lora_requests.labels(*self._lora).inc()
        k = len(out.new_token_ids)
        if k:
            m.generation_tokens.labels(*labels).inc(k)
            if self._last is None:
                m.ttft.labels(*labels).observe(now - self._arrival)
            else:  # an increment of k tokens spreads its wait over them, as k steps would
                itl = m.itl.labels(*labels)
                for _ in range(k):
                    itl.observe((now - self._last) / k)
            self._last = now
        if out.finished and not self._finished:
            self._finished = True
            m.e2e.labels(*labels).observe(now - self._arrival)
            if self._lora is not None:
                m.lora_e2e.labels(*self._lora).observe(now - self._arrival)
            m.success.labels(*labels, out.finish_reason or "stop").inc()

    def close(self) -> None:
        """The stream was closed early (client gone, error): count the request as aborted."""
        if self._started and not self._finished:
            self._finished = True
            self._m.success.labels(*self._labels, "abort").inc()


class _EngineCollector(Collector):
    """Engine-wide gauges and counters, read from engine.stats() at scrape time."""

    def __init__(self, engine):
        self._engine = engine

    def collect(self):
        stats = self._engine.stats()
        labels = [self._engine.model_name]

        def gauge(name, doc, value, family=GaugeMetricFamily):
            g = family(name, doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        yield gauge("hyprjax:num_requests_running", "Requests in the running batch.", stats["num_running"])
        yield gauge("hyprjax:num_requests_waiting", "Requests waiting to be scheduled.", stats["num_waiting"])
        yield gauge("hyprjax:kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).",
                    stats["kv_cache_usage"])
        if "prefix_cache_hit_rate" in stats:
            yield gauge("hyprjax:prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.",
                        stats["prefix_cache_hit_rate"])
        yield gauge("hyprjax:num_preemptions", "Requests preempted to free KV pages.", stats["num_preemptions_total"],
                    CounterMetricFamily)
        if "lora_adapters_loaded" in stats:
            yield gauge("hyprjax:lora_adapters_loaded", "LoRA adapters loaded (on the host).",
                        stats["lora_adapters_loaded"])
            yield gauge("hyprjax:lora_slots_in_use", "Device LoRA slots holding an adapter or mix.",
                        stats["lora_slots_in_use"])
            yield gauge("hyprjax:lora_evictions", "Adapters evicted from device slots.", stats["lora_evictions_total"],
                        CounterMetricFamily)
        if stats.get("spec_method"):  # speculative decoding (engine/speculative.py), by method
            method = [self._engine.model_name, stats["spec_method"]]
            for name, doc in (("spec_proposed_tokens", "Draft tokens proposed for verification."),
                              ("spec_accepted_tokens", "Draft tokens accepted by verification.")):
                c = CounterMetricFamily(f"hyprjax:{name}", doc, labels=["model_name", "method"])
                c.add_metric(method, float(stats[f"{name}_total"]))
                yield c
            counts = stats["spec_acceptance_lengths"]
            h = HistogramMetricFamily("hyprjax:spec_acceptance_length", "Drafts accepted per verified sequence "
                                      "and step (sequences that had drafts).", labels=["model_name", "method"])
            cumulative = [sum(counts[:i + 1]) for i in range(len(counts))]
            h.add_metric(method, [(str(float(i)), float(c)) for i, c in enumerate(cumulative)] +
                         [("+Inf", float(cumulative[-1]))], sum(i * c for i, c in enumerate(counts)))
            yield h


class _LearnCollector(Collector):
    """`--learn` adapters' feedback, rounds, losses and live version, read from the learner (its
    store) at scrape time, so the counts survive restarts."""

    def __init__(self, learner):
        self._learner = learner

    def collect(self):
        stats = self._learner.metrics()
        feedback = CounterMetricFamily("hyprjax:learn_feedback", "Feedback items received, by adapter and kind.",
                                       labels=["adapter", "kind"])
        rounds = CounterMetricFamily("hyprjax:learn_rounds", "Training rounds finished, by adapter and outcome "
                                     "(promoted, rejected, failed).", labels=["adapter", "outcome"])
        train = GaugeMetricFamily("hyprjax:learn_train_loss", "The last round's final training loss.",
                                  labels=["adapter"])
        heldout = GaugeMetricFamily("hyprjax:learn_heldout_loss", "The last round's version's loss on held-out "
                                    "feedback.", labels=["adapter"])
        live = GaugeMetricFamily("hyprjax:learn_live_version", "The version the adapter's alias points at.",
                                 labels=["adapter"])
        for name, s in stats.items():
            for kind in ("label", "score", "correction"):
                feedback.add_metric([name, kind], s["feedback"].get(kind, 0))
            for outcome in ("promoted", "rejected", "failed"):
                rounds.add_metric([name, outcome], s["rounds"].get(outcome, 0))
            if s["train_loss"] is not None:
                train.add_metric([name], s["train_loss"])
            if s["heldout_loss"] is not None:
                heldout.add_metric([name], s["heldout_loss"])
            live.add_metric([name], s["live"])
        yield from (feedback, rounds, train, heldout, live)

"""What the cache-aware router decided, on the frontend's /metrics (beside its vLLM-named metrics).

    tandem:router_prompt_tokens_total{model_name, role="frontend", worker_role}         prompt tokens routed
    tandem:router_cached_prompt_tokens_total{model_name, role="frontend", worker_role}  of those, tokens the
        chosen worker was believed to hold (its cache summary plus requests routed there just before)

Their ratio is the hit rate the router expects; the workers' prefix_cache_hits / prefix_cache_queries
say what the caches delivered. Counted in the `kv` router mode only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from common.metrics import PREFIX

WORKER_ROLES = ("prefill", "decode")


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str):
        labels = ("model_name", "role", "worker_role")
        prompt = Counter(PREFIX + "router_prompt_tokens", "Prompt tokens of the requests the router placed.",
                         labels, registry=registry)
        cached = Counter(PREFIX + "router_cached_prompt_tokens",
                         "Of the routed prompt tokens, those the chosen worker was believed to have cached.",
                         labels, registry=registry)
        self._counters = {role: (prompt.labels(model_name, "frontend", role),
                                 cached.labels(model_name, "frontend", role)) for role in WORKER_ROLES}

    def observe_decision(self, worker_role: str, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        if not 0 <= num_cached_tokens <= num_prompt_tokens:
            raise ValueError(f"num_cached_tokens must be in [0, {num_prompt_tokens}], got {num_cached_tokens}")
        prompt, cached = self._counters[worker_role]
        prompt.inc(num_prompt_tokens)
        cached.inc(num_cached_tokens)

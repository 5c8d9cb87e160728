"""Results of a retrieval audit: counts per head and layer, the report, and the audit's errors.

Kept apart from :mod:`lifelong.audit_exact` (which runs FAISS and the comparison) so that reading
or storing a report needs neither faiss nor a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import LifelongError

__all__ = [
    "AuditError", "NoPEERLayersError", "NoQueriesError", "RetrievalStats", "LayerAudit", "AuditReport", "SCHEMA_VERSION",
    "DEFAULT_MIN_RECALL",
]

SCHEMA_VERSION = 1  # of AuditReport.to_dict(); bump on any incompatible change
DEFAULT_MIN_RECALL = 1.0 - 1e-6  # recall up to float ties must be exact (the audit CLI's and the scheduler's default)


class AuditError(LifelongError):
    """The audit could not run (bad input, no PEER layer, no queries, no GPU when required)."""


class NoPEERLayersError(AuditError):
    """The model has no PEER layer to audit."""

    hint = "audit a model built with at least one PEER layer (ModelConfig.peer_layers)"


class NoQueriesError(AuditError):
    """No query reached a PEER layer (empty block set or max_queries=0)."""

    hint = "pass at least one block of held-out token ids"


# ------------------------------------------------------------------------------ results
def _json_float(x: float) -> float | None:
    """NaN/inf (e.g. a ratio over zero queries) become None so that the dict is strict JSON."""
    return float(x) if math.isfinite(x) else None


@dataclass
class RetrievalStats:
    """Counts comparing router top-k with exact top-k over ``queries`` query vectors.

    Per query vector (one token, one head): ``hits`` exact ids the router returned,
    ``tied_ids`` exact ids it did not return but replaced by an equal-scoring expert (float
    tie), ``missed_ids`` the rest; ``hits + tied_ids + missed_ids == slots`` (``queries * k``).
    ``rank_agreements`` counts positions ``j`` (both lists sorted by score, descending) where
    the router's j-th id is the exact j-th id or scores the same within the tie tolerance.
    ``max_score_diff`` is the largest ``|router_score[j] - exact_score[j]|`` after sorting.
    """

    queries: int = 0
    k: int = 0  # 0 when merged over layers with different top_k
    slots: int = 0  # sum of k over queries: the denominator of recall and rank agreement
    hits: int = 0
    tied_ids: int = 0
    missed_ids: int = 0
    exact_matches: int = 0  # queries whose id sets are identical
    tie_matches: int = 0  # queries whose id sets differ only by float ties
    rank_agreements: int = 0
    duplicate_ids: int = 0  # ids the router returned twice for one query (always a bug)
    max_score_diff: float = 0.0

    @property
    def recall(self) -> float:
        """Raw recall@k: share of exact top-k ids the router returned."""
        return self.hits / self.slots if self.slots else float("nan")

    @property
    def recall_up_to_ties(self) -> float:
        """Recall@k counting tie-explained mismatches as found; expected 1.0."""
        return (self.hits + self.tied_ids) / self.slots if self.slots else float("nan")

    @property
    def exact_match_share(self) -> float:
        return self.exact_matches / self.queries if self.queries else float("nan")

    @property
    def match_up_to_ties_share(self) -> float:
        return (self.exact_matches + self.tie_matches) / self.queries if self.queries else float("nan")

    @property
    def rank_agreement(self) -> float:
        return self.rank_agreements / self.slots if self.slots else float("nan")

    @property
    def missed_queries(self) -> int:
        return self.queries - self.exact_matches - self.tie_matches

    def merge(self, other: RetrievalStats) -> RetrievalStats:
        """Stats of two disjoint sets of queries together (``k`` becomes 0 when they differ)."""
        out = RetrievalStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name not in ("k", "max_score_diff")}
        )
        out.max_score_diff = max(self.max_score_diff, other.max_score_diff)
        ks = {s.k for s in (self, other) if s.queries}
        out.k = ks.pop() if len(ks) == 1 else (self.k if not ks else 0)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d.update(
            recall=_json_float(self.recall),
            recall_up_to_ties=_json_float(self.recall_up_to_ties),
            exact_match_share=_json_float(self.exact_match_share),
            match_up_to_ties_share=_json_float(self.match_up_to_ties_share),
            rank_agreement=_json_float(self.rank_agreement),
            missed_queries=self.missed_queries,
        )
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrievalStats:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class LayerAudit:
    """One PEER layer: totals, per-head stats and expert usage on the audited queries."""

    name: str
    n_rows: int
    n_cols: int
    num_experts: int
    heads: int
    top_k: int
    d_key: int
    candidates: int | None  # None: exact product keys; fewer per-side candidates = approximate
    tokens: int  # Q: query vectors per head
    total: RetrievalStats
    per_head: list[RetrievalStats]
    usage: float  # share of experts the router retrieved at least once
    experts_used: int
    kl_uniform: float  # KL(accumulated router weights || uniform), nats (PEER paper Table 2)
    tie_rtol: float
    backend: str  # "faiss-cpu" or "faiss-gpu"
    chunk_rows: int
    seconds_exact: float = 0.0
    seconds_router: float = 0.0
    seconds_compare: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("total", "per_head")}
        d["kl_uniform"] = _json_float(self.kl_uniform)
        d["total"] = self.total.to_dict()
        d["per_head"] = [s.to_dict() for s in self.per_head]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerAudit:
        kw = {f.name: data[f.name] for f in fields(cls) if f.name not in ("total", "per_head")}
        kw["kl_uniform"] = float("nan") if kw["kl_uniform"] is None else kw["kl_uniform"]
        return cls(
            **kw, total=RetrievalStats.from_dict(data["total"]), per_head=[RetrievalStats.from_dict(h) for h in data["per_head"]]
        )


@dataclass
class AuditReport:
    """Audit of every PEER layer of a model. ``to_dict()`` is JSON-ready and stable (``schema``)."""

    layers: dict[str, LayerAudit]
    blocks: int = 0  # token blocks run through the model
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form context (version, stream, ...)

    @property
    def total(self) -> RetrievalStats:
        out = RetrievalStats()
        for layer in self.layers.values():
            out = out.merge(layer.total)
        return out

    @property
    def min_recall(self) -> float:
        """Lowest recall up to ties over layers: the number a threshold applies to."""
        return min((a.total.recall_up_to_ties for a in self.layers.values()), default=float("nan"))

    def passed(self, threshold: float = DEFAULT_MIN_RECALL) -> bool:
        """True when every layer's recall up to ties is >= threshold and no id came twice."""
        return all(a.total.recall_up_to_ties >= threshold and a.total.duplicate_ids == 0 for a in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "blocks": self.blocks,
            "seconds": self.seconds,
            "min_recall": _json_float(self.min_recall),
            "total": self.total.to_dict(),
            "layers": {name: a.to_dict() for name, a in self.layers.items()},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditReport:
        if data.get("schema") != SCHEMA_VERSION:
            raise AuditError(f"audit report schema {data.get('schema')!r} is not the supported {SCHEMA_VERSION}")
        layers = {name: LayerAudit.from_dict(a) for name, a in data["layers"].items()}
        return cls(layers=layers, blocks=data["blocks"], seconds=data["seconds"], extra=dict(data.get("extra", {})))

    def format_table(self, per_head: bool = True, threshold: float = DEFAULT_MIN_RECALL) -> str:
        """A fixed-width text table: one line per layer (and per head), then usage per layer."""
        head = f"{'layer':<20} {'head':>4} {'queries':>8} {'recall':>8} {'~ties':>8} {'set=':>7} {'ties':>6} {'misses':>6} {'rank=':>7} {'max|ds|':>9}"
        lines = [head, "-" * len(head)]

        def row(name: str, h: str, s: RetrievalStats) -> str:
            return (
                f"{name:<20} {h:>4} {s.queries:>8} {s.recall:>8.5f} {s.recall_up_to_ties:>8.5f} {s.exact_match_share:>7.4f} "
                f"{s.tied_ids:>6} {s.missed_ids:>6} {s.rank_agreement:>7.4f} {s.max_score_diff:>9.2e}"
            )

        for name, a in self.layers.items():
            lines.append(row(name, "all", a.total))
            if per_head:
                lines.extend(row("", str(i), s) for i, s in enumerate(a.per_head))
        lines.append("")
        for name, a in self.layers.items():
            mode = "exact" if a.candidates is None else f"approximate (candidates={a.candidates})"
            lines.append(
                f"{name}: grid {a.n_rows}x{a.n_cols} = {a.num_experts} experts, k={a.top_k}, {mode}; "
                f"usage {a.usage:.2%} ({a.experts_used} used), KL to uniform {a.kl_uniform:.4f} nats; "
                f"{a.backend}, exact {a.seconds_exact:.1f}s, router {a.seconds_router:.1f}s"
            )
        verdict = "PASS" if self.passed(threshold) else "FAIL"
        lines.append(f"min recall up to ties {self.min_recall:.6f} -> {verdict} (threshold {threshold:g})")
        return "\n".join(lines)

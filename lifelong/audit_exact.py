"""The audit's comparison: FAISS exact top-k over the materialised full keys vs product-key top-k.

Product-key retrieval (:func:`lifelong.peer.product_key_topk`) claims the *exact* top-k of
``q . [C1_i ; C2_j]`` over all ``n1 * n2`` experts. The audit checks the claim independently:
it materialises the full keys block of rows by block of rows (:meth:`PEERLayer.full_keys`),
searches them with a FAISS ``IndexFlatIP`` (GPU index when CUDA and faiss-gpu are present) and
compares the exact answer with the layer's own :meth:`PEERLayer.retrieve` on the same queries.

Notation: ``Q`` tokens (queries per head), ``h`` heads, ``k`` = top_k, ``dk`` = d_key,
``n1`` x ``n2`` the grid, ``N = n1 * n2`` experts; ids are ``i * n2 + j``.

Float ties: the router sums two half dot products, FAISS computes one full dot product, so
equal-scoring experts at the k-th place may be picked differently. A mismatch is a **tie**,
not a miss, when it is explained by equal scores within ``tol = tie_rtol * max(1, max |s|)``
of that query (see :func:`compare_topk`). Recall up to ties is expected to be exactly 1.0;
anything less is a bug or a deliberate approximate mode (``PEERConfig.candidates``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .audit_report import AuditError, AuditReport, LayerAudit, NoPEERLayersError, NoQueriesError, RetrievalStats
from .evaluate import kl_to_uniform
from .peer import PEERLayer, recording

__all__ = ["capture_queries", "exact_topk", "compare_topk", "router_usage", "audit_layer", "audit_model", "default_chunk_rows"]

DEFAULT_CHUNK_BYTES = 64 << 20  # full keys materialised at once by exact_topk (auto chunk_rows)
_COMPARE_TOKENS = 512  # tokens per comparison chunk: bounds the (c, h, k, dk) float64 gathers
_ROUTER_TOKENS = 1024  # tokens per router call: bounds the (c, h, n1) and (c, h, n2) sub-scores


# ---------------------------------------------------------------------------- capture
def _peer_layers(model: nn.Module) -> dict[str, PEERLayer]:
    getter = getattr(model, "peer_layers", None)
    layers = getter() if callable(getter) else {n: m for n, m in model.named_modules() if isinstance(m, PEERLayer)}
    if not layers:
        raise NoPEERLayersError(f"{type(model).__name__} has no PEER layer to audit")
    return dict(layers)


@torch.no_grad()
def capture_queries(
    model: nn.Module,
    blocks: np.ndarray | Tensor,
    batch_size: int = 8,
    max_queries: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Run token blocks (n, L) through ``model`` in eval mode and return each PEER layer's queries.

    Returns ``{layer_name: (Q, h, dk)}`` float CPU tensors, Q = tokens seen (at most
    ``max_queries``). Blocks one longer than the model's ``block_size`` (the training
    layout, inputs + shifted targets) are cut to their first ``block_size`` tokens.
    Every module's train/eval mode is restored afterwards.
    """
    layers = _peer_layers(model)
    ids = torch.as_tensor(np.asarray(blocks) if not isinstance(blocks, Tensor) else blocks)
    if ids.ndim != 2:
        raise AuditError(f"blocks must be a 2-D (n, L) array of token ids, got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0 or (max_queries is not None and max_queries <= 0):
        raise NoQueriesError(f"no queries to audit: {ids.shape[0]} blocks of length {ids.shape[1]}, max_queries={max_queries}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and ids.shape[1] == block_size + 1:
        ids = ids[:, :-1]
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]  # restored per module, not just the root
    out: dict[str, list[Tensor]] = {name: [] for name in layers}
    seen = 0
    model.eval()
    try:
        with recording(layers, queries=True) as recs:
            bar = tqdm(range(0, ids.shape[0], batch_size), desc="audit: capture", unit="batch", disable=not progress, leave=False)
            for i in bar:
                batch = ids[i : i + batch_size].long().to(device)  # (B, L)
                model(batch)
                for name, rec in recs.items():
                    assert rec.queries is not None
                    out[name].extend(q.cpu() for q in rec.queries)  # (B*L, h, dk) each
                    rec.queries.clear()
                seen += batch.numel()
                if max_queries is not None and seen >= max_queries:
                    break
            bar.close()
    finally:
        for m, mode in modes:
            m.training = mode
    result = {name: torch.cat(qs)[:max_queries] for name, qs in out.items() if qs}
    if len(result) < len(layers):
        raise NoQueriesError(f"no queries reached PEER layer(s) {sorted(set(layers) - set(result))}")
    return result


# -------------------------------------------------------------------------- exact top-k
def default_chunk_rows(layer: PEERLayer, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of float32 full keys takes about ``chunk_bytes``."""
    return max(1, min(layer.n_rows, chunk_bytes // (layer.n_cols * layer.config.d_key * 4)))


def _gpu_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_faiss(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


@torch.no_grad()
def exact_topk(
    layer: PEERLayer,
    queries: Tensor,
    k: int,
    chunk_rows: int | None = None,
    use_gpu: bool | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product over all materialised full keys of ``layer``.

    queries: (Q, dk) -> scores (Q, k) float32 descending, ids (Q, k) int64 global expert ids.
    Keys are materialised and searched ``chunk_rows`` grid rows at a time with a FAISS
    ``IndexFlatIP``; each chunk's top-k (local ids + offset ``row_start * n2``) is merged into a
    running top-k (``faiss.ResultHeap``). Memory bound: one chunk of ``chunk_rows * n2 * dk``
    float32 keys (held twice: the materialised tensor and the index's copy) plus FAISS's search
    block, plus the ``Q x k`` running scores and ids; independent of ``N``. ``chunk_rows``
    None = about 64 MiB of keys per chunk. ``use_gpu`` None = a FAISS GPU index when CUDA and
    faiss-gpu are present; True requires one.
    """
    if queries.ndim != 2 or queries.shape[1] != layer.config.d_key:
        raise AuditError(f"queries must be (Q, d_key={layer.config.d_key}), got {tuple(queries.shape)}")
    if queries.shape[0] == 0:
        raise NoQueriesError("no queries to search")
    if not 1 <= k <= layer.num_experts:
        raise AuditError(f"k={k} must be between 1 and the number of experts {layer.num_experts}")
    gpu = _gpu_available() if use_gpu is None else use_gpu
    if gpu and not _gpu_available():
        raise AuditError("use_gpu=True but no CUDA device with faiss-gpu is available")
    rows = default_chunk_rows(layer) if chunk_rows is None else int(chunk_rows)
    if rows <= 0:
        raise AuditError(f"chunk_rows must be positive, got {chunk_rows}")
    xq = _as_faiss(queries)  # (Q, dk)
    n1, n2, dk = layer.n_rows, layer.n_cols, layer.config.d_key
    heap = faiss.ResultHeap(xq.shape[0], k, keep_max=True)
    res = faiss.StandardGpuResources() if gpu else None
    bar = tqdm(range(0, n1, rows), desc="audit: exact", unit="chunk", disable=not progress, leave=False)
    for r0 in bar:
        r1 = min(r0 + rows, n1)
        keys = _as_faiss(layer.full_keys(r0, r1))  # ((r1 - r0) * n2, dk)
        index = faiss.GpuIndexFlatIP(res, dk) if gpu else faiss.IndexFlatIP(dk)
        index.add(keys)
        kk = min(k, keys.shape[0])
        D, I = index.search(xq, kk)  # (Q, kk) each, local ids
        if kk < k:  # a chunk smaller than k: pad so the heap sees (Q, k)
            D = np.pad(D, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, k - kk)), constant_values=-1)
        I = np.where(I >= 0, I + r0 * n2, -1).astype(np.int64)
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I))
        del index, keys
    bar.close()
    heap.finalize()  # sorts each row, best first
    return torch.from_numpy(heap.D.copy()), torch.from_numpy(heap.I.copy())


# ---------------------------------------------------------------------------- compare
def _true_scores(layer: PEERLayer, q: Tensor, ids: Tensor) -> Tensor:
    """float64 q . [C1_i ; C2_j] for the given ids. q: (T, h, dk); ids: (T, h, k) -> (T, h, k)."""
    c1 = layer.all_row_keys().detach().double()  # (n1, dk/2)
    c2 = layer.col_keys.detach().double()  # (n2, dk/2)
    q1, q2 = q.double().chunk(2, dim=-1)  # (T, h, dk/2) each
    n2 = layer.n_cols
    rows, cols = torch.div(ids, n2, rounding_mode="floor"), ids % n2  # (T, h, k)
    return torch.einsum("thd,thkd->thk", q1, c1[rows]) + torch.einsum("thd,thkd->thk", q2, c2[cols])


def compare_topk(
    router_scores: Tensor,
    router_ids: Tensor,
    exact_scores: Tensor,
    exact_ids: Tensor,
    router_true: Tensor,
    tie_rtol: float = 1e-5,
) -> list[RetrievalStats]:
    """Compare router and exact top-k for (T, h, k) tensors; one :class:`RetrievalStats` per head.

    ``router_true`` (T, h, k) are the exact (float64) scores of the router's ids. Per query
    vector, with ``s_k`` the exact k-th score and ``tol = tie_rtol * max(1, max_j |exact_j|)``:
    the mismatch is a *tie* when every exact id the router missed scores ``<= s_k + tol`` (it sat
    at the boundary) and every id the router returned instead scores ``>= s_k - tol``; then its
    missed ids count as ``tied_ids``, otherwise as ``missed_ids``.
    """
    order = router_scores.argsort(dim=-1, descending=True, stable=True)  # (T, h, k)
    rs = router_scores.gather(-1, order).double()
    rid = router_ids.gather(-1, order)
    rtrue = router_true.gather(-1, order)
    es, eid = exact_scores.double(), exact_ids.to(rid.dtype)
    tol = tie_rtol * es.abs().amax(-1).clamp_min(1.0)  # (T, h)
    s_k = es[..., -1]  # (T, h)
    in_router = (eid.unsqueeze(-1) == rid.unsqueeze(-2)).any(-1)  # (T, h, k) exact id returned
    in_exact = (rid.unsqueeze(-1) == eid.unsqueeze(-2)).any(-1)  # (T, h, k) router id is exact
    missed = ~in_router
    boundary_ok = (~missed | (es <= (s_k + tol).unsqueeze(-1))).all(-1)  # (T, h)
    extra_ok = (in_exact | (rtrue >= (s_k - tol).unsqueeze(-1))).all(-1)  # (T, h)
    srt = rid.sort(-1).values
    dups = (srt[..., 1:] == srt[..., :-1]).sum(-1)  # (T, h)
    tie_query = missed.any(-1) & boundary_ok & extra_ok & (dups == 0)
    n_missed = missed.sum(-1)  # (T, h)
    rank_ok = (rid == eid) | ((rtrue - es).abs() <= tol.unsqueeze(-1))  # (T, h, k)
    diff = (rs - es).abs().amax(-1)  # (T, h)
    k = router_ids.shape[-1]
    out = []
    for head in range(router_ids.shape[1]):
        out.append(
            RetrievalStats(
                queries=router_ids.shape[0],
                k=k,
                slots=router_ids.shape[0] * k,
                hits=int(in_router[:, head].sum()),
                tied_ids=int(n_missed[:, head][tie_query[:, head]].sum()),
                missed_ids=int(n_missed[:, head][~tie_query[:, head]].sum()),
                exact_matches=int((n_missed[:, head] == 0).sum()),
                tie_matches=int(tie_query[:, head].sum()),
                rank_agreements=int(rank_ok[:, head].sum()),
                duplicate_ids=int(dups[:, head].sum()),
                max_score_diff=float(diff[:, head].max()) if diff.shape[0] else 0.0,
            )
        )
    return out


def router_usage(ids: Tensor, weights: Tensor, num_experts: int, dist: Any = None) -> tuple[float, int, float]:
    """Expert usage and unevenness from router ids and gate weights (same shape, any).

    Returns (share of experts retrieved at least once, experts used, KL(p || uniform) in nats)
    where ``p`` is the accumulated gate weight per expert, normalised (PEER paper Table 2).
    With ``dist`` (a :class:`lifelong.distributed.Dist`), over every rank's ids and weights.
    """
    acc = torch.zeros(num_experts, dtype=torch.float64)
    acc.index_add_(0, ids.reshape(-1).cpu(), weights.reshape(-1).cpu().double())
    hit = torch.zeros(num_experts, dtype=torch.float64)
    hit[ids.reshape(-1).cpu()] = 1.0
    if dist is not None:
        both = dist.sum_(torch.cat([acc, hit]).to(dist.device)).cpu()
        acc, hit = both[:num_experts], both[num_experts:]
    used = int((hit > 0).sum())
    return used / num_experts, used, kl_to_uniform(acc)


_COUNTS = ("queries", "slots", "hits", "tied_ids", "missed_ids", "exact_matches", "tie_matches", "rank_agreements", "duplicate_ids")


def _sum_stats(per_head: list[RetrievalStats], dist: Any) -> list[RetrievalStats]:
    """Every rank's per-head counts summed (``max_score_diff``: the maximum) on every rank."""
    counts = torch.tensor([[getattr(s, f) for f in _COUNTS] for s in per_head], dtype=torch.int64, device=dist.device)
    diffs = torch.tensor([s.max_score_diff for s in per_head], dtype=torch.float64, device=dist.device)
    dist.sum_(counts)
    tdist.all_reduce(diffs, op=tdist.ReduceOp.MAX, group=dist.group)
    return [RetrievalStats(k=s.k, max_score_diff=float(d), **dict(zip(_COUNTS, (int(x) for x in row))))
            for s, row, d in zip(per_head, counts.cpu().tolist(), diffs.cpu().tolist())]


@torch.no_grad()
def audit_layer(
    layer: PEERLayer,
    queries: Tensor,
    chunk_rows: int | None = None,
    tie_rtol: float = 1e-5,
    use_gpu: bool | None = None,
    name: str = "",
    progress: bool = False,
    dist: Any = None,
) -> LayerAudit:
    """Audit one layer on queries (Q, h, dk) (after the query BatchNorm, e.g. from :func:`capture_queries`).

    With ``dist`` (a :class:`lifelong.distributed.Dist`, every rank passing the same queries),
    each rank searches and compares only its share ``dist.share(Q)`` of the queries and the
    counts and usage are summed over ranks: every rank returns the whole layer's result."""
    c = layer.config
    if queries.ndim != 3 or tuple(queries.shape[1:]) != (c.heads, c.d_key):
        raise AuditError(f"queries for layer {name or '?'} must be (Q, heads={c.heads}, d_key={c.d_key}), got {tuple(queries.shape)}")
    if queries.shape[0] == 0:
        raise NoQueriesError(f"no queries to audit for layer {name or '?'}")
    tokens, h, k = queries.shape[0], c.heads, c.top_k
    if dist is not None:
        queries = queries[dist.share(tokens)]  # this rank's tokens
    Q = queries.shape[0]
    device = layer.col_keys.device
    gpu = _gpu_available() if use_gpu is None else use_gpu
    rows = default_chunk_rows(layer) if chunk_rows is None else chunk_rows

    t0 = time.perf_counter()
    if Q:
        ex_s, ex_i = exact_topk(layer, queries.reshape(Q * h, -1), k, rows, gpu, progress)  # (Q*h, k)
    else:  # a rank with no share (fewer tokens than ranks)
        ex_s, ex_i = torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    ex_s, ex_i = ex_s.view(Q, h, k), ex_i.view(Q, h, k)
    t1 = time.perf_counter()
    r_s, r_i = [], []
    for a in range(0, Q, _ROUTER_TOKENS):
        s, i = layer.retrieve(queries[a : a + _ROUTER_TOKENS].to(device, layer.col_keys.dtype))  # (c, h, k)
        r_s.append(s.cpu())
        r_i.append(i.cpu())
    router_s = torch.cat(r_s) if r_s else torch.zeros(0, h, k)  # (Q, h, k)
    router_i = torch.cat(r_i) if r_i else torch.zeros(0, h, k, dtype=torch.long)
    t2 = time.perf_counter()

    per_head = [RetrievalStats(k=k) for _ in range(h)]
    cpu_layer_q = queries.cpu()
    for a in range(0, Q, _COMPARE_TOKENS):
        b = min(a + _COMPARE_TOKENS, Q)
        true = _true_scores(layer, cpu_layer_q[a:b].to(device), router_i[a:b].to(device)).cpu()  # (c, h, k)
        chunk = compare_topk(router_s[a:b], router_i[a:b], ex_s[a:b], ex_i[a:b], true, tie_rtol)
        per_head = [x.merge(y) for x, y in zip(per_head, chunk)]
    if dist is not None:
        per_head = _sum_stats(per_head, dist)
    total = RetrievalStats(k=k)
    for s in per_head:
        total = total.merge(s)
    gates = router_s.softmax(-1) if c.score == "softmax" else router_s.sigmoid()  # (Q, h, k)
    usage, used, kl = router_usage(router_i, gates, layer.num_experts, dist)
    t3 = time.perf_counter()
    return LayerAudit(
        name=name,
        n_rows=layer.n_rows,
        n_cols=layer.n_cols,
        num_experts=layer.num_experts,
        heads=h,
        top_k=k,
        d_key=c.d_key,
        candidates=c.candidates,
        tokens=tokens,
        total=total,
        per_head=per_head,
        usage=usage,
        experts_used=used,
        kl_uniform=kl,
        tie_rtol=tie_rtol,
        backend="faiss-gpu" if gpu else "faiss-cpu",
        chunk_rows=rows,
        seconds_exact=t1 - t0,
        seconds_router=t2 - t1,
        seconds_compare=t3 - t2,
    )


def audit_model(
    model: nn.Module,
    blocks: np.ndarray | Tensor,
    batch_size: int = 8,
    max_queries: int | None = None,
    chunk_rows: int | None = None,
    tie_rtol: float = 1e-5,
    use_gpu: bool | None = None,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
    dist: Any = None,
) -> AuditReport:
    """Capture queries from held-out token blocks (n, L) and audit every PEER layer of ``model``.

    With ``dist``: every rank captures the same queries (the model forward is the cheap part)
    and audits its share of them (:func:`audit_layer`); every rank returns the summed report."""
    start = time.perf_counter()
    layers = _peer_layers(model)
    captured = capture_queries(model, blocks, batch_size, max_queries, progress)
    results: dict[str, LayerAudit] = {}
    bar = tqdm(layers.items(), desc="audit: layers", unit="layer", disable=not progress, leave=False)
    for name, layer in bar:
        bar.set_postfix(layer=name)
        results[name] = audit_layer(layer, captured[name], chunk_rows, tie_rtol, use_gpu, name, progress, dist)
    bar.close()
    n_blocks = int(np.asarray(blocks).shape[0]) if not isinstance(blocks, Tensor) else int(blocks.shape[0])
    return AuditReport(layers=results, blocks=n_blocks, seconds=time.perf_counter() - start, extra=dict(extra or {}))

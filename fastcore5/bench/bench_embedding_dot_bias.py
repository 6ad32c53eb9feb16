"""EmbeddingDotBias: fastcore5 against the eager fastai-style forward (F.embedding gathers, as the
H200 anchors measured it) and torch.compile of the same function, forward and forward+backward,
with uniform and Zipf-distributed item indices. fp32 tables, int64 indices, y_range=(0, 5.5).

On CPU (the C++ kernels, issue 24) the shapes are MovieLens-100k and -25M with 50 factors, and
at ML-25M a training step (forward, backward, plain SGD) compares the dense gradients (a
zero-filled table per step, then an optimizer pass over every row) with sparse gradients and a
row-wise update, and times the zero-fill and the full-table pass alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcore5

from .common import Case, Rotating, copies_to_exceed_l2

# (n_users, n_items, factors, batch): MovieLens-100k, MovieLens-25M and a large catalogue.
SHAPES = [(944, 1654, 40, 65536), (162541, 59047, 64, 65536), (4_000_000, 1_000_000, 64, 262144)]
# MovieLens-100k and -25M as issue 24 sizes them (n_factors 50).
CPU_SHAPES = [(944, 1683, 50, 4096), (162542, 59048, 50, 65536)]
STEP_LR = 0.01
Y_RANGE = (0.0, 5.5)
ZIPF_EXPONENT = 1.0  # item popularity ~ 1/rank, roughly the skew of MovieLens ratings
FLOAT_BYTES, INDEX_BYTES = 4, 8


def eager(users, items, u_weight, i_weight, u_bias, i_bias):
    """fastai's forward with (n, 1) biases: the anchors' formulation."""
    dot = (F.embedding(users, u_weight) * F.embedding(items, i_weight)).sum(1)
    res = dot + F.embedding(users, u_bias).squeeze(1) + F.embedding(items, i_bias).squeeze(1)
    return torch.sigmoid(res) * (Y_RANGE[1] - Y_RANGE[0]) + Y_RANGE[0]


def fused(users, items, u_weight, i_weight, u_bias, i_bias):
    return fastcore5.embedding_dot_bias(users, items, u_weight, i_weight, u_bias, i_bias, y_range=Y_RANGE)


def deterministic(step):
    """``step`` with torch.use_deterministic_algorithms(True): the sorted segment-reduction
    backward instead of atomics (the flag is read when the backward runs)."""

    def run():
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            step()
        finally:
            torch.use_deterministic_algorithms(previous)

    return run


def forward_bytes(n_users, n_items, factors, batch) -> int:
    """The forward's floor: two indices, two rows, two biases read and one output written per sample."""
    return batch * (2 * INDEX_BYTES + 2 * factors * FLOAT_BYTES + 2 * FLOAT_BYTES + FLOAT_BYTES)


def backward_bytes(n_users, n_items, factors, batch) -> int:
    """The backward's floor with dense gradients: per sample grad_out, two indices, the two rows
    and biases (read once, serving both the y_range derivative and the gradients); then all four
    dense gradient tables written once."""
    per_sample = FLOAT_BYTES + 2 * INDEX_BYTES + 2 * factors * FLOAT_BYTES + 2 * FLOAT_BYTES
    return batch * per_sample + (n_users + n_items) * (factors + 1) * FLOAT_BYTES


def _item_sampler(kind, n_items, device):
    if kind == "uniform":
        return lambda batch: torch.randint(0, n_items, (batch,), device=device)
    # Zipf over popularity ranks, with ranks scattered over the ids so popular items are not
    # neighbours in memory (they are not in real catalogues either).
    weights = 1.0 / torch.arange(1, n_items + 1, device=device, dtype=torch.float64) ** ZIPF_EXPONENT
    rank_to_id = torch.randperm(n_items, device=device)
    return lambda batch: rank_to_id[torch.multinomial(weights, batch, replacement=True)]


def _shape_cases(device, n_users, n_items, factors, batch, items_kind, compiled) -> list[Case]:
    tables = [
        (torch.randn(rows, cols, device=device) * scale).requires_grad_()
        for rows, cols, scale in ((n_users, factors, 0.1), (n_items, factors, 0.1), (n_users, 1, 0.5), (n_items, 1, 0.5))
    ]
    sample_items = _item_sampler(items_kind, n_items, device)

    def make_indices():
        return torch.randint(0, n_users, (batch,), device=device), sample_items(batch)

    indices = Rotating(make_indices, copies_to_exceed_l2(forward_bytes(n_users, n_items, factors, batch), device))
    grad_out = torch.randn(batch, device=device)

    def forward_only(fn):
        def run():
            with torch.no_grad():
                return fn(*indices.next(), *tables)

        return run

    def forward_backward(fn):
        def run():
            fn(*indices.next(), *tables).backward(grad_out)
            for table in tables:
                table.grad = None

        return run

    shape = f"{n_users}u.{n_items}i.D{factors}.B{batch}.{items_kind}"
    anchor = f"embdot.{n_users}u.{n_items}i.D{factors}.B{batch}"
    # The anchors were measured with uniform indices only.
    has_anchor = device == "cuda" and items_kind == "uniform" and (n_users, n_items, factors, batch) in SHAPES
    fwd_bytes = forward_bytes(n_users, n_items, factors, batch)
    fwd = Case(
        "embedding_dot_bias", shape, "fp32", "fwd",
        {"fastcore5": forward_only(fused), "eager": forward_only(eager), "torch.compile": forward_only(compiled)},
        bytes_moved=fwd_bytes,
        anchor_keys={"eager": anchor + ".eager_fwd_ms"} if has_anchor else {},
    )
    fwdbwd_anchors = {"eager": anchor + ".eager_fwdbwd_ms"}
    if n_users < 1_000_000:  # the anchor script compiled only the two smaller shapes
        fwdbwd_anchors["torch.compile"] = anchor + ".compiled_fwdbwd_ms"
    fwdbwd_fns = {
        "fastcore5": forward_backward(fused),
        "fastcore5.deterministic": deterministic(forward_backward(fused)),
        "eager": forward_backward(eager),
        "torch.compile": forward_backward(compiled),
    }
    if device == "cpu":
        del fwdbwd_fns["fastcore5.deterministic"]  # the CPU backward is always the deterministic one
    fwdbwd = Case(
        "embedding_dot_bias", shape, "fp32", "fwdbwd",
        fwdbwd_fns,
        bytes_moved=fwd_bytes + backward_bytes(n_users, n_items, factors, batch),
        anchor_keys=fwdbwd_anchors if has_anchor else {},
    )
    return [fwd, fwdbwd]


def _training_step_cases(device, n_users, n_items, factors, batch) -> list[Case]:
    """Forward, backward and an SGD step, without and with momentum 0.9: sparse gradients with
    fastcore5's SGD (the cpu backend's fused row-wise step) against dense gradients with
    fastcore5's SGD (each step allocates and zero-fills two gradient tables, then the optimizer
    walks every row) and against the sparse gradients with torch.optim.SGD; plus the two
    full-table passes of the dense step timed alone."""
    def make_tables():
        return [
            (torch.randn(rows, cols, device=device) * scale).requires_grad_()
            for rows, cols, scale in ((n_users, factors, 0.1), (n_items, factors, 0.1), (n_users, 1, 0.5), (n_items, 1, 0.5))
        ]

    users, items = torch.randint(0, n_users, (batch,), device=device), torch.randint(0, n_items, (batch,), device=device)
    grad_out = torch.randn(batch, device=device)

    def step(tables, optimizer, sparse):
        def run():
            fastcore5.embedding_dot_bias(users, items, *tables, y_range=Y_RANGE, sparse=sparse).backward(grad_out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    weights = [t.detach() for t in make_tables()[:2]]
    grads = [torch.randn_like(w) for w in weights]

    def zero_fill():
        for w in weights:
            torch.zeros_like(w)

    def full_table_pass():
        for w, g in zip(weights, grads):
            w.add_(g, alpha=-1e-9)

    table_bytes = (n_users + n_items) * factors * FLOAT_BYTES
    shape = f"{n_users}u.{n_items}i.D{factors}.B{batch}"
    fused_rows = []
    for momentum in (0.0, 0.9):
        # fastcore5's SGD on sparse gradients (the cpu backend's row-wise C++ step) against the dense
        # gradients with fastcore5's SGD and the sparse ones with torch's SGD, each with its own tables.
        tables = {label: make_tables() for label in ("fastcore5.sparse_fused", "fastcore5.dense", "torch_sgd.sparse")}
        optimizers = {
            label: (torch.optim.SGD if label.startswith("torch") else fastcore5.optim.SGD)(t, lr=STEP_LR, momentum=momentum)
            for label, t in tables.items()
        }
        fused_rows.append(Case(
            "embedding_dot_bias", f"{shape}.sparse_fused.momentum{momentum:g}", "fp32", "step",
            {label: step(tables[label], optimizers[label], not label.endswith("dense")) for label in tables},
            ours="fastcore5.sparse_fused",
        ))
    return fused_rows + [
        Case("embedding_dot_bias", shape + ".zero_fill_dense_grads", "fp32", "part", {"fastcore5": zero_fill},
             bytes_moved=table_bytes),
        Case("embedding_dot_bias", shape + ".sgd_full_table_pass", "fp32", "part", {"fastcore5": full_table_pass},
             bytes_moved=3 * table_bytes),
    ]


def cases(device: str, quick: bool = False) -> list[Case]:
    compiled = torch.compile(eager)
    if device != "cuda":
        shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
        found = [case for shape in shapes for case in _shape_cases(device, *shape, "uniform", compiled)]
        return found + ([] if quick else _training_step_cases(device, *CPU_SHAPES[1]))
    shapes = [SHAPES[1]] if quick else SHAPES
    return [
        case
        for n_users, n_items, factors, batch in shapes
        for kind in ("uniform", "zipf")
        for case in _shape_cases(device, n_users, n_items, factors, batch, kind, compiled)
    ]

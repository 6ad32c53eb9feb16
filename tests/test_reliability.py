"""Reliability (issue 21): a refused call changes nothing, every backend keeps the same promise,
and misuse gets an error naming the argument. Each class of the issue has its section; the random
search over the whole public API is tests/test_fuzz.py."""
from __future__ import annotations

import pytest
import torch

import fastcore5
from fastcore5.optim import SGD

from reliability_helpers import CPU_BACKENDS, assert_unchanged, snapshot

F64 = torch.float64


def _params(n=3, shape=(4, 3)):
    return [torch.randn(shape, dtype=F64, requires_grad=True) for _ in range(n)]


# --------------------------------------------------------------- 1. a step is all or nothing


def _spoil_later_group_buffer(opt, params):
    opt.state[params[2]]["momentum_buffer"] = torch.ones(1, dtype=F64)  # broadcastable, wrong shape


def _spoil_later_group_lr(opt, params):
    opt.param_groups[1]["lr"] = "0.1"


def _spoil_later_group_grad_layout(opt, params):
    params[2].grad = torch.randn(3, 4, dtype=F64).T  # the Triton kernel walks memory: refused


SPOILERS = {
    "momentum buffer of another shape": (_spoil_later_group_buffer, ValueError, "param 0 of param group 1"),
    "lr of another type": (_spoil_later_group_lr, TypeError, "lr must be a float"),
    "gradient laid out unlike its param": (_spoil_later_group_grad_layout, ValueError, "param 0 of param group 1"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("spoiler", list(SPOILERS))
def test_a_refused_step_changes_nothing_in_any_group(backend, contiguous, spoiler):
    spoil, error, match = SPOILERS[spoiler]
    if spoiler == "gradient laid out unlike its param" and (backend == "torch" or contiguous):
        pytest.skip("only the Triton kernel in normal mode needs a gradient laid out like its param")
    if spoiler == "momentum buffer of another shape" and contiguous:
        pytest.skip("contiguous mode holds the buffers itself; load_state_dict is its way in (class 2 tests)")
    params = _params()
    opt = SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1, momentum=0.9, dampening=0.3,
              contiguous=contiguous)
    with fastcore5.use_backend(backend):
        for p in params:
            p.grad = torch.randn_like(p) if not contiguous else p.grad.copy_(torch.randn_like(p))
        opt.step()  # group 0 and 1 have buffers now; add a param without one to group 0's next step
        for p in params:
            if contiguous:
                p.grad.copy_(torch.randn_like(p))
            else:
                p.grad = torch.randn_like(p)
        spoil(opt, params)
        before = snapshot(params, opt)
        with pytest.raises(error, match=match):
            opt.step()
        assert_unchanged(before, snapshot(params, opt), "a refused step")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_refused_first_step_creates_no_momentum_buffer(backend):
    """The Triton step used to create (zero) buffers before refusing; the next valid step then
    stored (1 - dampening) * g where torch stores g."""
    params = _params(2)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    theirs = torch.optim.SGD(twins, lr=0.1, momentum=0.9, dampening=0.5)
    grads = [torch.randn_like(p) for p in params]
    with fastcore5.use_backend(backend):
        params[0].grad = grads[0].clone()
        params[1].grad = torch.randn(3, 4, dtype=F64).T
        opt_state_before = snapshot(params, ours)
        if backend == "triton":
            with pytest.raises(ValueError, match="param 1 of param group 0"):
                ours.step()
            assert_unchanged(opt_state_before, snapshot(params, ours), "a refused step")
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
    theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[t]["momentum_buffer"], rtol=0, atol=1e-14)


# ---------------------------------------------------------------- 2. validate before mutating

BAD_GROUPS = {
    "negative lr": (dict(lr=-0.1), ValueError),
    "nesterov with dampening": (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError),
    "nesterov without momentum": (dict(momentum=0.0, nesterov=True), ValueError),
    "integer param": (dict(params=[torch.zeros(3, dtype=torch.int64)]), TypeError),
    "param already in another group": ("reuse", ValueError),
    "non-numeric momentum": (dict(momentum="0.9"), TypeError),
}


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("bad", list(BAD_GROUPS))
def test_a_refused_param_group_is_not_kept(contiguous, bad):
    params = _params(2)
    opt = SGD([params[0]], lr=0.1, momentum=0.9, contiguous=contiguous)
    extra, error = BAD_GROUPS[bad]
    group = {"params": [params[0]]} if extra == "reuse" else {"params": [params[1]], **extra}
    with fastcore5.use_backend("torch"):
        params[0].grad = torch.randn_like(params[0]) if not contiguous else params[0].grad.copy_(torch.randn_like(params[0]))
        before = snapshot(params, opt)
        with pytest.raises(error):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
        assert_unchanged(before, snapshot(params, opt), "a refused add_param_group")
        opt.step()  # the next valid call still works
        opt.add_param_group({"params": [params[1]], "lr": 0.05})
        params[1].grad = torch.randn_like(params[1]) if not contiguous else params[1].grad.copy_(torch.randn_like(params[1]))
        opt.step()


def test_a_refused_contiguous_constructor_leaves_params_and_grads_alone():
    good, shared = _params(1)[0], torch.randn(6, dtype=F64)
    tied = [torch.nn.Parameter(shared[:4]), torch.nn.Parameter(shared[2:])]  # two leaves, one storage
    before = snapshot([good, *tied])
    with pytest.raises(ValueError, match="param 0 of param group 1 and param 1 of param group 1 share memory"):
        SGD([{"params": [good]}, {"params": tied}], lr=0.1, contiguous=True)
    assert_unchanged(before, snapshot([good, *tied]), "a refused constructor")
    assert good.grad is None and good.data_ptr() != 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_load_state_dict_in_contiguous_mode_keeps_its_state_when_it_refuses(backend):
    params = _params(2)
    opt = SGD(params, lr=0.1, momentum=0.9, contiguous=True)
    with fastcore5.use_backend(backend):
        for p in params:
            p.grad.copy_(torch.randn_like(p))
        opt.step()
        bad = opt.state_dict()
        bad["state"] = {0: {"momentum_buffer": torch.ones(1, dtype=F64)}, 1: {"momentum_buffer": torch.ones(4, 3, dtype=F64)}}
        before = snapshot(params, opt)
        with pytest.raises(ValueError, match="momentum_buffer of param 0 of param group 0 must match it in shape"):
            opt.load_state_dict(bad)
        assert_unchanged(before, snapshot(params, opt), "a refused load_state_dict")
        opt.step()


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_zero_grad_takes_sparse_gradients_in_both_modes(contiguous):
    params = _params(2)
    opt = SGD(params, lr=0.1, contiguous=contiguous)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad = torch.randn_like(params[1]).to_sparse()
    opt.zero_grad()
    for p in params:
        assert p.grad is None if not contiguous else torch.equal(p.grad, torch.zeros_like(p))


# ------------------------------------------------------------------------------ 3. aliasing


@pytest.mark.parametrize("make", ["same storage", "overlapping views", "another group"])
def test_contiguous_mode_refuses_params_that_share_memory_naming_them(make):
    base = torch.randn(8, dtype=F64)
    a = torch.nn.Parameter(base[:5])
    b = torch.nn.Parameter(base if make == "same storage" else base[3:])
    groups = [{"params": [a]}, {"params": [b]}] if make == "another group" else [{"params": [a, b]}]
    names = "param 0 of param group 0 and param 0 of param group 1" if make == "another group" else \
        "param 0 of param group 0 and param 1 of param group 0"
    with pytest.raises(ValueError, match=names + " share memory"):
        SGD(groups, lr=0.1, contiguous=True)
    # normal mode keeps the sharing, as torch.optim.SGD does
    opt = SGD(groups, lr=0.1)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert a.data_ptr() == base.data_ptr()


def test_contiguous_mode_keeps_disjoint_views_and_refuses_a_later_group_sharing_its_buffer():
    base = torch.randn(8, dtype=F64)
    a, b = torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:])
    opt = SGD([a, b], lr=0.1, contiguous=True)  # disjoint: each gets its own slot
    twin = torch.nn.Parameter(a.data)  # shares the flat buffer's memory with a
    with pytest.raises(ValueError, match="param 0 of param group 0 and param 0 of param group 1 share memory"):
        opt.add_param_group({"params": [twin]})
    assert len(opt.param_groups) == 1


def test_a_refused_patch_leaves_the_fastai_model_as_it_was():
    pytest.importorskip("fastai")
    from fastai.collab import EmbeddingDotBias as FastaiEmbeddingDotBias

    import fastcore5.fastai

    linear = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(linear, torch.nn.ReLU(), FastaiEmbeddingDotBias(2, 3, 4, y_range=(5.0, 0.0)))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="y_range"):
        fastcore5.fastai.patch_model(model)
    assert [type(m) for m in model.modules()] == before and model[0] is linear


@pytest.mark.parametrize("lr", [slice(float("nan"), 1e-3), slice(-1e-5, 1e-3), slice(float("inf"))])
def test_fastai_opt_func_refuses_a_bad_lr_slice_naming_it(lr):
    pytest.importorskip("fastai")
    import fastcore5.fastai

    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr\.(start|stop) must be finite and > 0"):
        fastcore5.fastai.SGD([p], lr=lr)


# ------------------------------------------------------------- 7. small things a user meets


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fastcore5.optim.even_mults(1e-5, 1e-3, 0), ValueError, r"n must be an int >= 1, got 0"),
        (lambda: fastcore5.optim.even_mults(1e-5, 1e-3, 2.5), TypeError, r"n must be an int"),
        (lambda: fastcore5.optim.even_mults(float("nan"), 1e-3, 3), ValueError, r"start must be finite and > 0"),
        (lambda: fastcore5.optim.even_mults(1e-5, -1e-3, 3), ValueError, r"stop must be finite and > 0"),
        (lambda: fastcore5.optim.lr_range(float("nan"), 2), ValueError, r"lr must be finite and >= 0"),
        (lambda: fastcore5.optim.lr_range(-1e-3, 2), ValueError, r"lr must be finite and >= 0"),
        (lambda: fastcore5.optim.lr_range(slice(-1e-3), 2), ValueError, r"lr\.stop must be finite and > 0"),
        (lambda: fastcore5.optim.lr_range(1e-3, -2), ValueError, r"n must be an int >= 1"),
        (lambda: fastcore5.optim.discriminative_param_groups(3, 1e-3), TypeError, r"layer_groups must be an iterable"),
        (lambda: fastcore5.optim.discriminative_param_groups([[torch.zeros(1)]], float("nan")), ValueError, "lr must be finite"),
    ],
)
def test_lesson_helpers_name_the_argument_and_its_range(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lesson_helpers_still_follow_fastai_at_the_edges():
    assert fastcore5.optim.lr_range(slice(0, 1e-3), 3) == [1e-4, 1e-4, 1e-3]  # fastai: a zero start is no start
    assert fastcore5.optim.lr_range(0.0, 2) == [0.0, 0.0]  # lr 0 is a valid (frozen) rate for torch's SGD
    assert fastcore5.optim.even_mults(None, 1e-3, 1) == [1e-3]


@pytest.mark.parametrize("n", [3, -3, 10])
def test_freeze_to_names_n_and_its_range_and_changes_nothing(n):
    params = _params(2)
    opt = SGD([{"params": [p]} for p in params], lr=0.1)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"n must be an int in \[-2, 2\]"):
        opt.freeze_to(n)
    assert_unchanged(before, snapshot(params, opt), "a refused freeze_to")


@pytest.mark.parametrize("method", ["top_by_bias", "bottom_by_bias", "pca"])
@pytest.mark.parametrize("k, error", [(-1, ValueError), (0, ValueError), (1.5, TypeError), (float("nan"), TypeError)])
def test_interpretation_helpers_name_k_and_its_range(method, k, error):
    model = fastcore5.nn.EmbeddingDotBias(3, 4, 5)
    with pytest.raises(error, match=r"k must be an int"):
        getattr(model, method)(k)


# ------------------------------------------------------------ 4. one promise per option


def _tables(n_users=5, n_items=6, factors=3, dtype=F64):
    return [torch.randn(n, d, dtype=dtype, requires_grad=True) for n, d in
            ((n_users, factors), (n_items, factors), (n_users, 1), (n_items, 1))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_validate_off_scores_bad_samples_nan_with_no_gradient_on_every_backend(backend, sparse):
    tables = _tables()
    users = torch.tensor([-1, 0, 7, 2, 4])
    items = torch.tensor([0, 9, 1, -3, 5])
    good = torch.tensor([False, False, False, False, True])
    with fastcore5.use_backend(backend):
        out = fastcore5.embedding_dot_bias(users, items, *tables, y_range=(0.0, 5.0), sparse=sparse, validate="off")
        out.nan_to_num(0.0).sum().backward()
    assert torch.equal(out.isnan(), ~good)
    expected = fastcore5.reference.embedding_dot_bias(users[good], items[good], *tables, y_range=(0.0, 5.0))
    torch.testing.assert_close(out[good], expected)
    grads = [t.grad.to_dense() for t in tables]
    # only row 4 of the user tables and row 5 of the item tables were used by a good sample
    for grad, row in zip(grads, (4, 5, 4, 5)):
        others = torch.ones(grad.shape[0], dtype=torch.bool)
        others[row] = False
        assert torch.equal(grad[others], torch.zeros_like(grad[others]))
        assert grad[row].abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["embedding_dot_bias", "linear_relu", "mlp"])
def test_double_backward_raises_the_same_error_on_every_backend(backend, op):
    if op == "embedding_dot_bias":
        tables = _tables()
        inputs = tables[:1]
        call = lambda: fastcore5.embedding_dot_bias(torch.tensor([0, 4]), torch.tensor([5, 1]), *tables)
    else:
        x = torch.randn(4, 3, dtype=F64, requires_grad=True)
        w, b = torch.randn(3, 3, dtype=F64, requires_grad=True), torch.randn(3, dtype=F64, requires_grad=True)
        inputs = [w]
        call = (lambda: fastcore5.linear_relu(x, w, b)) if op == "linear_relu" else \
            (lambda: fastcore5.mlp(x, [w, torch.randn(2, 3, dtype=F64)], [b, None]))
    with fastcore5.use_backend(backend):
        out = call()
        grad, = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match=r"fastcore5\.\w+ is differentiable once: double backward"):
            grad.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("y_range", [(-3e38, 3e38), (0.0, 1e39), (-float("inf"), 0.0)])
def test_a_y_range_that_would_overflow_is_refused_naming_it_on_every_backend(backend, y_range):
    tables = [t.detach().float() for t in _tables()]
    with fastcore5.use_backend(backend), pytest.raises(ValueError, match="y_range"):
        fastcore5.embedding_dot_bias(torch.tensor([0]), torch.tensor([1]), *tables, y_range=y_range)
    with pytest.raises(ValueError, match="y_range"):
        fastcore5.nn.EmbeddingDotBias(3, 5, 6, y_range=y_range)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid of a huge score
def test_an_extreme_but_valid_y_range_keeps_finite_scores_finite(backend):
    tables = [t.detach().float() * 100 for t in _tables()]
    y_range = (-1.7e38, 1.7e38)
    with fastcore5.use_backend(backend):
        out = fastcore5.embedding_dot_bias(torch.tensor([0, 4, 2]), torch.tensor([5, 1, 1]), *tables, y_range=y_range)
    assert torch.isfinite(out).all()
    assert ((out >= y_range[0]) & (out <= y_range[1])).all()


# ------------------------------------------------- 5. torch.compile of every public entry point


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_contiguous_sgd_step_compiles_fullgraph_with_inductor_and_matches_eager(backend):
    """Inductor's functionalisation failed on the custom op mutating params that all alias the
    flat buffer (an assertion in decompose_auto_functionalized); the trace now steps views of the
    flat buffers themselves."""
    torch._dynamo.reset()
    start = [torch.randn(s) for s in [(5,), (3, 4)]]
    grads = [[torch.randn_like(s) for s in start] for _ in range(2)]

    def run(compiled):
        params = [s.clone().requires_grad_() for s in start]
        opt = SGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, contiguous=True)
        step = torch.compile(opt.step, fullgraph=True, backend="inductor") if compiled else opt.step
        with fastcore5.use_backend(backend):
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad.copy_(g)
                step()
        return [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]

    for eager, compiled in zip(run(False), run(True)):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
def test_sparse_embedding_dot_bias_on_the_reference_compiles_fullgraph_with_inductor(y_range):
    """Inductor cannot trace F.embedding(sparse=True) ("Cannot access storage of SparseTensorImpl");
    the reference now goes through the custom op there, as the kernels do."""
    torch._dynamo.reset()
    tables = [t.detach().float().requires_grad_() for t in _tables()]
    users, items = torch.tensor([0, 4, 4, 2]), torch.tensor([5, 1, 1, 0])
    grad_out = torch.randn(4)

    def run(fn):
        for t in tables:
            t.grad = None
        with fastcore5.use_backend("torch"):
            out = fn(users, items)
        out.backward(grad_out)
        return [out.detach()] + [t.grad.to_dense() for t in tables]

    def call(u, i):
        return fastcore5.embedding_dot_bias(u, i, *tables, y_range=y_range, sparse=True)

    eager = run(call)
    compiled = run(torch.compile(call, fullgraph=True, backend="inductor"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ 6. sparse gradients

SPARSE_CONFIGS = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening": dict(momentum=0.9, dampening=0.5),
    "maximize": dict(maximize=True, momentum=0.5),
    "tensor lr": dict(lr=torch.tensor(0.05, dtype=F64)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("config", list(SPARSE_CONFIGS))
def test_sparse_embedding_gradients_are_stepped_as_torch_steps_them(backend, contiguous, config):
    hyper = {"lr": 0.1, **SPARSE_CONFIGS[config]}
    theirs = torch.nn.Embedding(7, 3, sparse=True, dtype=F64)
    ours = torch.nn.Embedding(7, 3, sparse=True, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    torch_opt = torch.optim.SGD(theirs.parameters(), **hyper)
    our_opt = SGD(ours.parameters(), contiguous=contiguous, **hyper)
    untouched = torch.tensor([0, 6])
    with fastcore5.use_backend(backend):
        for _ in range(3):
            rows = torch.randint(1, 6, (5,))
            weights = torch.randn(5, 3, dtype=F64)
            for module, opt in ((theirs, torch_opt), (ours, our_opt)):
                opt.zero_grad()
                (module(rows) * weights).sum().backward()
                opt.step()
    torch.testing.assert_close(ours.weight.detach(), theirs.weight.detach(), rtol=0, atol=1e-13)
    if "momentum" not in hyper:  # row-wise: rows never looked up never move
        assert torch.equal(ours.weight.detach()[untouched], theirs.weight.detach()[untouched])
    else:
        torch.testing.assert_close(our_opt.state[ours.weight]["momentum_buffer"],
                                   torch_opt.state[theirs.weight]["momentum_buffer"].to_dense(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_sparse_gradient_with_l2_weight_decay_is_refused_naming_it_as_torch_refuses(backend):
    embedding = torch.nn.Embedding(7, 3, sparse=True, dtype=F64)
    dense = torch.randn(3, dtype=F64, requires_grad=True)
    opt = SGD([{"params": [dense]}, {"params": embedding.parameters(), "weight_decay": 0.1}], lr=0.1, momentum=0.9)
    with fastcore5.use_backend(backend):
        dense.grad = torch.randn_like(dense)
        embedding(torch.tensor([1, 2])).sum().backward()
        before = snapshot([dense, embedding.weight], opt)
        with pytest.raises(ValueError, match=r"the \.grad of param 0 of param group 1 is sparse, and weight_decay=0\.1"):
            opt.step()
        assert_unchanged(before, snapshot([dense, embedding.weight], opt), "a refused step")
        opt.param_groups[1]["decoupled_weight_decay"] = True  # the lesson's decay needs no gradient term
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_switching_between_sparse_and_dense_replan_the_step(backend):
    p = torch.randn(6, 3, dtype=F64, requires_grad=True)
    twin = p.detach().clone().requires_grad_()
    ours, theirs = SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([twin], lr=0.1, momentum=0.9)
    with fastcore5.use_backend(backend):
        for sparse in (False, True, True, False, True):
            g = torch.randn(6, 3, dtype=F64)
            g[::2] = 0
            p.grad = g.to_sparse() if sparse else g.clone()
            twin.grad = g.to_sparse() if sparse else g.clone()
            ours.step()
            theirs.step()
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=1e-13)

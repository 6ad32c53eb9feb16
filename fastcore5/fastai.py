"""fastai integration: one line puts a fastai Learner on fastcore5's fused modules and optimizer.

    learn = collab_learner(dls, n_factors=50, y_range=(0, 5.5), opt_func=fastcore5.fastai.SGD)
    fastcore5.fastai.patch_learner(learn)
    learn.fit_one_cycle(5, 5e-3, wd=0.1)

``patch_learner(learn)`` swaps, in place and keeping the very same Parameter objects (so an
optimizer already built, saved weights and weight tying all stay valid):

* every ``fastai.collab.EmbeddingDotBias`` (the model of ``collab_learner``) for
  ``fastcore5.nn.EmbeddingDotBias``, vocabularies (``classes``) included, so ``learn.model.bias``
  and friends keep working;
* every ``nn.Linear`` directly followed by an ``nn.ReLU`` inside an ``nn.Sequential`` (the
  ``LinBnDrop`` layers of ``tabular_learner`` and of ``collab_learner(use_nn=True)``) for
  ``fastcore5.nn.LinearReLU``, the ReLU becoming ``nn.Identity`` so that module indices and
  therefore state_dict keys do not move.

``SGD`` is an ``opt_func`` with the signature of fastai's own ``SGD`` (``lr``, ``mom``, ``wd``,
``decouple_wd``): it wraps ``fastcore5.optim.SGD`` in fastai's ``OptimWrapper``, which maps fastai's
``mom``/``wd`` hyper-parameters onto torch's ``momentum``/``weight_decay`` per param group, so
discriminative learning rates (``slice``), ``freeze``/``unfreeze`` and ``fit_one_cycle``'s
momentum schedule work as with fastai's optimizer. As with every ``OptimWrapper``, fastai's
``wd_bn_bias=False`` (no weight decay on batchnorm and bias params) is not applied: the weight
decay reaches every trained parameter; pass ``wd_bn_bias=True`` for the same maths as fastai's SGD.

fastai is imported here only, never by ``import fastcore5``: ``pip install 'fastcore5[fastai]'``.
"""
from __future__ import annotations

from torch import nn

from . import nn as fc_nn
from . import optim

__all__ = ["SGD", "patch_learner", "patch_model"]


def _fastai():
    try:
        import fastai.collab
        import fastai.optimizer
    except ImportError as err:
        raise ImportError("fastcore5.fastai needs fastai: pip install 'fastcore5[fastai]'") from err
    return fastai


def SGD(params, lr=1e-3, mom: float = 0.0, wd: float = 0.0, decouple_wd: bool = True, **kwargs):
    """fastai ``opt_func``: ``fastcore5.optim.SGD`` inside fastai's ``OptimWrapper``.

    Called as fastai calls its own ``SGD`` (``opt_func(param_groups, lr=...)``; use
    ``functools.partial(SGD, mom=0.9, wd=1e-2)`` for other defaults). ``decouple_wd=True`` (fastai's
    default) is true weight decay ``w -= lr*wd*w``; False adds ``wd*w`` to the gradient (L2).
    ``lr`` may be a slice, spread over the param groups as fastai does. Other keywords go to
    ``fastcore5.optim.SGD`` (``nesterov``, ``dampening``, ...).
    """
    fastai = _fastai()
    spread = isinstance(lr, slice)
    if spread:
        optim.lr_range(lr, 2)  # checks both bounds before anything is built
    wrapper = fastai.optimizer.OptimWrapper(
        params, optim.SGD, lr=lr.stop if spread else lr, momentum=mom, weight_decay=wd,
        decoupled_weight_decay=decouple_wd, **kwargs,
    )
    if spread:
        wrapper.set_hyper("lr", lr)
    return wrapper


def _fused_embedding_dot_bias(old: nn.Module) -> fc_nn.EmbeddingDotBias:
    """fastcore5's module holding ``old``'s own Embedding modules (no copy, no new parameters)."""
    n_users, n_factors = old.u_weight.weight.shape
    n_items = old.i_weight.weight.shape[0]
    # meta: the tables built by the constructor are replaced at once, so never allocate them
    new = fc_nn.EmbeddingDotBias(n_factors, n_users, n_items, y_range=old.y_range, device="meta")
    for name in ("u_weight", "i_weight", "u_bias", "i_bias"):
        setattr(new, name, getattr(old, name))
    for name in ("classes", "user", "item"):
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _fused_linear_relu(linear: nn.Linear) -> fc_nn.LinearReLU:
    new = fc_nn.LinearReLU(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = linear.weight
    if linear.bias is not None:
        new.bias = linear.bias
    new.train(linear.training)
    return new


def patch_model(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """Swap fastai's EmbeddingDotBias and Linear -> ReLU pairs in ``model`` for fastcore5's modules
    (see the module docstring). Returns the model (a new object when ``model`` itself is an
    EmbeddingDotBias) and how many of each were swapped."""
    fastai = _fastai()
    counts = {"EmbeddingDotBias": 0, "LinearReLU": 0}
    # Every replacement is built first and applied only when all were built, so a module that
    # fastcore5 refuses (e.g. a y_range it cannot take) leaves the model as it was.
    edits: list[tuple[nn.Module, str, nn.Module]] = []

    def plan(module: nn.Module) -> nn.Module:
        if isinstance(module, fastai.collab.EmbeddingDotBias):
            counts["EmbeddingDotBias"] += 1
            return _fused_embedding_dot_bias(module)
        for name, child in module.named_children():
            replacement = plan(child)
            if replacement is not child:
                edits.append((module, name, replacement))
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                linear, act = module._modules[first], module._modules[second]
                if type(linear) is nn.Linear and isinstance(act, nn.ReLU):
                    edits.append((module, first, _fused_linear_relu(linear)))
                    edits.append((module, second, nn.Identity()))
                    counts["LinearReLU"] += 1
        return module

    patched = plan(model)
    for parent, name, replacement in edits:
        parent._modules[name] = replacement
    return patched, counts


def patch_learner(learn):
    """Put ``learn.model`` on fastcore5's fused modules, in place; returns ``learn``.

    Raises ValueError when the model has nothing to swap (no fastai EmbeddingDotBias and no
    Linear directly followed by ReLU in an nn.Sequential), so a silent no-op cannot pass for a
    speed-up. Patching twice is therefore an error too.
    """
    model, counts = patch_model(learn.model)
    if not any(counts.values()):
        raise ValueError(
            f"learn.model ({type(learn.model).__name__}) has no fastai EmbeddingDotBias and no nn.Linear "
            "followed by nn.ReLU inside an nn.Sequential: nothing for fastcore5 to swap (already patched?)"
        )
    learn.model = model
    learn.fastcore5_swapped = counts
    return learn


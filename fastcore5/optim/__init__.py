"""fastcore5.optim: SGD — torch.optim.SGD with one fused kernel launch per step — and the lesson's
discriminative learning rates and freezing over layer groups.

``SGD`` is a drop-in for ``torch.optim.SGD``: same signature (plus ``decoupled_weight_decay`` and
``contiguous``), same checks, same update, same param-group keys and the same state
(``{"momentum_buffer"}``), so a ``state_dict`` moves between the two in both directions. It
declares ``_step_supports_amp_scaling`` like torch's fused SGD, so ``torch.amp.GradScaler.step``
hands it ``grad_scale`` and ``found_inf`` as tensors instead of unscaling and syncing itself: the
kernel unscales the gradients and skips the step on the device.

Contiguous mode (``contiguous=True``)
-------------------------------------
At construction each param group's params of one (device, dtype) are moved into one flat buffer
(``p.data`` becomes a view; each view starts 64-byte aligned), their gradients become views of a
second flat buffer and, at the first step with momentum, the momentum buffers views of a third.
Autograd accumulates into an existing ``.grad`` in place, so after ``backward`` the flat gradient
buffer holds every gradient, and a step is one launch over a few large ranges whatever the
number of tensors; ``zero_grad`` is one fill. The per-step host work is constant: whether the
gradients are still the flat views is read from two O(1) facts (see ``flat.FlatBuffers``), and only when
they say something changed are the ``.grad`` tensors looked at one by one. Constraints:

* Build the optimizer after the model has its final device and dtype; moving or casting it
  afterwards (``model.to``, ``model.half``) is detected at the next step and raises.
* Parameters become contiguous (a channels-last parameter loses that layout).
* Call ``optimizer.zero_grad()`` (it zero-fills and ignores ``set_to_none``). Anything that replaces
  ``.grad`` — ``model.zero_grad()`` with set_to_none, ``backward(create_graph=True)``, DDP with
  ``gradient_as_bucket_view=True`` — still gives correct results (the step copies the new gradients
  back into the flat buffer) but loses the speed; a warning says so once.
* Which parameters train is read from ``requires_grad`` at construction, by ``freeze_to`` /
  ``freeze`` / ``unfreeze``, after ``load_state_dict`` and by ``refresh()`` — not every step (that
  would be a pass over every parameter). After toggling ``requires_grad`` yourself, call
  ``optimizer.refresh()``. Parameters with ``requires_grad=False`` are skipped (they play the part
  of ``grad=None``); a trainable parameter that received no gradient this step is stepped with a
  zero gradient (weight decay and momentum still act), as torch does after
  ``zero_grad(set_to_none=False)``.
* A contiguous optimizer that is pickled or deep-copied comes back in normal mode
  (``Optimizer.__getstate__`` keeps only defaults, state and param groups).
* ``step`` without a ``backward`` in between (nothing written into the flat gradients) takes the
  slow path that looks at every ``.grad``: correct, only slower.

Where each part lives (each module one job):

* ``sgd.py``: ``SGD`` itself: construction, ``step``, ``zero_grad``, state dicts and the path
  ``torch.compile`` traces.
* ``hooks.py``: the step's wrapper (torch.optim's pre/post hooks, the profiler label only while
  profiling) and the CUDA-graph capture test.
* ``freezing.py``: the layer-group freezing (``freeze_to``, ``freeze``, ``unfreeze``, ``refresh``),
  a mixin of ``SGD``.
* ``checks.py``: the optimizer's own checks (param groups, contiguous mode's limits, loaded
  state dicts, capturable steps).
* ``contiguous.py``: contiguous mode's steps over the flat buffers (a mixin of ``SGD``).
* ``plan.py``: normal mode's per-group launch plans, the cache that keeps a step's host work to
  C-level passes.
* ``flat.py``: contiguous mode's flat buffers.
* ``distributed.py``: recognising FSDP2's DTensor params and reaching their local shards.
* ``lesson.py``: the lesson's discriminative learning rates (``even_mults``, ``lr_range``,
  ``discriminative_param_groups``).
"""
from .lesson import discriminative_param_groups, even_mults, lr_range
from .sgd import SGD

__all__ = ["SGD", "even_mults", "lr_range", "discriminative_param_groups"]

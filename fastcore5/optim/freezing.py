"""The lesson's freezing of layer groups (fastai's ``freeze_to``, ``freeze``, ``unfreeze``), a mixin of
``fastcore5.optim.SGD`` whose param groups are the layer groups."""
from __future__ import annotations

import warnings

from .._checks import check_int

__all__ = ["LayerGroupFreezing"]


class LayerGroupFreezing:
    """``freeze_to``/``freeze``/``unfreeze`` over an optimizer's param groups, and ``refresh`` for
    contiguous mode (which reads ``requires_grad`` only when told). Needs ``param_groups``,
    ``contiguous`` and ``_flats`` (``fastcore5.optim.SGD``)."""

    def freeze_to(self, n: int) -> None:
        """Treat each param group as a layer group: freeze groups [:n] (requires_grad=False and, in
        normal mode, .grad=None so the step skips them) and unfreeze groups [n:]. Negative n counts
        from the end, as in fastai: freeze_to(-1) leaves only the last group trainable."""
        count = len(self.param_groups)
        n = check_int("n", n, -count, count)
        frozen = n if n >= 0 else count + n
        if frozen >= count:
            warnings.warn(f"freezing {frozen} groups of {count}: the whole model is frozen", stacklevel=2)
        for i, group in enumerate(self.param_groups):
            train = i >= frozen
            for p in group["params"]:
                p.requires_grad_(train)
                if not train and not self.contiguous:
                    p.grad = None
        self.refresh()

    def refresh(self) -> None:
        """Contiguous mode: re-read which params are trainable (requires_grad). The step reads it at
        construction, after freeze_to/freeze/unfreeze and after load_state_dict, not every step (that
        would cost a pass over all params); call this after toggling requires_grad yourself.
        Normal mode: nothing to do (params whose .grad is None are skipped at every step)."""
        for flats in self._flats.values():
            for flat in flats:
                flat.refresh_trainable()

    def freeze(self) -> None:
        """Train only the last param group (fastai's ``freeze``: the head of a pretrained model)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every param group."""
        self.freeze_to(0)

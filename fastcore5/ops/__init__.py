"""The differentiable torch ops: one file per op, each a torch.library.custom_op for the forward
and the backward (with fake implementations, so they trace under torch.compile) plus the public
function that validates arguments and picks the backend (fastcore5.backends)."""

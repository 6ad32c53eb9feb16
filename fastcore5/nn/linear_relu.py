from torch import Tensor, nn

from ..ops.linear_relu import linear_relu


class LinearReLU(nn.Linear):
    """nn.Linear followed by ReLU, computed by one fused kernel.

    A subclass of nn.Linear: same constructor, initialisation, parameters and state_dict keys,
    so weights move between ``nn.Linear`` (+ ``nn.ReLU``) and this module unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        return linear_relu(input, self.weight, self.bias)

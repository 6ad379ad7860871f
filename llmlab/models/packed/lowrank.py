"""Low-rank layers: a factored linear y = U(Vx), and LoRC's quantized layer plus a low-rank correction.

The decompositions that produce them (SVD, ASVD, SVD-LLM, LoRC) live in llmlab.compress.lowrank; this
file is the stored format, so that any verb loads a decomposed folder without the method's code.
"""

from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """y = u(v(x)): W ≈ U·V with V (rank, in) and U (out, rank); the bias stays on `u`."""
    kind = "lowrank"  # its entry in io.py's list of swapped modules

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def config(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, rank: int) -> "LowRankLinear":
        return cls(in_features, out_features, rank, bias, device="meta")  # the folder's factors are assigned

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))


class LoRCLinear(nn.Module):
    """y = Ŵx + U(Vx): a quantized layer plus the low-rank part of its quantization error."""
    kind = "lorc"  # its entry in io.py's list of swapped modules, before `<name>.base_layer`

    def __init__(self, base_layer: nn.Module, rank: int, device=None, dtype=None):
        super().__init__()
        self.base_layer, self.rank = base_layer, rank
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.v = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    def config(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, rank: int) -> "LoRCLinear":
        # A stand-in of the base layer's shape, on meta so no float weight is made: the entry
        # `<name>.base_layer` swaps in the quantized one, and the folder's u/v are assigned.
        return cls(nn.Linear(in_features, out_features, bias=bias, device="meta"), rank, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.u(self.v(x.to(self.v.weight.dtype))).to(x.dtype)

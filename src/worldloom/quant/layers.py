"""The linear layers of a quantised model, and the one swap that puts them in place of ``nn.Linear``.

- ``BitLinear`` (training, BitNet b1.58): an ``nn.Linear`` whose forward uses the absmean-ternary
  weight and 8-bit per-token activations, with straight-through gradients (the quantisers count as
  the identity in the backward: ``x + (q(x) - x).detach()``). Its parameter stays the full-precision
  latent weight, so a base run's weights load into it and AdamW trains it.
- ``Int8Linear`` (inference): weight-only int8, per-output-channel scales; ``y = x Wqᵀ · s`` by
  ``torch._weight_int8pack_mm`` (float activations, int8 weights converted inside the kernel).
- ``TernaryLinear`` (inference): the ternary weight unpacked once at load to int8 {-1, 0, 1}; each
  call quantises the activations per token to 8 bits as BitLinear does, then either
  ``torch._weight_int8pack_mm`` on the integer-valued activations (kernel ``int8pack``, default) or
  ``torch._int_mm`` (int8 x int8 -> int32, kernel ``int_mm``); both are exact integer sums, scaled after.

Kernel ``fbgemm`` (both layers; ``quant.kernel=fbgemm``): PyTorch's dynamic quantised linear
(``torch.ops.quantized.linear_dynamic`` on a weight prepacked once at load by
``linear_prepack``, FBGEMM): the activations are quantised per call to 8 bits (one scale per call,
a 7-bit range so that no CPU without VNNI overflows) and multiplied as int8 × int8. Not exact:
W8A8 where ``int8pack`` is weight-only for int8 layers, and per-call rather than BitNet's
per-token activation scales for ternary ones (the same at batch 1). It is the fast one at batch 1:
``_weight_int8pack_mm`` was measured 2× slower than the fp32 GEMV it replaces (BENCHMARKS.md).

The activations reach ``torch._weight_int8pack_mm`` in fp32 whatever the autocast: in torch 2.13 its
CPU kernel crashes (segfault) on bf16 inputs for many shapes (e.g. K = 8, N = 3), and it is only
exact for fp32. The output is cast back to the input's dtype.

No inference path builds a float weight per call. ``weight`` on the inference layers is the
dequantised matrix, for code that reads a Linear's weight outside the forward (Mamba reads its
dtype when it allocates a state); the forward never calls it.

Which layers: every ``nn.Linear`` inside ``model.backbone`` (attention qkv/proj, SwiGLU and expert
gate_up/down, SSM and retention projections, MoE routers included). The embedding, the output head
(tied to the embedding by default; an untied head too), norms and the world-model parts outside the
backbone stay full precision, as BitNet keeps its embedding and output layer.
"""

from __future__ import annotations

from typing import Callable

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .pack import absmax_int8, absmax_tokens, absmean_ternary, pack_ternary, unpack_ternary

KERNELS = ("int8pack", "int_mm", "fbgemm")  # TernaryLinear's integer matmul (Int8Linear: int8pack or fbgemm)
QUANT_KERNELS = ("exact", "fbgemm")  # quant.kernel: exact = each layer's exact kernel (int8pack)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward, the identity's gradient in the backward (straight-through estimator)."""
    return x + (q - x).detach()


def fake_ternary(w: torch.Tensor) -> torch.Tensor:
    """w's absmean-ternary value q · γ (same dtype as w)."""
    q, scale = absmean_ternary(w.detach())
    return (q.float() * scale).to(w.dtype)


def fake_tokens(x: torch.Tensor) -> torch.Tensor:
    """x's 8-bit per-token value (computed in fp32, returned in x's dtype)."""
    q, scale = absmax_tokens(x.detach().float())
    return (q * scale).to(x.dtype)


class BitLinear(nn.Linear):
    """nn.Linear trained through ternary weights and 8-bit activations (BitNet b1.58 QAT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ste(x, fake_tokens(x)), ste(self.weight, fake_ternary(self.weight)), self.bias)


class _QuantLinear(nn.Module):
    """What the inference layers share: an int8 weight (N, K) for the kernel, its scales, an optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)  # a buffer: nothing here trains
        self.packed = None  # kernel fbgemm: the prepacked weight (derived at load, never stored)

    def _prepack(self, scale: torch.Tensor) -> None:
        """FBGEMM's packed form of the int8 ``weight_q`` with ``scale`` (one per output channel) and the bias."""
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensors deprecated; the kernel is the fast one here
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(self.weight_q, scale.double().expand(self.out_features).contiguous(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.float())

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(self._flat(x).float(), self.packed, True)  # (M, N), bias included
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.in_features).contiguous()  # (..., K) -> (M, K): the kernels take matrices

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)  # (M, N) -> (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """Weight-only int8: ``weight_q`` int8 (N, K) and ``weight_scale`` fp32 (N,), both stored."""

    bits = 8.0

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kernel: str = "int8pack"):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.set_kernel(module.kernel) and None)
        self.set_kernel(kernel)

    @classmethod
    def from_linear(cls, lin: nn.Linear, kernel: str = "int8pack") -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None)
        m.weight_q, m.weight_scale = absmax_int8(lin.weight)
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m.set_kernel(kernel)

    def set_kernel(self, kernel: str) -> "Int8Linear":
        if kernel not in ("int8pack", "fbgemm"):
            raise ValueError(f"kernel must be int8pack or fbgemm, got {kernel!r}")
        self.kernel, self.packed = kernel, None
        if kernel == "fbgemm":
            self._prepack(self.weight_scale)
        return self

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self._dynamic(x)
        y = torch._weight_int8pack_mm(self._flat(x).float(), self.weight_q, self.weight_scale.float())  # (M, N)
        return self._out(y.to(x.dtype), x)


class TernaryLinear(_QuantLinear):
    """Ternary weights: stored as ``weight_packed`` uint8 (N, ceil(K / 4)) and ``weight_scale`` fp32 (1,);
    ``weight_q`` int8 {-1, 0, 1} (N, K) is unpacked from them at load (not stored)."""

    bits = 1.58

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kernel: str = "int8pack"):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_packed", torch.full((out_features, -(-in_features // 4)), 0x55, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1))
        for name in ("weight_q", "weight_qt", "ones"):  # derived at load, never stored
            self.register_buffer(name, None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.unpack() and None)
        self.set_kernel(kernel)

    @classmethod
    def from_linear(cls, lin: nn.Linear, kernel: str = "int8pack") -> "TernaryLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, kernel)
        q, scale = absmean_ternary(lin.weight.detach())
        m.weight_packed, m.weight_scale = pack_ternary(q), scale.reshape(1)
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m.unpack()

    def set_kernel(self, kernel: str) -> "TernaryLinear":
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        return self.unpack()

    def unpack(self) -> "TernaryLinear":
        """weight_q (N, K) int8 from weight_packed (once, after a load) and what the kernel reads."""
        self.weight_q = unpack_ternary(self.weight_packed, self.in_features)
        self.weight_qt = self.weight_q.t().contiguous() if self.kernel == "int_mm" else None  # (K, N) for _int_mm
        self.ones = torch.ones(self.out_features, device=self.weight_q.device)  # int8pack's per-channel scale: 1
        self.packed = None
        if self.kernel == "fbgemm":
            self._prepack(self.weight_scale)  # one scale for the layer, given to every channel
        return self

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self._dynamic(x)
        x2 = self._flat(x).float()
        xq, xs = absmax_tokens(x2)  # (M, K) integer-valued, (M, 1)
        if self.kernel == "int_mm" and self.in_features > 1:  # torch 2.13's CPU _int_mm is wrong for K = 1
            acc = torch._int_mm(xq.to(torch.int8), self.weight_qt).float()  # (M, N) exact int32 sums
        else:
            acc = torch._weight_int8pack_mm(xq, self.weight_q, self.ones.float())  # (M, N) exact in fp32 for K < 2**17
        return self._out((acc * (xs * self.weight_scale)).to(x.dtype), x)


def backbone_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(dotted name from the model, layer) of every nn.Linear (BitLinear included) in model.backbone."""
    return [(f"backbone.{name}", m) for name, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace every backbone nn.Linear by ``make(linear)``; returns the names replaced."""
    names = []
    for name, lin in backbone_linears(model):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, make(lin))
        names.append(name)
    return names


def to_bitlinear(lin: nn.Linear) -> BitLinear:
    """A BitLinear holding the same parameters (they stay the same tensors)."""
    m = BitLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    m.weight, m.bias = lin.weight, lin.bias
    return m


def layer_kernel(kernel: str) -> str:
    """quant.kernel -> the layers' kernel name ("exact" is each layer's exact default, int8pack)."""
    if kernel not in QUANT_KERNELS:
        raise ValueError(f"quant.kernel must be one of {', '.join(QUANT_KERNELS)}, got {kernel!r}")
    return "int8pack" if kernel == "exact" else kernel


def shell(bits: float, kernel: str = "exact") -> Callable[[nn.Linear], nn.Module]:
    """An empty inference layer of a Linear's shape, for loading stored quantised weights into (``kernel``:
    quant.kernel; the layer prepacks for it once the weights are loaded)."""
    cls = Int8Linear if bits == Int8Linear.bits else TernaryLinear
    return lambda lin: cls(lin.in_features, lin.out_features, lin.bias is not None, layer_kernel(kernel))


def quantiser(bits: float) -> Callable[[nn.Linear], nn.Module]:
    """Linear (or BitLinear's latent weight) -> its quantised inference layer."""
    return Int8Linear.from_linear if bits == Int8Linear.bits else TernaryLinear.from_linear

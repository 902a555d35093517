"""Quantised runs (issue 14): weight-only int8 (no training) and ternary BitNet b1.58 (QAT).

    worldloom quantize runs/big --bits 8 name=big-int8
    worldloom quantize runs/big --bits 1.58 name=big-ternary train.max_steps=2000

- ``pack``: the quantisers (per-channel absmax int8, absmean ternary, per-token 8-bit activations)
  and the 2-bit packing of ternary weights;
- ``layers``: ``BitLinear`` (training, straight-through), ``Int8Linear`` and ``TernaryLinear``
  (inference through int8 matmul kernels), ``swap_linears`` (the backbone's nn.Linear layers replaced);
- ``folder``: the quantised run folder (config ``quant.bits``, packed weights in safetensors),
  `quantize`, packing a finished QAT run, what `load_run` calls, and the refusals (a quantised run
  is never trained further in full precision).
"""

from .folder import INT8, TERNARY, pack_run, parse_bits, prepare_loaded, quantize, refuse_packed, refuse_quantised, start_qat
from .layers import BitLinear, Int8Linear, TernaryLinear, backbone_linears, swap_linears

__all__ = ["INT8", "TERNARY", "BitLinear", "Int8Linear", "TernaryLinear", "backbone_linears", "pack_run", "parse_bits",
           "prepare_loaded", "quantize", "refuse_packed", "refuse_quantised", "start_qat", "swap_linears"]

"""How a GPU launch specialises a Triton kernel's arguments, for the sm_90 compile tests
(tests/ops/test_triton_sm90_compile.py and test_triton_sm90_configs.py run it in a subprocess
with the interpreter off): ints equal to 1 become constexprs unless marked
``do_not_specialize``, tensors become 16-byte-aligned pointers."""

from __future__ import annotations

import torch

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


def specialise(fn, values: dict) -> tuple[dict, dict, dict]:
    """``(signature, constants, attrs)`` for ``triton.compiler.ASTSource`` from the argument
    ``values`` (name -> value) of a JITFunction ``fn``."""
    signature, constants, attrs = {}, {}, {}
    for i, (param, arg) in enumerate(zip(fn.params, fn.arg_names, strict=True)):
        value = values[arg]
        if param.is_constexpr or (type(value) is int and value == 1
                                  and not param.do_not_specialize):  # fmt: skip
            signature[arg], constants[arg] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[arg] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32" if abs(value) < 2**31 else "i64"
    return signature, constants, attrs

"""Weight gradients added straight into DDP's fp32 gradient buffer (``main_grad``).

Under Megatron's DDP each weight carries an fp32 ``main_grad``. Without gradient-accumulation
fusion a linear layer's backward makes its weight gradient as a separate tensor in the weight's
dtype, which DDP's hook then adds to ``main_grad`` (on an H200, a fixed ~5.5 ms per
micro-batch of the 1B model: docs/performance.md, 2026-11-28 GPU). With
``TransformerConfig.gradient_accumulation_fusion`` Megatron-Core's linear layers instead call

    fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input [n, k], grad_output [n, m],
                                                          main_grad [m, k])  # += grad^T input

from Apex's CUDA extension, and hand autograd a placeholder (``grad_added_to_main_grad``).
Apex is not on every machine (never on a CPU; pip's ``apex`` is another package), so
:func:`install` gives Megatron-Core this module's functions under that name when the extension
is absent: one GEMM per weight that accumulates in fp32 (:func:`add_product_`: a bf16 GEMM with
fp32 output on a GPU, an fp32 GEMM elsewhere). Where Apex's extension is installed it is used.
"""

from __future__ import annotations

import sys
import types

import torch

_SHIM = "fused_weight_gradient_mlp_cuda"
_out_dtype_gemm = True  # until this PyTorch turns out not to have it


def add_product_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``accumulator += a @ b`` with ``accumulator`` fp32 and ``a``, ``b`` in any float dtype.

    bf16/fp16 inputs on a GPU run one tensor-core GEMM that accumulates and writes in fp32
    (``torch.addmm(..., out_dtype=torch.float32)``, PyTorch >= 2.9, CUDA): the products of
    half-precision values are exact in fp32, so this equals the fp32 GEMM of the upcast inputs
    up to summation order, at bf16 speed (an H200: 0.95 ms against 10.9 ms for
    [128k x 1k] @ [1k x 2k]). Elsewhere the inputs are upcast and added with an fp32 GEMM.
    """
    global _out_dtype_gemm
    if _out_dtype_gemm and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) \
            and a.dtype == b.dtype:
        try:
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # PyTorch < 2.9, or a GPU/dtype without it
            _out_dtype_gemm = False
    accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """main_grad [m, k] fp32 += grad_output [n, m]^T @ total_input [n, k]."""
    add_product_(main_grad, grad_output.t(), total_input)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """The same into a half-precision ``main_grad`` (DDP without fp32 gradient buffers)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


def install() -> None:
    """Let Megatron-Core's linear layers take ``gradient_accumulation_fusion=True`` here: this
    module's functions under Apex's extension name, unless the extension itself is importable
    (idempotent)."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:  # Apex's extension, or already installed
        return
    shim = types.ModuleType(_SHIM, __doc__)
    shim.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    shim.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    sys.modules.setdefault(_SHIM, shim)  # megatron.core.utils imports it inside a function
    layers.fused_weight_gradient_mlp_cuda = sys.modules[_SHIM]
    layers._grad_accum_fusion_available = True

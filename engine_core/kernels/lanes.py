"""Eight float32 lanes (one AVX register) as a value numba kernels can hold, for loops that LLVM's
auto-vectorizer does not keep in registers: the attention's weighted sum of values keeps a tile of
its running sums in registers across a block's tokens (see attention._weigh_lanes), where the
vectorized loop loaded and stored them for every token. Plus a prefetch hint.

    f32x8                the numba type; its LLVM type is <8 x float>
    vload(a, i)          a.flat[i : i + 8] as lanes (a C-contiguous; float32, or the 16-bit
                         cache types as attention.kernel_view gives them, widened like to_f32)
    vstore(a, i, v)      a.flat[i : i + 8] = v (a C-contiguous float32)
    vfma(a, b, c)        a * b + c, one rounding (llvm.fma)
    vbcast(x)            a float32 in every lane
    prefetch_l2(a, i)    ask for the cache line of a.flat[i] into L2 (llvm.prefetch; a hint)

No bounds are checked: callers index within their arrays.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from engine_core.kernels._numba import widen_16bit

_V = ir.VectorType(ir.FloatType(), 8)
_I32 = ir.IntType(32)


class F32x8(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V)


def _flat_array(a) -> bool:
    return isinstance(a, types.Array) and a.layout == "C"


def _address(context, builder, sig, args):
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    return builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])


@intrinsic
def vload(typingctx, a, i):
    if not (_flat_array(a) and isinstance(i, types.Integer) and a.dtype in (types.float32, types.uint16, types.int16)):
        return None
    dtype = a.dtype

    def codegen(context, builder, sig, args):
        ptr = _address(context, builder, sig, args)
        if dtype == types.float32:
            return builder.load(builder.bitcast(ptr, _V.as_pointer()), align=4)
        bits = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), 8).as_pointer()), align=2)
        return widen_16bit(builder, bits, dtype)  # float16: one vcvtph2ps with F16C
    return f32x8(a, i), codegen


@intrinsic
def vstore(typingctx, a, i, v):
    if not (_flat_array(a) and a.dtype == types.float32 and isinstance(i, types.Integer) and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], builder.bitcast(_address(context, builder, sig, args), _V.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    if not (a == f32x8 and b == f32x8 and c == f32x8):
        return None

    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V] * 3), "llvm.fma.v8f32")
        return builder.call(fma, args)
    return f32x8(a, b, c), codegen


@intrinsic
def vbcast(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(_V, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(_V, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return f32x8(x), codegen


@intrinsic
def prefetch_l2(typingctx, a, i):
    if not (_flat_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        byte_ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, _I32, _I32, _I32]), "llvm.prefetch.p0i8")
        # read; locality 2 (prefetcht1: L2 and out); data cache
        builder.call(fn, [builder.bitcast(_address(context, builder, sig, args), byte_ptr), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen

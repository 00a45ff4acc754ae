"""Intel AMX (Advanced Matrix Extensions) reached from Numba through LLVM: the tile instructions the
bf16 GEMM's fastest version uses (npdiff/kernels/matmul_amx.py).

AMX adds 8 tile registers tmm0..tmm7 of up to 16 rows x 64 bytes, and one instruction that
multiplies whole tiles:

  tdpbf16ps c, a, b    c [16 x 16 float32] += a [16 rows x 32 bf16] @ b [16 rows of 16 pairs]:
                       in each row i and column j, c[i, j] += sum over 16 pairs p of
                       a[i, 2p] * b[p, 2j] + a[i, 2p+1] * b[p, 2j+1]: vdpbf16ps's pairs of k
                       (b is laid out as matmul_bf16.py packs B: one 32-bit word per pair and column),
                       16 x 16 x 32 = 8192 multiply-adds in one instruction (vdpbf16ps: 32).
  tileloadd t, [base + row * stride]   rows of a tile from memory, any row stride
  tilestored [base + row * stride], t  a tile back to memory
  tilezero t, ldtilecfg [config], tilerelease   zero a tile; set the tiles' shapes; release them

The tiles' shapes come from a 64-byte configuration (ldtilecfg): palette 1, then bytes per row of
each tile (16-bit each, from byte 16) and rows of each tile (8-bit each, from byte 48). The shapes
belong to the thread (the OS saves the tiles with the thread's state), so each thread loads the
configuration before its first tile instruction (tile_config) and releases it when done.

Linux hands out AMX only to a process that asks: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
once (request_amx_permission); a tile instruction without it kills the process with SIGILL, so
matmul_amx.py checks amx_usable() first.

The LLVM intrinsics used (immediate tile numbers, as clang's _tile_* macros): llvm.x86.ldtilecfg,
llvm.x86.tilerelease, llvm.x86.tilezero, llvm.x86.tileloadd64, llvm.x86.tilestored64,
llvm.x86.tdpbf16ps. Tile numbers must be integer constants in the calling code.
"""

import ctypes
import functools
import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64 Linux

I8 = ir.IntType(8)
I64 = ir.IntType(64)
BYTE_POINTER = I8.as_pointer()

_permission = None


def request_amx_permission():
    """Ask Linux for the AMX tile state (once per process) -> True when granted."""
    global _permission
    if _permission is None:
        _permission = False
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _permission = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
            except (OSError, AttributeError):
                _permission = False
    return _permission


@functools.cache
def _host_has(feature):
    """LLVM's host CPU features (asked once per feature: the call takes a while)."""
    import llvmlite.binding as llvm  # local: only llvmlite, which numba has loaded already

    return bool(llvm.get_host_cpu_features().get(feature))


def numba_may_use(*features):
    """The host CPU has these LLVM features (e.g. "avx512bf16") and Numba compiles for them: a
    NUMBA_CPU_FEATURES without one of them, or a NUMBA_CPU_NAME chosen without features (npdiff/jit.py
    sets both together), rules them out. Compiling an instruction LLVM may not use would fail."""
    if not all(_host_has(feature) for feature in features):
        return False
    chosen = os.environ.get("NUMBA_CPU_FEATURES", "")
    if chosen:
        return {"+" + feature for feature in features} <= set(chosen.split(","))
    return os.environ.get("NUMBA_CPU_NAME", "host") == "host"


def cpu_has_amx_bf16():
    """The CPU has AMX tiles with bf16 and Numba may use them."""
    return numba_may_use("amx-tile", "amx-bf16")


def amx_usable():
    """AMX bf16 can run here: the CPU has it, Numba may emit it, and Linux granted the tile state."""
    return cpu_has_amx_bf16() and request_amx_permission()


def _call(builder, name, argument_types, arguments):
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argument_types), name)
    builder.call(function, arguments)


def _byte_pointer(context, builder, array_type, array, element_offset):
    """The address of array's element number `element_offset` (of its flat data), as i8*."""
    data = context.make_array(array_type)(context, builder, array).data
    offset = builder.sext(element_offset, I64) if element_offset.type.width < 64 else element_offset
    return builder.bitcast(builder.gep(data, [offset]), BYTE_POINTER)


def _tile_number(tile):
    return isinstance(tile, types.IntegerLiteral) and 0 <= tile.literal_value < 8


@intrinsic(prefer_literal=True)
def tile_config(typingctx, config):
    """ldtilecfg: the tiles' shapes from config (a uint8 array of 64 bytes, see the header)."""
    if not (isinstance(config, types.Array) and config.dtype == types.uint8):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], ir.Constant(I64, 0))
        _call(builder, "llvm.x86.ldtilecfg", [BYTE_POINTER], [pointer])
        return context.get_dummy_value()

    return types.void(config), codegen


@intrinsic
def tile_release(typingctx):
    """tilerelease: the tiles back to their initial state (the thread stops saving them)."""

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic(prefer_literal=True)
def tile_zero(typingctx, tile):
    """tilezero: tile `tile` (a constant 0..7) = 0."""
    if not _tile_number(tile):
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", [I8], [I8(sig.args[0].literal_value)])
        return context.get_dummy_value()

    return types.void(tile), codegen


def _tile_memory(name):
    """tile_load / tile_store: (tile, array, element offset, row stride in bytes)."""

    def typer(typingctx, tile, array, offset, stride):
        if not (_tile_number(tile) and isinstance(array, types.Array) and array.layout == "C"
                and isinstance(offset, types.Integer) and isinstance(stride, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            pointer = _byte_pointer(context, builder, sig.args[1], args[1], args[2])
            row_stride = builder.sext(args[3], I64) if args[3].type.width < 64 else args[3]
            _call(builder, name, [I8, BYTE_POINTER, I64], [I8(sig.args[0].literal_value), pointer, row_stride])
            return context.get_dummy_value()

        return types.void(tile, array, offset, stride), codegen

    typer.__name__ = name.replace("llvm.x86.", "tile_")
    return typer


tile_load = intrinsic(prefer_literal=True)(_tile_memory("llvm.x86.tileloadd64"))
tile_load.__doc__ = "tileloadd: tile <- rows of array from flat element `offset`, `stride` bytes apart."
tile_store = intrinsic(prefer_literal=True)(_tile_memory("llvm.x86.tilestored64"))
tile_store.__doc__ = "tilestored: rows of array from flat element `offset`, `stride` bytes apart <- tile."


@intrinsic(prefer_literal=True)
def tile_dpbf16ps(typingctx, c, a, b):
    """tdpbf16ps: tile c += tile a @ tile b, in pairs of bf16 (see the header); constants 0..7."""
    if not (_tile_number(c) and _tile_number(a) and _tile_number(b)):
        return None

    def codegen(context, builder, sig, args):
        tiles = [I8(t.literal_value) for t in sig.args]
        _call(builder, "llvm.x86.tdpbf16ps", [I8, I8, I8], tiles)
        return context.get_dummy_value()

    return types.void(c, a, b), codegen

"""GGUF block formats -> integer codes and per-group scales, and the tiled layout the kernels read.

A quantized weight [N, K] (N output rows, K inputs) is stored with its file's precision but not
its file's byte order: each format's blocks are unpacked once at load into integer codes (4-bit
codes two to a byte, wider codes one to a byte) and the scales they are multiplied by, and laid
out in tiles of `TILE_ROWS` output rows with the rows innermost (`[tile, k, row]`). The kernels'
inner loops then run over 64 rows that share one input value, which the compiler vectorizes;
over a GGUF block's own 32 weights they would not (measured 8x slower).

Every format is the same formula, w[n, k] = scale[n, g] * code[n, k] + offset[n, g] for the group
g of k, with the scale of a group either stored (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or, for the
K-quants, a super-block scale times a small integer per group: scale = d[n, s] * sc[n, g],
offset = dmin[n, s] * mn[n, g] (s = g // groups_per_super). Keeping that product unevaluated
keeps K-quants at their size (Q4_K: 4.75 bits a weight here vs 4.5 in the file) and exact.

The scales stay float16, as the file stores them (their bits as uint16; the kernels widen them in
registers, _numba.to_f32): every scale and offset here is a file's float16 value or one times -8
or -1, exact in float16 (a weight whose values would not be keeps float32 scales). Sizes held
here, in bits per weight (the file's in brackets): Q4_0 5 [4.5], Q4_1 5 [5], Q8_0 8.5 [8.5],
Q5_0 8.5 [5.5], Q5_1 9 [6], Q4_K 4.63 [4.5], Q5_K 8.63 [5.5], Q6_K 8.56 [6.6]: the 5- and 6-bit
codes take a whole byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Output rows per tile: the kernels' vector loops run over them. 64 is as fast as 128 or 256 in
# the Q4_1 kernel and wastes nothing on SmolLM2's 192-row K/V projections.
TILE_ROWS = 64

# GGML type number -> (name, weights per block, bytes per block); see GGML_QUANT_SIZES in gguf.
BLOCK_FORMATS = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
PLAIN_FORMATS = {0: "F32", 1: "F16", 30: "BF16"}
# 16-bit float weights kept as they are stored (pack_half); F32 ones stay numpy arrays for BLAS
HALF_FORMATS = ("F16", "BF16")


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight at its stored precision, tiled for the kernels (see the module doc).

    codes: nibble formats uint8 [tiles, cols // 2, TILE_ROWS], byte k of a group of 32 holding
           weights k (low nibble) and k + 16 (high); byte formats int8 [tiles, cols, TILE_ROWS].
    d:     [tiles, supers, TILE_ROWS] float16 bits (uint16), or float32: the scale (of a group,
           or of a super-block)
    sc:    [tiles, groups, TILE_ROWS] small ints, or None: the group's multiplier of d
    dmin:  like d, or None: the offset (or its super-block factor)
    mn:    [tiles, groups, TILE_ROWS] small ints, or None: the group's multiplier of dmin
    """

    qtype: str
    rows: int
    cols: int
    nibbles: bool
    group_size: int
    groups_per_super: int
    codes: np.ndarray
    d: np.ndarray
    sc: np.ndarray | None
    dmin: np.ndarray | None
    mn: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        arrays = (self.codes, self.d, self.sc, self.dmin, self.mn)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def tiles(self) -> int:
        return self.codes.shape[0]


# ---------------------------------------------------------------------------- unpacking


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles first, then the high ones."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit planes: [..., bytes] -> [..., count] of 0/1 (bit i of the whole)."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[..., :count]


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of a Q4_K/Q5_K block -> eight 6-bit scales and eight 6-bit mins."""
    lo, hi = s[..., 0:4], s[..., 4:8]
    mix = s[..., 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def unpack(qtype: str, raw: np.ndarray, cols: int) -> dict:
    """raw uint8 [rows, bytes per row] in the GGUF layout -> codes [rows, cols] and the scale
    arrays per row (see QuantizedWeight; here still [rows, groups])."""
    rows = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[qtype]
        b = raw.reshape(rows, cols // 32, size)
        d = _f16(b[..., 0:2])
        out = {"group_size": 32, "groups_per_super": 1, "d": d, "sc": None, "dmin": None, "mn": None}
        if qtype == "Q4_0":
            return out | {"nibbles": True, "codes": _nibbles(b[..., 2:]), "dmin": d * np.float32(-8)}
        if qtype == "Q4_1":
            return out | {"nibbles": True, "codes": _nibbles(b[..., 4:]), "dmin": _f16(b[..., 2:4])}
        if qtype == "Q8_0":
            return out | {"nibbles": False, "codes": b[..., 2:].view(np.int8)}
        base = 6 if qtype == "Q5_0" else 8
        high = _bits(b[..., base - 4 : base], 32) << 4
        codes = (_nibbles(b[..., base:]) | high).astype(np.int8)
        if qtype == "Q5_0":
            return out | {"nibbles": False, "codes": codes - np.int8(16)}
        return out | {"nibbles": False, "codes": codes, "dmin": _f16(b[..., 2:4])}
    if qtype in ("Q4_K", "Q5_K"):
        size = 144 if qtype == "Q4_K" else 176
        b = raw.reshape(rows, cols // 256, size)
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., size - 128 :].reshape(rows, cols // 256, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, cols // 256, 8, 32)
        if qtype == "Q5_K":
            high = _bits(b[..., 16:48].reshape(rows, cols // 256, 32, 1), 8)  # [.., l, sub]
            codes = (codes | (high.transpose(0, 1, 3, 2) << 4)).astype(np.int8)
        return {
            "nibbles": qtype == "Q4_K", "group_size": 32, "groups_per_super": 8, "codes": codes,
            "d": _f16(b[..., 0:2]), "sc": sc.reshape(rows, -1),
            "dmin": -_f16(b[..., 2:4]), "mn": mn.reshape(rows, -1),
        }
    if qtype == "Q6_K":
        b = raw.reshape(rows, cols // 256, 210)
        ql = b[..., 0:128].reshape(rows, -1, 2, 64)
        low = np.concatenate([ql & 15, ql >> 4], axis=-1)  # [.., half, 128]
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # [.., half, 4, 32]
        codes = (low | (high.reshape(rows, -1, 2, 128) << 4)).astype(np.int8) - np.int8(32)
        return {
            "nibbles": False, "group_size": 16, "groups_per_super": 16, "codes": codes,
            "d": _f16(b[..., 208:210]), "sc": b[..., 192:208].view(np.int8).reshape(rows, -1),
            "dmin": None, "mn": None,
        }
    raise ValueError(f"{qtype} is not a supported block format")


def _tile(a: np.ndarray, rows_padded: int) -> np.ndarray:
    """[rows, X] -> [tiles, X, TILE_ROWS] with rows past the end zero."""
    rows, width = a.shape
    padded = np.zeros((rows_padded, width), dtype=a.dtype)
    padded[:rows] = a
    return np.ascontiguousarray(padded.reshape(-1, TILE_ROWS, width).transpose(0, 2, 1))


def _half_if_exact(scales: np.ndarray) -> np.ndarray:
    """float32 scales as float16 bits (uint16) when every value survives the round trip (they
    came from float16 in the file), else as they are."""
    half = scales.astype(np.float16)
    if np.array_equal(half.astype(np.float32), scales, equal_nan=True):
        return half.view(np.uint16)
    return scales


def pack(qtype: str, parts: dict, rows: int, cols: int) -> QuantizedWeight:
    """Unpacked codes and scales (see unpack) -> the tiled QuantizedWeight."""
    padded = -(-rows // TILE_ROWS) * TILE_ROWS
    codes = parts["codes"].reshape(rows, cols)
    if parts["nibbles"]:
        g = codes.reshape(rows, cols // 32, 2, 16)
        codes = (g[:, :, 0] | (g[:, :, 1] << 4)).astype(np.uint8).reshape(rows, cols // 2)

    def tiled(name):
        a = parts[name]
        if a is None:
            return None
        if name in ("d", "dmin"):
            a = _half_if_exact(a)
        return _tile(np.ascontiguousarray(a).reshape(rows, -1), padded)

    return QuantizedWeight(
        qtype=qtype, rows=rows, cols=cols, nibbles=parts["nibbles"], group_size=parts["group_size"],
        groups_per_super=parts["groups_per_super"], codes=_tile(codes, padded),
        d=tiled("d"), sc=tiled("sc"), dmin=tiled("dmin"), mn=tiled("mn"),
    )


def pack_half(qtype: str, bits: np.ndarray) -> QuantizedWeight:
    """A [rows, cols] F16 or BF16 weight given as its uint16 bits -> tiled, at 16 bits a weight
    (codes [tiles, cols, TILE_ROWS] of the bits, no scales; the kernels widen them)."""
    if qtype not in HALF_FORMATS:
        raise ValueError(f"{qtype} is not a 16-bit float format")
    rows, cols = bits.shape
    padded = -(-rows // TILE_ROWS) * TILE_ROWS
    return QuantizedWeight(
        qtype=qtype, rows=rows, cols=cols, nibbles=False, group_size=cols, groups_per_super=1,
        codes=_tile(np.ascontiguousarray(bits, dtype=np.uint16), padded), d=None, sc=None, dmin=None, mn=None,
    )


def permute_rows(parts: dict, order: np.ndarray) -> dict:
    """The same weight with its rows reordered (codes and every per-row scale array)."""
    return {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in parts.items()}


def concat_rows(parts_list: list[dict]) -> dict:
    """Unpacked weights of one format stacked along the rows (a fused QKV or gate/up)."""
    first = parts_list[0]
    out = dict(first)
    for k, v in first.items():
        if isinstance(v, np.ndarray):
            out[k] = np.concatenate([p[k].reshape(p[k].shape[0], -1) for p in parts_list])
    return out


def _same_dtypes(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Whether the scale arrays of two weights of a format have the same types (float16 bits or
    float32), so that they stack."""
    return all(getattr(a, k) is None or getattr(a, k).dtype == getattr(b, k).dtype for k in ("d", "dmin"))


def fuse(weights: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """Consecutive weights over the same inputs stacked into one where the tiles allow it (same
    format, every part but the last a whole number of tiles): a fused QKV or gate/up projection.
    A Q4_K_M file's Q6_K V projection next to Q4_K Q/K stays apart."""
    out: list[QuantizedWeight] = []
    for w in weights:
        last = out[-1] if out else None
        if (last is not None and last.qtype == w.qtype and last.cols == w.cols
                and last.rows % TILE_ROWS == 0 and _same_dtypes(last, w)):
            def cat(a, b):
                return None if a is None else np.concatenate([a, b])

            out[-1] = QuantizedWeight(
                qtype=w.qtype, rows=last.rows + w.rows, cols=w.cols, nibbles=w.nibbles,
                group_size=w.group_size, groups_per_super=w.groups_per_super,
                codes=cat(last.codes, w.codes), d=cat(last.d, w.d), sc=cat(last.sc, w.sc),
                dmin=cat(last.dmin, w.dmin), mn=cat(last.mn, w.mn),
            )
        else:
            out.append(w)
    return out

"""LyCORIS LoHa, LoKr and LoCon's Tucker form: the update each fuses into a layer's weight, by webui's (and
LyCORIS's) rules.

A kohya-named LyCORIS file (npdiff/lora_keys.py) stores, for each layer it changes, instead of LoRA's
down and up (weight [out,in] for a linear layer, [out,in,k,k] for a convolution):

  LoHa, the Hadamard (elementwise) product of two low-rank products, rank r:
      hada_w1_a [out,r]  hada_w1_b [r,in*k*k]  hada_w2_a [out,r]  hada_w2_b [r,in*k*k]
      update = (w1_a @ w1_b) * (w2_a @ w2_b)                          [out,in*k*k] -> the weight's shape
      A convolution may store each factor in Tucker form: hada_t1 [r,r,k,k] with hada_w1_a [r,out] and
      hada_w1_b [r,in] give  w1[o,c,:,:] = sum_ij t1[i,j,:,:] * w1_a[i,o] * w1_b[j,c]  (the same for t2).
      dim = hada_w1_b.shape[0]
  LoKr, a Kronecker product:
      w1 = lokr_w1 [o1,i1]                 or  lokr_w1_a [o1,r] @ lokr_w1_b [r,i1]
      w2 = lokr_w2 [o2,i2] or [o2,i2,k,k]  or  lokr_w2_a [o2,r] @ lokr_w2_b [r,i2*k*k]
                                           or  Tucker: lokr_t2 [r,r,k,k], lokr_w2_a [r,o2], lokr_w2_b [r,i2]
      update = kron(w1, w2)       (w1 as [o1,i1,1,1] when w2 has 4 axes)  -> the weight's shape
      dim = lokr_w2_b.shape[0] when w2 is decomposed, else lokr_w1_b.shape[0] when w1 is, else none
  LoCon in Tucker form, a LoRA of a convolution with a middle part:
      lora_up.weight [out,r1(,1,1)]  lora_mid.weight [r1,r2,k,k]  lora_down.weight [r2,in(,1,1)]
      update[o,c,:,:] = sum_ij mid[i,j,:,:] * up[o,i] * down[j,c]      -> [out,in,k,k]
      dim = lora_down.weight.shape[0]
All: W' = W + scale * multiplier * update, where multiplier = alpha / dim when the file holds an alpha
and the layer has a dim, else 1 (webui's NetworkModule.calc_scale; LyCORIS trains with the same
factor, and sets alpha = dim for a LoKr that decomposes nothing). Every shape is checked here, from
the file's header, before any tensor is read (plan_update); update() then only computes.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.lora_keys import LOHA_PARTS, LOKR_PARTS, shape_text


def kind_of(path, component, name, parts):
    """"lora", "locon_tucker", "loha" or "lokr" from the parts a layer's keys hold; NpdiffError for a mixture."""
    kinds = set()
    for part in parts:
        if part in LOHA_PARTS:
            kinds.add("loha")
        elif part in LOKR_PARTS:
            kinds.add("lokr")
        elif part != "alpha":
            kinds.add("lora")
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "only an alpha"
        raise NpdiffError(f"{path}: the {component} layer {name!r} has keys of {found}; expected the parts of "
                          "one kind (LoRA lora_down/lora_up(/lora_mid), LoHa hada_*, or LoKr lokr_*)")
    kind = kinds.pop()
    return "locon_tucker" if kind == "lora" and "mid" in parts else kind


def _product_shape(a, b):
    """Shape of a.reshape(a[0], -1) @ b.reshape(b[0], -1), or None when the inner sizes differ."""
    inner = math.prod(a[1:])
    if inner != b[0]:
        return None
    return (a[0], math.prod(b[1:]))


def _tucker_shape(t, a, b):
    """Shape of the Tucker rebuild of t [r1,r2,k,k], a [r1,out], b [r2,in] -> [out,in,k,k], or None."""
    if len(t) != 4 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
        return None
    return (a[1], b[1], t[2], t[3])


def _factor_shape(shapes, a, b, t=None):
    """The shape of one rebuilt factor (a @ b, or Tucker t with a and b), or None when they do not fit."""
    if t is not None and t in shapes:
        return _tucker_shape(shapes[t], shapes[a], shapes[b])
    return _product_shape(shapes[a], shapes[b])


def _fits(update_shape, weight_shape):
    """An update fits a weight when it has the same rows and, flattened per row, as many numbers."""
    if update_shape is None or update_shape[0] != weight_shape[0]:
        return False
    if len(update_shape) == 4 and len(weight_shape) == 4:
        return tuple(update_shape) == tuple(weight_shape)
    return math.prod(update_shape[1:]) == math.prod(weight_shape[1:])


def _require(path, entry, present, needed, why):
    missing = [part for part in needed if part not in present]
    if missing:
        some_key = next(iter(entry.keys.values()))
        raise NpdiffError(f"{path}: the {entry.component} layer {entry.name!r} (key {some_key!r}) has no "
                          f"{', '.join(missing)}: {why}")


def _loha_shape(path, entry, shapes):
    """-> (update shape or None, dim) for LoHa; NpdiffError for missing parts."""
    _require(path, entry, shapes, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
             "a LoHa layer needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    first = _factor_shape(shapes, "hada_w1_a", "hada_w1_b", "hada_t1")
    second = _factor_shape(shapes, "hada_w2_a", "hada_w2_b", "hada_t2")
    dim = shapes["hada_w1_b"][0]
    if first is None or second is None or math.prod(first) != math.prod(second) or first[0] != second[0]:
        return None, dim
    return first, dim


def _lokr_shape(path, entry, shapes):
    """-> (update shape or None, dim or None) for LoKr; NpdiffError for missing or doubled parts."""
    dim = None
    if "lokr_w1" in shapes:
        w1 = shapes["lokr_w1"]
        if "lokr_w1_a" in shapes or "lokr_w1_b" in shapes:
            raise NpdiffError(f"{path}: the {entry.component} layer {entry.name!r} has lokr_w1 and lokr_w1_a/_b; "
                              "expected one of them")
    else:
        _require(path, entry, shapes, ("lokr_w1_a", "lokr_w1_b"), "a LoKr layer needs lokr_w1 or lokr_w1_a and _b")
        w1 = _product_shape(shapes["lokr_w1_a"], shapes["lokr_w1_b"])
        dim = shapes["lokr_w1_b"][0]
    if "lokr_w2" in shapes:
        w2 = shapes["lokr_w2"]
        if any(part in shapes for part in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise NpdiffError(f"{path}: the {entry.component} layer {entry.name!r} has lokr_w2 and "
                              "lokr_w2_a/_b/lokr_t2; expected one of them")
    else:
        _require(path, entry, shapes, ("lokr_w2_a", "lokr_w2_b"), "a LoKr layer needs lokr_w2 or lokr_w2_a and _b")
        w2 = _factor_shape(shapes, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        dim = shapes["lokr_w2_b"][0]
    if w1 is None or w2 is None or len(w1) != 2 or len(w2) not in (2, 4):
        return None, dim
    rows, columns = w1[0] * w2[0], w1[1] * w2[1]
    return (rows, columns, *w2[2:]), dim


def plan_update(path, entry, shapes, alpha):
    """Check a LoHa/LoKr layer's parts and shapes against its weight -> the multiplier (alpha/dim or 1).

    shapes: {part: shape} from the file's header; alpha: the file's alpha for the layer, or None."""
    weight_shape = tuple(entry.layer.weight.shape)  # [out,in] (a 1x1 conv's too) or [out,in,k,k]
    for part, shape in shapes.items():
        if len(shape) < 2 or 0 in shape:
            raise NpdiffError(f"{path}: LoRA key {entry.keys[part]!r} has shape {shape_text(shape)}; expected a "
                              "matrix (2 or 4 axes, none empty)")
    if entry.kind == "locon_tucker":
        _require(path, entry, shapes, ("up", "mid", "down"), "a LoCon layer in Tucker form needs lora_up, lora_mid "
                 "and lora_down")
        up, down = shapes["up"], shapes["down"]
        update_shape = _tucker_shape(shapes["mid"], (math.prod(up[1:]), up[0]), (down[0], math.prod(down[1:])))
        dim = down[0]
    elif entry.kind == "loha":
        update_shape, dim = _loha_shape(path, entry, shapes)
    else:
        update_shape, dim = _lokr_shape(path, entry, shapes)
    if not _fits(update_shape, weight_shape):
        listed = ", ".join(f"{entry.keys[part]!r} {shape_text(shape)}" for part, shape in shapes.items())
        raise NpdiffError(f"{path}: the {entry.kind} keys {listed} do not make an update of the {entry.component} "
                          f"layer {entry.name!r}, whose weight is {shape_text(weight_shape)}: a file for "
                          "another model?")
    if dim is not None and dim < 1:
        raise NpdiffError(f"{path}: the {entry.component} layer {entry.name!r} has rank {dim}; expected >= 1")
    if alpha is None or dim is None:
        return 1.0
    return alpha / dim


def _product(a, b):
    """a @ b with both read as matrices: [n,r(,...)] @ [r,m(,...)] -> [n,prod(m...)]."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def _tucker(t, a, b):
    """t [r1,r2,k,k], a [r1,out], b [r2,in] -> [out,in,k,k] (LyCORIS's make_weight_cp)."""
    inner = np.einsum("ijkl,jc->ickl", t, b)      # [r1,r2,k,k] x [r2,in] -> [r1,in,k,k]
    return np.einsum("ickl,io->ockl", inner, a)   # [r1,in,k,k] x [r1,out] -> [out,in,k,k]


def _factor(tensors, a, b, t=None):
    if t is not None and t in tensors:
        return _tucker(tensors[t], tensors[a], tensors[b])
    return _product(tensors[a], tensors[b])


def update(entry, tensors):
    """The layer's update (before scale and multiplier), float32 in its weight's shape.

    tensors: {part: float32 array} for every part the file holds for the layer (plan_update passed)."""
    weight_shape = tuple(entry.layer.weight.shape)
    if entry.kind == "locon_tucker":
        up, down = tensors["up"], tensors["down"]
        up = up.reshape(up.shape[0], -1).T                                 # [out,r1(,1,1)] -> [r1,out]
        return _tucker(tensors["mid"], up, down.reshape(down.shape[0], -1)).reshape(weight_shape)  # [out,in,k,k]
    if entry.kind == "loha":
        first = _factor(tensors, "hada_w1_a", "hada_w1_b", "hada_t1")     # [out,in*k*k] or [out,in,k,k]
        second = _factor(tensors, "hada_w2_a", "hada_w2_b", "hada_t2")
        # 1. the Hadamard product, both factors in the weight's shape
        return first.reshape(weight_shape) * second.reshape(weight_shape)
    # 2. LoKr: each half whole or rebuilt, then their Kronecker product
    if "lokr_w1" in tensors:
        w1 = tensors["lokr_w1"]                                          # [o1,i1]
    else:
        w1 = _product(tensors["lokr_w1_a"], tensors["lokr_w1_b"])         # [o1,r] @ [r,i1] -> [o1,i1]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]                                          # [o2,i2] or [o2,i2,k,k]
    else:
        w2 = _factor(tensors, "lokr_w2_a", "lokr_w2_b", "lokr_t2")       # [o2,i2*k*k] or [o2,i2,k,k]
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)                                 # [o1,i1] -> [o1,i1,1,1]
    return np.kron(w1, w2).reshape(weight_shape)                         # [o1*o2,i1*i2(*k*k)(,k,k)]

"""CUDA conv2d (NCHW, torch's weight layout): an im2col kernel feeding cuBLAS GEMMs.

How it differs from the NumPy-API reference (npdiff/kernels/conv.py conv2d_ref): the reference
pads the whole input once and then makes one strided window copy and one GEMM per tap (kH*kW small
GEMMs, kH*kW temporaries). Here:
  * 1x1, stride 1, no padding: one GEMM, W [C_out, C_in] @ x [B, C_in, H*W] (no copy at all);
  * otherwise im2col_rows unfolds output rows [row0, row1) of images [image0, image1) into
    cols [images, K = C_in*kH*kW, rows*W_out] (padding handled in the copy: no padded input), and
    one GEMM per image, W [C_out, K] @ cols[i] [K, rows*W_out], writes those output rows. Tiles
    (im2col_tiles) keep cols under IM2COL_BUDGET_BYTES: a whole-image im2col of a VAE layer at
    512x512 (K = 128*9, 262144 columns) is 1.2 GB in float32.

Thread layout of im2col_rows: one thread per element of cols, grid-stride; consecutive threads
write consecutive columns (output pixels of one row: coalesced stores) and read input pixels
`stride` apart in one input row (coalesced for stride 1). Every element is written, zeros included,
so cols needs no clearing.
"""

from npdiff.kernels.cuda.runtime import (
    THREADS,
    as_dtype,
    grid_for,
    i32,
    i64,
    import_cupy,
    kernel,
)
from npdiff.kernels.validate import output_size

IM2COL_BUDGET_BYTES = 256 << 20  # unfolded input of one tile

SOURCE = r"""
extern "C" __global__ void im2col_rows(const scalar_t* x, scalar_t* cols, long long images, int channels,
                                       int height, int width, int kernel_h, int kernel_w, int stride_h,
                                       int stride_w, int pad_h, int pad_w, int row0, int rows, int w_out) {
    const long long columns = (long long)rows * w_out;                    // rows*W_out per image
    const long long depth = (long long)channels * kernel_h * kernel_w;    // K
    const long long total = images * depth * columns;
    for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < total;
         index += (long long)blockDim.x * gridDim.x) {
        // index = (image * K + k) * columns + column, k = (c * kH + i) * kW + j, column = r * W_out + col
        const long long column = index % columns;
        const long long k = (index / columns) % depth;
        const long long image = index / (columns * depth);
        const int col = (int)(column % w_out), r = (int)(column / w_out);
        const int j = (int)(k % kernel_w), i = (int)((k / kernel_w) % kernel_h);
        const long long c = k / ((long long)kernel_w * kernel_h);
        const int y = (row0 + r) * stride_h + i - pad_h;                  // input row of this tap
        const int x_in = col * stride_w + j - pad_w;                      // input column
        float value = 0.0f;
        if (y >= 0 && y < height && x_in >= 0 && x_in < width) {
            value = load(x, ((image * channels + c) * height + y) * width + x_in);
        }
        store(cols, index, value);                                        // exact for float and half
    }
}
"""


def im2col_tiles(batch, h_out, bytes_per_row, budget=IM2COL_BUDGET_BYTES):
    """[(image0, image1, row0, row1), ...]: whole images per tile while one image's cols
    (h_out * bytes_per_row) fit in `budget`; otherwise ranges of output rows of one image.
    Every (image, output row) is in exactly one tile."""
    per_image = h_out * bytes_per_row
    if per_image <= budget:
        images = max(1, budget // max(1, per_image))
        return [(b, min(batch, b + images), 0, h_out) for b in range(0, batch, images)]
    rows = max(1, budget // max(1, bytes_per_row))
    return [(b, b + 1, r, min(h_out, r + rows)) for b in range(batch) for r in range(0, h_out, rows)]


def conv2d(x, weight, bias, stride, padding, budget=IM2COL_BUDGET_BYTES):
    """x [B,C_in,H,W], weight [C_out,C_in,kH,kW], bias [C_out] or None (cupy); stride, padding: (h, w)
    pairs already checked. Computes in weight's dtype."""
    cupy = import_cupy()
    (sh, sw), (ph, pw) = stride, padding
    x = cupy.ascontiguousarray(as_dtype(x, weight.dtype))  # [B,C_in,H,W]
    bias = as_dtype(bias, weight.dtype)
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    weight = cupy.ascontiguousarray(weight)
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        out = cupy.matmul(weight.reshape(c_out, c_in), x.reshape(batch, c_in, height * width))  # -> [B,C_out,H*W]
        out = out.reshape(batch, c_out, height, width)
    else:
        out = cupy.empty((batch, c_out, h_out, w_out), dtype=weight.dtype)  # [B,C_out,Ho,Wo]
        depth = c_in * kh * kw
        weight_2d = weight.reshape(c_out, depth)  # [C_out, K]
        unfold = kernel("conv", SOURCE, weight.dtype.name, "im2col_rows")
        for image0, image1, row0, row1 in im2col_tiles(batch, h_out, depth * w_out * weight.dtype.itemsize, budget):
            images, rows = image1 - image0, row1 - row0
            cols = cupy.empty((images, depth, rows * w_out), dtype=weight.dtype)  # [n,K,rows*Wo]
            unfold((grid_for(cols.size),), (THREADS,),
                   (x[image0:image1], cols, i64(images), i32(c_in), i32(height), i32(width), i32(kh), i32(kw),
                    i32(sh), i32(sw), i32(ph), i32(pw), i32(row0), i32(rows), i32(w_out)))
            for i in range(images):
                product = cupy.matmul(weight_2d, cols[i])  # [C_out,K] @ [K,rows*Wo]
                out[image0 + i, :, row0:row1, :] = product.reshape(c_out, rows, w_out)
            del cols
    if bias is not None:
        out += bias[:, None, None]  # [B,C_out,Ho,Wo] + [C_out,1,1]
    return out


def linear(x, weight, bias):
    """x [..., in] @ weight[out, in]^T + bias by cuBLAS (weight^T read through the transpose flag),
    in weight's dtype."""
    cupy = import_cupy()
    x = as_dtype(x, weight.dtype)
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    out = cupy.matmul(rows, weight.T)  # [R, in] @ [in, out] -> [R, out]
    if bias is not None:
        out += as_dtype(bias, weight.dtype)  # [R, out]
    return out.reshape(x.shape[:-1] + (weight.shape[0],))  # [R, out] -> [..., out]

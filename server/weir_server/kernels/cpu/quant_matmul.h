// The quantized matmuls' entry points (quant_matmul.cpp), bound in decode_ops.cpp's module.
#pragma once
#include <torch/extension.h>

// q uint8 [N, K] (values 0..15), scales and zeros [N, K / 32]: W = (q - 8) * scale + zero -> the kernel's layout.
torch::Tensor int4_pack(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros);

// x [T, K] times the packed W [N, K] transposed -> [T, N] in x's dtype. `portable` takes the scalar path (the
// tests check it gives the vector path's bits); `silu_and_mul` treats W as [gate; up] and returns
// silu(gate) * up [T, N / 2].
torch::Tensor int4_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable = false,
                                bool silu_and_mul = false);

// q int8 [N, K], scales [N, K / 32] (or [N, K / 16], Q6_K's) and offsets [N, K / 32]: W = q * scale - offset ->
// int8_packed_matmul's layout.
torch::Tensor int8_pack(const torch::Tensor& q, const torch::Tensor& scales, const c10::optional<torch::Tensor>& offsets);

// u [N, K] in 0..31 with a scale and an offset per group of 32 (W = u * scale - offset) in the 5-bit layout, which
// int8_packed_matmul reads too.
torch::Tensor int5_pack(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& offsets);

// x [T, K] times the packed int8 W [N, K] transposed -> [T, N] in x's dtype. `portable` and `silu_and_mul` as above.
torch::Tensor int8_packed_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable = false,
                                 bool silu_and_mul = false);

// The weights [N, K] of either packed format in `dtype`: steps of many rows multiply tiles of these instead.
torch::Tensor packed_dequantize(const torch::Tensor& packed, at::ScalarType dtype);

// Either packed format (int4_pack's or int8_pack's, told apart by their block bytes): a decode layer's projection.
torch::Tensor packed_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool silu_and_mul = false);

// x [T, K] times int8 rows q [N, K] in their plain layout, W = q * scales - offsets per group of any size (scales,
// offsets [N, K / group]) -> fp32 [T, N], the weights exact in fp32.
torch::Tensor int8_group_matmul(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                                const c10::optional<torch::Tensor>& offsets);

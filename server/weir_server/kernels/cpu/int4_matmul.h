// The 4-bit matmul's entry points (int4_matmul.cpp), bound in decode_ops.cpp's module.
#pragma once
#include <torch/extension.h>

// q uint8 [N, K] (values 0..15), scales and zeros [N, K / 32]: W = (q - 8) * scale + zero -> the kernel's layout.
torch::Tensor int4_pack(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros);

// x [T, K] times the packed W [N, K] transposed -> [T, N] in x's dtype. `portable` takes the scalar path (the
// tests check it gives the vector path's bits).
torch::Tensor int4_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable = false);

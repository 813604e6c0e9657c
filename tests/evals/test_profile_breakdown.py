"""lm.bench.profile_breakdown: kernels land in the category their name says, totals and shares add up."""

import pytest

from lm.bench.profile_breakdown import breakdown, breakdown_markdown, categorize, is_annotation


@pytest.mark.parametrize("name, category", [
    ("_bwd_dq_kernel", "VQ attention (fused kernels)"),
    ("_fwd_kernel", "VQ attention (fused kernels)"),
    ("_bwd_cache_kernel", "VQ attention (fused kernels)"),
    ("_bwd_chunk_rev_kernel", "EMA (scan kernels or FFT)"),
    ("void regular_fft_factor<unsigned int, float, 64>", "EMA (scan kernels or FFT)"),
    ("_quantize_kernel", "quantizer"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "softmax attention"),
    ("void at::native::cunn_SoftMaxBackward<4, float>", "loss (softmax / cross-entropy)"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copies and fills"),
    ("triton_poi_fused_add_mul_silu_view_3", "element-wise, compiled (inductor)"),
    ("void multi_tensor_apply_kernel<AdamFunctor>", "optimizer and communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>", "element-wise and reductions, eager"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_map_to_their_category(name, category):
    assert categorize(name) == category


def test_breakdown_sums_per_category_largest_first():
    rows = breakdown([("_bwd_dq_kernel", 3000.0), ("_fwd_kernel", 1000.0), ("nvjet_x", 2000.0), ("mystery", 500.0)])
    assert [(c, round(ms, 3)) for c, ms, _ in rows] == [
        ("VQ attention (fused kernels)", 4.0), ("GEMM", 2.0), ("other", 0.5)]
    assert sum(share for *_, share in rows) == pytest.approx(1.0)
    table = breakdown_markdown(rows)
    assert "| VQ attention (fused kernels) | 4.0 | 61.5% |" in table and "| total device time | 6.5 | |" in table


def test_timeline_annotations_are_not_kernels():
    assert is_annotation("## Call CompiledFxGraph fxyz ##") and not is_annotation("_fwd_kernel")

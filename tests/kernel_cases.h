// Inputs and oracles shared by the two kernel tests: tests/test_kernels.cpp (GoogleTest) and
// tests/arm/test_arm_kernels.cpp (standalone, for qemu-aarch64 and wine). Plain C++17 over the
// public API of moe_infer.h; what one tensor type needs is written here once.
//
// Tolerance. Every kernel computes the integer block sums exactly, so SIMD and scalar differ only
// in the order of their float operations. With u = 2^-24 (float's unit roundoff) and
// M = Σ |w_i|·|x_i| (plus the offset terms, which are summed separately), a float sum of T terms
// carries at most about T·u·M of rounding, so
//     |simd - scalar| <= (2·T + 16)·u·M,
// where T is the number of float terms the scalar kernel adds (float_terms) and 16 covers the
// per-term roundings (scale products, int->float conversion, horizontal sums). The bound is
// rigorous, not tuned; a dropped or doubled block moves the result by about M/T, far outside it.
#ifndef MOE_TESTS_KERNEL_CASES_H
#define MOE_TESTS_KERNEL_CASES_H

// Include moe_infer.h first (the two tests include it differently).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace kernel_cases {

using TT = moe::TensorType;

constexpr double kUnitRoundoff = 1.0 / (1 << 24);  // float: 2^-24
constexpr int kPerTermSlack = 16;                  // scale products, conversions, final reductions

const TT kTypes[] = {TT::f32,    TT::f16,    TT::bf16,  TT::q8_0,   TT::q4_0,   TT::q4_1,    TT::q5_0,  TT::q5_1,  TT::q1_0,
                     TT::q2_0,   TT::iq4_nl, TT::iq4_xs, TT::iq3_s, TT::iq3_xxs, TT::iq2_s,  TT::iq2_xs, TT::iq2_xxs, TT::iq1_m,
                     TT::iq1_s,  TT::tq1_0,  TT::tq2_0, TT::q2_k,   TT::q3_k,   TT::q4_k,    TT::q5_k,  TT::q6_k,
                     TT::mxfp4,  TT::nvfp4,  TT::tq3,   TT::tq4,    TT::affine3_g32, TT::affine3_g64, TT::affine3_g128,
                     TT::affine4_g32, TT::affine4_g64, TT::affine4_g128};
const moe::Isa kSimdIsas[] = {moe::Isa::avx2, moe::Isa::avx512, moe::Isa::avx512_vnni, moe::Isa::neon, moe::Isa::neon_dotprod};

inline bool is_float_type(TT t) { return t == TT::f32 || t == TT::f16 || t == TT::bf16; }
// Types whose activations are Q8_K (256-element blocks): K-quants, IQ and ternary types.
inline bool uses_q8k(TT t) { return !is_float_type(t) && moe::tensor_type_block_elems(t) == 256; }
inline bool is_iq1(TT t) { return t == TT::iq1_s || t == TT::iq1_m; }
inline bool is_ternary(TT t) { return t == TT::tq1_0 || t == TT::tq2_0; }
// MLX affine (scale + bias per group of 32/64/128, Q8_1 activations).
inline bool is_affine_mlx(TT t) {
    return t == TT::affine3_g32 || t == TT::affine3_g64 || t == TT::affine3_g128 || t == TT::affine4_g32 || t == TT::affine4_g64 ||
           t == TT::affine4_g128;
}
// TQ3/TQ4: the kernels see the activation rotated per 128 (R = D2 H D1 / sqrt(128)).
inline bool is_tq(TT t) { return t == TT::tq3 || t == TT::tq4; }
// Types whose kernels add an offset term per element (Q4_1/Q5_1's m, the K-quants' mins, the
// ternary types' -1 taken out as d * Σ y): it enters the round-off magnitude.
inline bool has_mins(TT t) {
    return is_ternary(t) || is_affine_mlx(t) || t == TT::q4_1 || t == TT::q5_1 || t == TT::q2_k || t == TT::q4_k || t == TT::q5_k;
}
// Q4_1/Q5_1 and MLX affine: the offset (m, bias) per block with Q8_1 activations (their stored sum s).
inline bool has_offset(TT t) { return t == TT::q4_1 || t == TT::q5_1 || is_affine_mlx(t); }
// Elements per activation block.
inline int act_block(TT t) { return is_float_type(t) ? 1 : uses_q8k(t) ? 256 : 32; }

inline float half_to_float(uint16_t h) {
    float f = 0;
    moe::dequantize_row(TT::f16, &h, &f, 1);
    return f;
}
inline uint16_t float_to_half(float f) {
    uint16_t h = 0;
    moe::quantize_row(TT::f16, &f, &h, 1);
    return h;
}

// Byte offsets of the fp16 scale fields in one block (ggml-common.h): d (-1 for IQ1_M, whose d is
// spread over the top nibbles of its four scale words, see set_block_d) and dmin (-1 if none).
inline void scale_offsets(TT t, int* d, int* dmin) {
    *d = t == TT::q6_k ? 208 : t == TT::q3_k ? 108 : t == TT::q2_k ? 80 : t == TT::tq2_0 ? 64 : t == TT::tq1_0 ? 52 : t == TT::iq1_m ? -1 : 0;
    *dmin = !has_mins(t) || is_ternary(t) ? -1 : t == TT::q2_k ? 82 : 2;
}
inline void set_block_d(TT t, uint8_t* blk, uint16_t d) {
    int d_off, dmin_off;
    scale_offsets(t, &d_off, &dmin_off);
    if (d_off >= 0) {
        std::memcpy(blk + d_off, &d, 2);
        return;
    }
    for (int i = 0; i < 4; ++i) {  // IQ1_M: nibble i of d in the top nibble of scale word i (@48)
        uint16_t sc;
        std::memcpy(&sc, blk + 48 + 2 * i, 2);
        sc = (uint16_t)((sc & 0x0fff) | (((d >> (4 * i)) & 15) << 12));
        std::memcpy(blk + 48 + 2 * i, &sc, 2);
    }
}

// The offset term of each element of one block: Q4_1/Q5_1's m (32 elements), dmin * m for the 256
// elements of a Q2_K/Q4_K/Q5_K block (mins packed as in QUANT FORMATS), the ternary types' d.
inline void k_quant_mins(TT t, const uint8_t* blk, double* out) {
    uint16_t h;
    std::memcpy(&h, blk + (t == TT::q2_k ? 82 : t == TT::tq1_0 ? 52 : t == TT::tq2_0 ? 64 : 2), 2);
    const double dmin = half_to_float(h);
    if (is_ternary(t)) {
        for (int i = 0; i < 256; ++i) out[i] = dmin;
        return;
    }
    if (has_offset(t)) {
        for (int i = 0; i < moe::tensor_type_block_elems(t); ++i) out[i] = dmin;
        return;
    }
    for (int i = 0; i < 256; ++i) {  // Q2_K: a 4-bit min per 16 (scales[i] >> 4); Q4_K/Q5_K: 6-bit per 32
        const uint8_t* s = blk + 4;
        const int j = i / 32;
        const int m = t == TT::q2_k ? blk[i / 16] >> 4 : j < 4 ? (s[j + 4] & 63) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        out[i] = dmin * m;
    }
}

enum class WeightKind { gaussian, all_ones_bits, all_zero_bits, random_bytes, extreme_scales, count };
const char* const kWeightKindNames[] = {"gaussian", "all-0xFF", "all-0x00", "random-bytes", "extreme-scales"};

// One weight row of n elements as stored bytes (empty if quantize_row failed). Raw kinds write
// block bytes directly (any bit pattern is a valid block once its fp16 scales are finite) and then
// set the scales. Types without a quantizer (the IQ grid types) get random blocks with d = 1/64 for
// "gaussian".
inline std::vector<uint8_t> make_weights(TT t, int64_t n, WeightKind kind, std::mt19937& rng) {
    const int be = moe::tensor_type_block_elems(t), bb = moe::tensor_type_block_bytes(t);
    const int64_t nblocks = n / be;
    std::vector<uint8_t> w((size_t)(nblocks * bb));
    std::normal_distribution<float> gauss(0.f, 1.f);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<float> f((size_t)n);
    for (auto& v : f) v = gauss(rng);
    const bool quantizable = moe::quantize_row(t, f.data(), w.data(), n) == moe::Status::ok;
    if (is_float_type(t) || (kind == WeightKind::gaussian && quantizable)) {
        for (int64_t i = 0; is_float_type(t) && i < n; ++i) {
            float& v = f[(size_t)i];
            switch (kind) {
                case WeightKind::all_ones_bits: v = (i % 2 ? -1.f : 1.f) * 60000.f; break;
                case WeightKind::all_zero_bits: v = 0.f; break;
                case WeightKind::random_bytes: v *= 1e-5f; break;  // f16 subnormals
                case WeightKind::extreme_scales: v *= i % 3 ? 1e-3f : 1e3f; break;
                default: break;
            }
        }
        if (moe::quantize_row(t, f.data(), w.data(), n) != moe::Status::ok) return {};
        return w;
    }
    int d_off, dmin_off;
    scale_offsets(t, &d_off, &dmin_off);
    for (int64_t b = 0; b < nblocks; ++b) {
        uint8_t* blk = w.data() + b * bb;
        uint16_t d = float_to_half(1.f), dmin = float_to_half(0.5f);
        switch (kind) {
            case WeightKind::gaussian:  // no quantizer
                for (int i = 0; i < bb; ++i) blk[i] = (uint8_t)byte(rng);
                d = float_to_half(1.f / 64);
                break;
            case WeightKind::all_ones_bits: std::memset(blk, 0xFF, (size_t)bb); break;  // max codes, scales, signs
            case WeightKind::all_zero_bits:
                std::memset(blk, 0x00, (size_t)bb);                          // Q4_0 q - 8 = -8, Q6_K q - 32 = -32
                if (t == TT::q6_k) std::memset(blk + 192, 0x80, 16);         // scales -128
                if (has_mins(t) && !is_ternary(t)) std::memset(blk + 4, 0xFF, 12);  // scales and mins 63
                break;
            case WeightKind::random_bytes:
                for (int i = 0; i < bb; ++i) blk[i] = (uint8_t)byte(rng);
                d = float_to_half((byte(rng) & 1 ? -1.f : 1.f) * std::ldexp(1.f, byte(rng) % 20 - 14));
                dmin = float_to_half(std::ldexp(1.f, byte(rng) % 20 - 14));
                break;
            case WeightKind::extreme_scales:
                for (int i = 0; i < bb; ++i) blk[i] = (uint8_t)byte(rng);
                if (t == TT::q8_0)
                    for (int i = 2; i < bb; ++i) blk[i] = 0x80;  // q = -128, the one value with |q| = 128
                d = b % 2 ? float_to_half(65504.f) : (uint16_t)0x0001;  // largest normal, smallest subnormal
                dmin = b % 2 ? (uint16_t)0x0001 : float_to_half(65504.f);
                break;
            default: break;
        }
        if (t == TT::mxfp4) {  // E8M0 byte: keep 2^(e-128) * 12 * 127 * n finite in float
            blk[0] = kind == WeightKind::extreme_scales ? (b % 2 ? 200 : 1) : kind == WeightKind::gaussian ? 122 : (uint8_t)(100 + blk[0] % 50);
            continue;
        }
        if (t == TT::nvfp4) continue;  // any UE4M3 byte decodes to at most 240
        set_block_d(t, blk, d);
        if (dmin_off >= 0) std::memcpy(blk + dmin_off, &dmin, 2);
    }
    return w;
}

enum class ActKind { gaussian, zeros, spikes, saturating, huge, ties, sign_tie, count };
const char* const kActKindNames[] = {"gaussian", "zeros", "spikes", "saturating", "huge", "ties", "sign-tie"};

inline std::vector<float> make_activations(int64_t n, ActKind kind, std::mt19937& rng) {
    std::vector<float> x((size_t)n);
    std::normal_distribution<float> gauss(0.f, 1.f);
    for (int64_t i = 0; i < n; ++i) {
        float v = gauss(rng);
        switch (kind) {
            case ActKind::gaussian: break;
            case ActKind::zeros: v = 0.f; break;
            case ActKind::spikes: v = i % 37 == 3 ? (i % 2 ? -1e4f : 1e4f) : v * 1e-3f; break;
            case ActKind::saturating: v = i % 3 ? 2.5f : -2.5f; break;  // every quant is +-127
            case ActKind::huge: v *= 1e6f; break;
            // Every block holds 127 and values k + 0.5: with scale 127/amax = 1 each is an exact tie.
            case ActKind::ties: v = i % 32 == 5 ? 127.f : (float)((int)(v * 20) % 120) + 0.5f; break;
            // Largest |x| appears as -A first, then as +A (next element, and further on): Q8_K
            // must take the first one's sign.
            case ActKind::sign_tie: v = i % 64 == 9 ? -3.f : i % 64 == 10 || i % 64 == 40 ? 3.f : v * 0.25f; break;
            default: break;
        }
        x[(size_t)i] = v;
    }
    return x;
}

// The activation row as the scalar quantizer makes it, dequantized (layouts: Q8_0 = fp16 d + 32
// int8; Q8_1 (Q4_1/Q5_1) = f32 s, fp16 d, 32 int8, 2 pad; Q8_K = f32 d + 256 int8 + 16 int16
// bsums). `sums`: Q8_1's stored s per block. False if quantize_activations failed.
inline bool dequantized_activations(TT t, const std::vector<float>& x, int64_t n, std::vector<double>* out, std::vector<double>* sums) {
    out->assign((size_t)n, 0.0);
    if (is_float_type(t)) {
        for (int64_t i = 0; i < n; ++i) (*out)[(size_t)i] = x[(size_t)i];
        return true;
    }
    std::vector<uint8_t> q((size_t)n * 3 + 64);
    if (moe::quantize_activations(t, moe::Isa::scalar, x.data(), n, q.data(), q.size()) != moe::Status::ok) return false;
    const int ab = act_block(t), bytes = ab == 32 ? (has_offset(t) ? 40 : 34) : 292;
    if (is_tq(t)) {  // per 128: 128 int8, then float d[32] (chunk k's scale at 8k), then their sum
        for (int64_t g = 0; g < n / 128; ++g) {
            const uint8_t* blk = q.data() + g * 260;
            for (int i = 0; i < 128; ++i) {
                float d;
                std::memcpy(&d, blk + 128 + 4 * (8 * (i / 32)), 4);
                (*out)[(size_t)(g * 128 + i)] = (double)d * (int8_t)blk[i];
            }
        }
        return true;
    }
    for (int64_t b = 0; b < n / ab; ++b) {
        const uint8_t* blk = q.data() + b * bytes;
        double d;
        if (ab == 32) {
            uint16_t h;
            std::memcpy(&h, blk + (has_offset(t) ? 4 : 0), 2);
            d = half_to_float(h);
            if (has_offset(t)) {
                float f;
                std::memcpy(&f, blk, 4);
                sums->push_back(f);
            }
        } else {
            float f;
            std::memcpy(&f, blk, 4);
            d = f;
        }
        const int8_t* qs = reinterpret_cast<const int8_t*>(blk + (ab != 32 ? 4 : has_offset(t) ? 6 : 2));
        for (int i = 0; i < ab; ++i) (*out)[(size_t)(b * ab + i)] = d * qs[i];
    }
    return true;
}

struct Oracle {
    bool ok = false;
    double exact = 0;      // Σ w·x in double over the dequantized weights and activations
    double magnitude = 0;  // M = Σ (|w| + |offset|)·|x|
    double exact_slack = 0;  // TQ: the oracle's own rotation of float weights (added to exact's bound)
};

// Signs of the TQ rotation derived here independently of the header: MT19937 seeded 42, outputs
// 0..127 for D1 and 128..255 for D2, +1 when odd (turboquant-vllm's torch.randint draws).
inline void tq_signs(double* s1, double* s2) {
    std::mt19937 g(42);
    for (int i = 0; i < 128; ++i) s1[i] = g() & 1 ? 1.0 : -1.0;
    for (int i = 0; i < 128; ++i) s2[i] = g() & 1 ? 1.0 : -1.0;
}
// y = D2 H D1 x / sqrt(128) per 128, in double (H: Sylvester Walsh-Hadamard, (-1)^popcount(i & k)).
inline void tq_rotate_double(const float* x, double* y, int64_t n) {
    double s1[128], s2[128];
    tq_signs(s1, s2);
    for (int64_t g = 0; g < n / 128; ++g)
        for (int i = 0; i < 128; ++i) {
            double acc = 0;
            for (int k = 0; k < 128; ++k) acc += (__builtin_popcount(i & k) & 1 ? -1.0 : 1.0) * s1[k] * x[g * 128 + k];
            y[g * 128 + i] = s2[i] * acc / std::sqrt(128.0);
        }
}

inline Oracle oracle(TT t, const uint8_t* w, const std::vector<float>& x, int64_t n) {
    Oracle o;
    std::vector<float> wf((size_t)n);
    std::vector<double> xd, sums;
    if (moe::dequantize_row(t, w, wf.data(), n) != moe::Status::ok || !dequantized_activations(t, x, n, &xd, &sums)) return o;
    const int be = moe::tensor_type_block_elems(t), bb = moe::tensor_type_block_bytes(t);
    std::vector<double> wd(wf.begin(), wf.end());
    if (is_tq(t)) {  // the kernels work in the rotated basis: compare there (R is orthonormal)
        tq_rotate_double(wf.data(), wd.data(), n);
        double ww = 0, xx = 0;
        for (int64_t i = 0; i < n; ++i) { ww += wd[(size_t)i] * wd[(size_t)i]; xx += xd[(size_t)i] * xd[(size_t)i]; }
        o.exact_slack = 16 * kUnitRoundoff * std::sqrt(ww * xx);
    }
    std::vector<double> mins(256);
    for (int64_t i = 0; i < n; ++i) {
        const double wv = wd[(size_t)i];
        double wabs = std::fabs(wv);
        if (has_mins(t)) {
            if (i % be == 0) k_quant_mins(t, w + (i / be) * bb, mins.data());
            wabs += std::fabs(mins[(size_t)(i % be)]);
        }
        o.exact += wv * xd[(size_t)i];
        o.magnitude += wabs * std::fabs(xd[(size_t)i]);
    }
    if (has_offset(t)) {  // the kernels take m * s (s as stored) for m * Σ x: swap the terms
        for (int64_t b = 0; b < n / 32; ++b) {
            double sx = 0;
            k_quant_mins(t, w + (b * 32 / be) * bb, mins.data());
            for (int i = 0; i < 32; ++i) sx += xd[(size_t)(b * 32 + i)];
            o.exact += mins[0] * (sums[(size_t)b] - sx);
        }
    }
    o.ok = true;
    return o;
}

// Float terms the scalar kernel adds for a row of n elements (see the top comment): one per
// element for float types, two per 256-element super-block, one per 32 (two with an offset) else.
inline int64_t float_terms(TT t, int64_t n) {
    if (is_float_type(t)) return n;
    if (t == TT::nvfp4) return n / 16;        // one term per 16-element sub-block
    if (is_tq(t)) return n / 32 + n / 128;    // four per group into its partial, one per group
    return uses_q8k(t) ? 2 * (n / 256) : has_mins(t) ? 2 * (n / 32) : n / 32;
}

// Row lengths: for quantized types in units of the weight block (one block, odd counts, long
// rows); for float types in elements, covering every tail of 8- and 32-wide loops.
inline std::vector<int64_t> row_lengths(TT t) {
    if (is_float_type(t)) return {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 19, 31, 32, 33, 63, 64, 65, 100, 255, 256, 1000, 4096};
    std::vector<int64_t> out;
    const int64_t unit = moe::tensor_type_block_elems(t);
    for (int64_t blocks : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64}) out.push_back(blocks * unit);
    if (unit == 32) out.push_back(128 * unit);  // a 4096-wide Q8_0/Q4_0 row
    return out;
}

}  // namespace kernel_cases

#endif  // MOE_TESTS_KERNEL_CASES_H

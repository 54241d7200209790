// format_quality: round-trip error of every quantizable type on a model's real weights and on
// Gaussian data (relative RMSE = sqrt(mean e^2) / rms(x), and mean |e| / mean |x|), with bits per
// weight. The rows of bench/RESULTS.md's quality table.
//
//   g++ -O3 -std=c++17 -pthread -I. bench/format_quality.cpp -o build/format_quality
//   build/format_quality models/demo-qwen3moe.gguf
//
// Real weights: every matrix (n_dims >= 2, name ending in .weight, routers excluded) of the file,
// dequantized to float; a type whose block does not divide a matrix's rows skips that matrix (the
// count is printed). Gaussian: 2^20 N(0, 0.02^2) values.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using TT = moe::TensorType;

struct Err { double se = 0, sx2 = 0, ae = 0, ax = 0; int64_t n = 0, skipped = 0; };

static void roundtrip(TT t, const std::vector<float>& x, int64_t row, Err* e) {
    const int be = moe::tensor_type_block_elems(t);
    if (row % be) { ++e->skipped; return; }
    std::vector<uint8_t> q((size_t)(row / be * moe::tensor_type_block_bytes(t)));
    std::vector<float> y((size_t)row);
    for (size_t r = 0; r + (size_t)row <= x.size(); r += (size_t)row) {
        if (moe::quantize_row(t, x.data() + r, q.data(), row) != moe::Status::ok) { ++e->skipped; return; }
        moe::dequantize_row(t, q.data(), y.data(), row);
        for (int64_t i = 0; i < row; ++i) {
            const double a = x[r + (size_t)i], d = (double)y[(size_t)i] - a;
            e->se += d * d; e->sx2 += a * a; e->ae += std::fabs(d); e->ax += std::fabs(a);
        }
        e->n += row;
    }
}

int main(int argc, char** argv) {
    if (argc != 2) { std::fprintf(stderr, "usage: format_quality MODEL.gguf\n"); return 2; }
    moe::GgufFile f;
    if (moe::GgufFile::open(argv[1], true, &f) != moe::Status::ok) { std::fprintf(stderr, "%s\n", moe::last_error()); return 1; }
    const TT types[] = {TT::q8_0, TT::q6_k, TT::q4_k, TT::q4_0, TT::iq4_nl, TT::nvfp4, TT::tq4, TT::mxfp4, TT::affine4_g32, TT::affine4_g64,
                        TT::affine4_g128, TT::affine3_g32, TT::affine3_g64, TT::affine3_g128, TT::tq3, TT::q3_k};
    std::vector<Err> real(sizeof types / sizeof types[0]), gauss(real.size());
    std::vector<float> x;
    for (size_t i = 0; i < f.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = f.tensor_at(i);
        const std::string name = t.name;
        if (t.n_dims < 2 || name.size() < 7 || name.compare(name.size() - 7, 7, ".weight") != 0 || name.find("ffn_gate_inp") != std::string::npos) continue;
        x.resize((size_t)t.n_elements());
        if (moe::dequantize_row((TT)t.type, t.data, x.data(), t.n_elements()) != moe::Status::ok) continue;
        for (size_t k = 0; k < real.size(); ++k) roundtrip(types[k], x, t.ne[0], &real[k]);
    }
    std::mt19937_64 g(42);
    std::normal_distribution<float> nd(0.f, 0.02f);
    x.resize(1 << 20);
    for (float& v : x) v = nd(g);
    for (size_t k = 0; k < real.size(); ++k) roundtrip(types[k], x, 1024, &gauss[k]);
    std::printf("| type | bits/weight | real: rel. RMSE | real: mean abs err / mean abs | Gaussian: rel. RMSE | Gaussian: mean abs err / mean abs | matrices skipped |\n|---|---|---|---|---|---|---|\n");
    for (size_t k = 0; k < real.size(); ++k) {
        const Err &r = real[k], &q = gauss[k];
        std::printf("| %s | %.3f | %.4f | %.4f | %.4f | %.4f | %lld |\n", moe::tensor_type_name(types[k]),
                    8.0 * moe::tensor_type_block_bytes(types[k]) / moe::tensor_type_block_elems(types[k]), std::sqrt(r.se / r.sx2), r.ae / r.ax,
                    std::sqrt(q.se / q.sx2), q.ae / q.ax, (long long)r.skipped);
    }
    return 0;
}

// Running llama.cpp (the llama_peer program of tests/peer/) next to the engine, for the tests that
// compare with it: where the peer and the temp dir are, a temp file that removes itself, one peer
// run (prompt batch + greedy decode, logits of every row), and row differences against the float64
// oracle or between two engine runs.
#ifndef MOE_TEST_PEER_UTIL_H
#define MOE_TEST_PEER_UTIL_H

#include "oracle.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace moe_test {

// The peer program: MOE_LLAMA_PEER from the environment, else the compile definition, else "".
inline std::string peer_path() {
    const char* e = std::getenv("MOE_LLAMA_PEER");
    if (e && *e) return e;
#ifdef MOE_LLAMA_PEER
    return MOE_LLAMA_PEER;
#else
    return "";
#endif
}

inline std::string tmp_dir() {
    const char* e = std::getenv("MOE_TEST_TMP");
    return e && *e ? e : "/tmp";
}

inline std::string shell_quote(const std::string& s) {
    std::string o = "'";
    for (char c : s) {
        if (c == '\'') o += "'\\''";
        else o += c;
    }
    return o + "'";
}

// ids[from, to) joined with commas.
inline std::string join_ids(const std::vector<int32_t>& v, size_t from = 0, size_t to = (size_t)-1) {
    std::string s;
    for (size_t i = from; i < v.size() && i < to; ++i) s += (i > from ? "," : "") + std::to_string(v[i]);
    return s;
}

// A file in the temp dir (named after the process, so parallel test runs do not collide), removed when done.
struct TempFile {
    std::string path;
    explicit TempFile(const std::string& name, const char* ext = ".gguf") {
        path = tmp_dir() + "/moe_test_" + std::to_string((long)getpid()) + "_" + name + ext;
    }
    ~TempFile() { std::remove(path.c_str()); }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;
};

// llama.cpp on `prompt` (one batch) followed by `n_gen` greedy tokens, one llama_decode each (which
// carries recurrent and convolution states from call to call): *logits gets prompt.size() + n_gen
// rows of n_vocab, *generated (optional) the ids it printed.
inline ::testing::AssertionResult run_peer(const std::string& peer, const std::string& model, const std::vector<int32_t>& prompt, int n_gen,
                                           int n_vocab, std::vector<float>* logits, std::vector<int32_t>* generated = nullptr) {
    TempFile out("logits", ".f32"), err("stderr", ".txt");
    const std::string cmd = shell_quote(peer) + " -m " + shell_quote(model) + " --tokens " + join_ids(prompt) + " -n " + std::to_string(n_gen) +
                            " -t 1 --logits-out " + shell_quote(out.path) + " 2>" + shell_quote(err.path);
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return ::testing::AssertionFailure() << "popen failed: " << cmd;
    std::string text;
    char buf[4096];
    while (std::fgets(buf, sizeof buf, p)) text += buf;
    const int rc = pclose(p);
    if (rc != 0) {
        std::string etext;
        if (FILE* f = std::fopen(err.path.c_str(), "r")) {
            while (std::fgets(buf, sizeof buf, f)) etext += buf;
            std::fclose(f);
        }
        return ::testing::AssertionFailure() << "llama_peer failed (status " << rc << "): " << cmd << "\n" << text << etext;
    }
    std::vector<int32_t> ids;  // the last non-empty line of stdout: the generated ids
    std::istringstream lines(text);
    std::string line, last;
    while (std::getline(lines, line))
        if (line.find_first_of("0123456789") != std::string::npos) last = line;
    std::stringstream items(last);
    std::string item;
    while (std::getline(items, item, ','))
        if (item.find_first_of("0123456789") != std::string::npos) ids.push_back((int32_t)std::strtol(item.c_str(), nullptr, 10));
    if ((int)ids.size() != n_gen) return ::testing::AssertionFailure() << "llama_peer printed " << ids.size() << " ids, want " << n_gen << ": " << text;
    if (generated) *generated = ids;
    const size_t rows = prompt.size() + (size_t)n_gen;
    logits->assign(rows * (size_t)n_vocab, 0.f);
    FILE* f = std::fopen(out.path.c_str(), "rb");
    if (!f) return ::testing::AssertionFailure() << "no logits file " << out.path;
    const size_t got = std::fread(logits->data(), sizeof(float), logits->size(), f);
    const bool extra = std::fgetc(f) != EOF;
    std::fclose(f);
    if (got != logits->size() || extra) return ::testing::AssertionFailure() << "logits file does not hold " << logits->size() << " floats";
    return ::testing::AssertionSuccess();
}

// Rows [first, end) (end < 0: all) of `got` against the oracle's.
inline RowDiff diff_rows(const OracleResult& ref, const std::vector<float>& got, int first = 0, int end = -1) {
    RowDiff d;
    if (end < 0) end = ref.n_tokens;
    for (int i = first; i < end; ++i) d.add(i, ref.row(i), got.data() + (size_t)i * (size_t)ref.n_vocab, ref.n_vocab);
    return d;
}

inline std::string diff_msg(const RowDiff& d) {
    std::ostringstream o;
    o << "max|d|/max|ref| = " << d.rel() << " (max|d| " << d.max_abs << " at position " << d.worst_row << ", token " << d.worst_col
      << "), rms rel " << d.rel_rms() << ", argmax " << d.argmax_agree << "/" << d.argmax_checked;
    return o.str();
}

// Two runs of the engine over the same positions: max |a - b| / max |a|, and whether bit-identical.
inline double engine_rel(const float* a, const float* b, size_t n, bool* identical) {
    double mx = 0, mref = 0;
    for (size_t i = 0; i < n; ++i) {
        const double d = std::fabs((double)a[i] - (double)b[i]);
        if (!(d <= mx)) mx = d;
        mref = std::max(mref, std::fabs((double)a[i]));
    }
    *identical = std::memcmp(a, b, n * sizeof(float)) == 0;
    return mref > 0 ? mx / mref : mx;
}

}  // namespace moe_test

#endif  // MOE_TEST_PEER_UTIL_H

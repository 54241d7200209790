/* moe_infer.h - v0.1 - MIT - Mixture-of-Experts LLM inference on CPUs, in one C++17 header.

   Do this:
       #define MOE_INFER_IMPLEMENTATION
   before you include this file in *one* C++ file to create the implementation.
   Every other file includes it without the define and sees only the declarations.

   QUICK START
       moe::Model model;
       if (moe::Model::load("qwen3-30b-a3b-q4_0.gguf", moe::LoadOptions{}, &model) != moe::Status::ok)
           { fprintf(stderr, "%s\n", moe::last_error()); return 1; }
       moe::Session session;
       moe::Session::create(model, moe::SessionOptions{}, &session);
       std::vector<int32_t> prompt;
       model.tokenizer().encode("The capital of France is", true, false, &prompt);
       moe::GenerateOptions gen;  gen.max_tokens = 64;
       moe::generate(session, prompt, gen,
           [](void*, int32_t, const char* text, size_t n) { fwrite(text, 1, n, stdout); return true; },
           nullptr, nullptr);

   DESIGN PRIORITIES
       1. correct and readable (every SIMD kernel has a scalar _ref twin that is its specification)
       2. batch-size-1 decode at the memory-bandwidth limit; no allocation in the decode loop
       3. zero dependencies beyond the C++17 standard library (OpenMP optional)
       Errors are return values (moe::Status + moe::last_error()); works with -fno-exceptions.
       The library never prints (unless given a log callback) and never exits.

   CONFIG MACROS (define before including the implementation; all optional)
       MOE_INFER_IMPLEMENTATION   emit the implementation in this translation unit
       MOE_INFER_STATIC           internal linkage for the library's free functions and inline member
                                  functions: several translation units may each hold the implementation
       MOE_API                    decoration for public functions (default: nothing)
       MOE_ASSERT(x)              programmer-error check (default: assert)
       MOE_MALLOC(sz)/MOE_FREE(p) aligned-buffer allocator (define both or neither)
       MOE_NO_SIMD                scalar kernels only
       MOE_NO_AVX2 / MOE_NO_AVX512 / MOE_NO_NEON   drop one SIMD path
       MOE_NO_THREADS             no std::thread: everything runs on the calling thread
       MOE_NO_OPENMP              ignore _OPENMP even when compiling with -fopenmp
       MOE_NO_MMAP                read model files into memory instead of mapping them (mmap on
                                  POSIX, MapViewOfFile on Windows; windows.h comes with NOMINMAX)
       MOE_USE_REFERENCE_KERNELS  force the scalar _ref kernels (for bisecting numeric bugs)

   SUPPORTED
       architectures: qwen3moe, olmoe, qwen2moe (shared expert + sigmoid gate), llama (Mixtral-style
       ffn_*_exps, and dense llama), gpt-oss (attention sinks, sliding window, YaRN, biases, clamped
       SwiGLU), glm4moe (partial rotary, sigmoid routing with a selection bias, shared expert, dense
       leading layers; NextN layers skipped), deepseek2 (DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash:
       multi-head latent attention in the absorbed form, caching only the latent + rope key; q LoRA,
       grouped top-k), lfm2moe (short-convolution layers beside attention), qwen35moe (Qwen3.5: gated
       delta-net linear attention beside gated full attention with IMROPE, a sigmoid-gated shared
       expert; truncate/eval_prompt re-evaluate the kept prefix, since the recurrent state cannot be
       rewound) and qwen3next (Qwen3-Next: the same layers, plain partial RoPE, grouped v heads);
       all hyper-parameters from GGUF metadata.
       tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q1_0, Q2_0, IQ4_NL, IQ4_XS, IQ3_S,
       IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, TQ1_0, TQ2_0, MXFP4,
       NVFP4 (ggml block layouts, bit-exact; the IQ grid types are dequantize-only: no quantizer);
       our own TQ3, TQ4 (rotated codebook) and AFFINE3/AFFINE4 (MLX affine, groups 32/64/128).
       CPUs: any (scalar _ref kernels); x86-64 AVX2+FMA, AVX-512, AVX-512 VNNI and AArch64 NEON,
       NEON dotprod kernels picked at run time.
       prefill: chunks of many tokens run as int8 GEMM panels (AVX-512 VNNI; Q4_0..Q8_0, IQ4_NL,
       MXFP4, Q4_K, Q5_K, AFFINE), SessionOptions::gemm_min_tokens.
       tokenizers: byte-level BPE ("gpt2") with llama.cpp's pre-tokenizers for tokenizer.ggml.pre
       llama3/llama-bpe/lfm2..., glm4/dbrx, qwen2, qwen35, deepseek-llm, deepseek-v3, gpt-4o (gpt-oss,
       llama4), kimi-k2, gpt-2 (also the fallback for unknown names) and llama.cpp's "default"; and
       SentencePiece ("llama").
       models larger than memory: LoadOptions::mem_budget keeps the routed experts in a bounded
       cache (O_DIRECT reads on I/O threads), SessionOptions::predict_depth loads predicted experts
       ahead; Session::expert_stats / prediction_stats, Model::expert_store_stats report.
       apps: Jinja chat templates (render_chat_template), GBNF grammars and JSON Schema
       (SamplerOptions::grammar, json_schema_to_grammar), llama.cpp's sampler chain (penalties,
       DRY, top-n-sigma, typical, XTC, mirostat v2, logit bias), session state files and prompt
       prefix reuse (Session::save_state, eval_prompt), a Q8_0 KV cache, load/prefill progress and
       cancellation.

   INDEX OF THIS FILE
       [SECTION] VERSION & API MACROS
       [SECTION] STATUS
       [SECTION] GGUF
       [SECTION] TOKENIZER
       [SECTION] SAMPLER
       [SECTION] MODEL & SESSION
       [SECTION] GENERATION
       [SECTION] CHAT TEMPLATES
       --- implementation ---
       [SECTION] CONFIG DEFAULTS & PLATFORM      >>config
       [SECTION] UTILITIES                       >>util
       [SECTION] STATUS & LOGGING                >>status
       [SECTION] FILE MAPPING                    >>file
       [SECTION] GGUF READER & WRITER            >>gguf
       [SECTION] QUANT FORMATS                   >>quant
       [SECTION] KERNELS: REFERENCE              >>kernels-ref  row dots; attention on a float cache (scores, exp, values)
       [SECTION] ACTIVATION FORMATS              >>act
       [SECTION] GEMM PANELS (PREFILL)           >>gemm      int8 panels: a row tile decoded once for many tokens
       [SECTION] KERNELS: X86 (AVX2, AVX-512, VNNI)  >>kernels-x86  also the AVX-512 attention kernels, the AMX panel tile
       [SECTION] KERNELS: ARM (NEON, DOTPROD)    >>kernels-arm
       [SECTION] TYPE TABLE                      >>table     one row per tensor type: what a new type adds
       [SECTION] KERNEL DISPATCH                 >>dispatch
       [SECTION] THREAD POOL                     >>threads
       [SECTION] TOKENIZER IMPLEMENTATION        >>tokenizer
       [SECTION] MODEL LOADING                   >>loader
       [SECTION] EXPERT STORE                    >>store     LoadOptions::mem_budget: experts in a bounded cache
       [SECTION] FORWARD PASS                    >>forward
           forward state                         >>forward-state  KvCache, Activations, Routing, PhaseProfile, ForwardCall
           expert statistics and prediction      >>experts        GateLookahead (ExpertPredictor)
           the forward pass of one chunk         >>forward-chunk  eval -> forward -> forward_thread -> phases (attention,
                                                            MLA, short convolution, delta net, routing, experts)
       [SECTION] SAMPLER IMPLEMENTATION          >>sampler
       [SECTION] GENERATION IMPLEMENTATION       >>generate
       [SECTION] CHAT TEMPLATES & JSON IMPLEMENTATION  >>chat  JSON, a Jinja subset, JSON Schema -> GBNF

   LICENSE: MIT, see the end of the file.
*/
#ifndef MOE_INFER_H
#define MOE_INFER_H

//-----------------------------------------------------------------------------
// [SECTION] VERSION & API MACROS
//-----------------------------------------------------------------------------

#define MOE_INFER_VERSION 100  // 0.1.0: major*10000 + minor*100 + patch

#ifndef MOE_API
#ifdef MOE_INFER_STATIC
#define MOE_API [[maybe_unused]] static
#else
#define MOE_API
#endif
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moe {

//-----------------------------------------------------------------------------
// [SECTION] STATUS
//-----------------------------------------------------------------------------
// Every fallible call returns a Status; last_error() holds the detail (which key, which tensor,
// expected vs actual) for the calling thread.

#define MOE_STATUS_LIST(X)                                                     \
    X(ok, "ok")                                                                \
    X(invalid_argument, "invalid argument")                                    \
    X(io_error, "I/O error")                                                   \
    X(invalid_file, "invalid or corrupt model file")                           \
    X(unsupported, "unsupported feature, architecture or tensor type")         \
    X(missing_key, "missing metadata key")                                     \
    X(missing_tensor, "missing tensor")                                        \
    X(shape_mismatch, "tensor shape or type mismatch")                         \
    X(out_of_memory, "out of memory")                                          \
    X(context_full, "context window is full")                                  \
    X(tokenizer_error, "tokenizer error")                                      \
    X(cancelled, "cancelled by the caller")

enum class Status : int {
#define MOE_DETAIL_STATUS_ENUM(name, text) name,
    MOE_STATUS_LIST(MOE_DETAIL_STATUS_ENUM)
#undef MOE_DETAIL_STATUS_ENUM
};

// Static string for a Status value.
MOE_API const char* status_string(Status s);
// Detail of the last failed call on this thread ("" if none). Valid until the next failing call.
MOE_API const char* last_error();

// Optional log sink. Must be reentrant: sessions on several threads may log at once.
typedef void (*LogFn)(void* user, const char* message);

//-----------------------------------------------------------------------------
// [SECTION] GGUF
//-----------------------------------------------------------------------------
// GGUF v3 (the llama.cpp file format): reader for metadata + tensors straight from a mapped
// file, and a writer used by tests, tools and quantization.

enum class TensorType : uint32_t {
    f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, iq4_nl = 20, iq4_xs = 23, bf16 = 30, tq1_0 = 34, tq2_0 = 35,
    iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq3_s = 21, iq2_s = 22, iq1_m = 29, q1_0 = 41, q2_0 = 42,
    mxfp4 = 39, nvfp4 = 40,
    // moe_infer's own types: ids far above ggml's and ik_llama.cpp's (< 256). A file that holds them
    // names each in the string array `moe_infer.custom_types` ("ID:NAME"; GgufWriter adds it), and a
    // reader refuses an id whose name there differs from its own.
    tq3 = 0x4D4F0001, tq4 = 0x4D4F0002,
    affine3_g32 = 0x4D4F0011, affine3_g64 = 0x4D4F0012, affine3_g128 = 0x4D4F0013,
    affine4_g32 = 0x4D4F0021, affine4_g64 = 0x4D4F0022, affine4_g128 = 0x4D4F0023,
};
constexpr uint32_t kCustomTypeBase = 0x4D4F0000;
// Name ("Q4_K") for a supported type, "unknown" otherwise.
MOE_API const char* tensor_type_name(TensorType t);
// Elements per block and bytes per block; 0 for an unsupported type id.
MOE_API int tensor_type_block_elems(TensorType t);
MOE_API int tensor_type_block_bytes(TensorType t);
// True when this build can read tensors of type id `raw`.
MOE_API bool tensor_type_supported(uint32_t raw);

enum class GgufValueType : uint32_t {
    u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
    string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};

struct GgufString { const char* data = nullptr; size_t size = 0; std::string str() const { return std::string(data, size); } };

// One metadata entry. Scalars are decoded into `scalar_*`; strings and arrays point into the file.
struct GgufKeyValue {
    std::string key;
    GgufValueType type = GgufValueType::u8;
    GgufValueType array_type = GgufValueType::u8;  // element type when type == array
    uint64_t array_count = 0;                      // element count when type == array
    const uint8_t* array_data = nullptr;           // raw elements (strings: u64 len + bytes each)
    uint64_t scalar_u64 = 0;  // any integer or bool, widened (signed values sign-extended)
    double scalar_f64 = 0;    // any numeric value as double
    GgufString scalar_str;    // when type == string
};

struct GgufTensorInfo {
    std::string name;
    uint32_t n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};   // ne[0] is the contiguous dimension
    uint32_t type = 0;              // raw ggml type id (see TensorType)
    uint64_t offset = 0;            // relative to the data section
    uint64_t n_bytes = 0;
    const uint8_t* data = nullptr;  // points into the mapped file
    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

namespace detail { struct GgufFileImpl; }

// A parsed, validated GGUF file. Move-only; read-only after open and safe to share across threads.
// Every size, offset and count is checked against the file before use: a corrupt or hostile file
// gives Status::invalid_file (or unsupported for unknown tensor types), never a crash.
class GgufFile {
public:
    GgufFile();
    ~GgufFile();
    GgufFile(GgufFile&&) noexcept;
    GgufFile& operator=(GgufFile&&) noexcept;

    // Maps (or, with use_mmap=false or MOE_NO_MMAP, reads) the file at `path`.
    static Status open(const char* path, bool use_mmap, GgufFile* out);
    // The same, reporting (bytes read, file size) while a file is read into memory (use_mmap false)
    // every 64 MiB; `progress` returning false stops it (Status::cancelled).
    static Status open(const char* path, bool use_mmap, GgufFile* out, bool (*progress)(void* user, uint64_t done, uint64_t total), void* user);
    // Parses a caller-owned buffer; `data` must outlive the GgufFile.
    static Status open_memory(const void* data, size_t size, GgufFile* out);

    uint32_t version() const;
    uint32_t alignment() const;
    size_t n_keys() const;
    const GgufKeyValue& key_at(size_t i) const;
    const GgufKeyValue* find(const char* key) const;  // nullptr if absent
    size_t n_tensors() const;
    const GgufTensorInfo& tensor_at(size_t i) const;
    const GgufTensorInfo* find_tensor(const char* name) const;  // nullptr if absent
    size_t file_size() const;
    const uint8_t* data() const;  // the file's bytes (mapped or owned); tensor offsets count from here

    // Typed lookups: Status::missing_key when absent, invalid_file when of the wrong type.
    Status get_u32(const char* key, uint32_t* out) const;  // any non-negative integer that fits
    Status get_f32(const char* key, float* out) const;     // any numeric
    Status get_bool(const char* key, bool* out) const;
    Status get_string(const char* key, std::string* out) const;
    Status get_string_array(const char* key, std::vector<std::string>* out) const;
    Status get_f32_array(const char* key, std::vector<float>* out) const;
    Status get_i32_array(const char* key, std::vector<int32_t>* out) const;  // any integer array

private:
    std::unique_ptr<detail::GgufFileImpl> impl_;
};

// Builds a GGUF v3 file in memory and writes it. Tensors are laid out in insertion order,
// each padded to the alignment, exactly as llama.cpp's reader requires.
class GgufWriter {
public:
    void set_u32(const std::string& key, uint32_t v);
    void set_i32(const std::string& key, int32_t v);
    void set_f32(const std::string& key, float v);
    void set_bool(const std::string& key, bool v);
    void set_string(const std::string& key, const std::string& v);
    void set_string_array(const std::string& key, const std::vector<std::string>& v);
    void set_f32_array(const std::string& key, const std::vector<float>& v);
    void set_i32_array(const std::string& key, const std::vector<int32_t>& v);
    // Copies one metadata entry of an opened file (any type, arrays included), e.g. when
    // rewriting a model; replaces an entry of the same key.
    void copy_key(const GgufKeyValue& kv);
    // `data` holds the tensor in `type`'s layout (n_bytes from the shape); it is copied.
    // ne[0] must be a multiple of the type's block size; n_dims in 1..4.
    Status add_tensor(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data);
    // Converts float32 values to `type` (quantizing with the reference quantizers) and adds them.
    Status add_tensor_f32(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const float* values);
    // Declares a tensor whose bytes are produced at write time by the `fill` callback of
    // write_streaming() (for files larger than memory, e.g. synthetic benchmark models).
    Status add_tensor_deferred(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne);
    Status write(const char* path) const;
    // fill(user, tensor_index, dst, n_bytes) writes deferred tensor `tensor_index` (insertion
    // order); returning false aborts with Status::cancelled.
    typedef bool (*FillFn)(void* user, size_t tensor_index, uint8_t* dst, size_t n_bytes);
    Status write_streaming(const char* path, FillFn fill, void* user) const;
    std::vector<uint8_t> to_bytes() const;  // requires no deferred tensors

private:
    struct Entry { std::string key; GgufValueType type; GgufValueType array_type; uint64_t count; std::vector<uint8_t> payload; };
    struct Tensor { std::string name; uint32_t type; uint32_t n_dims; int64_t ne[4]; uint64_t n_bytes; bool deferred; std::vector<uint8_t> data; };
    std::vector<uint8_t> header_bytes(uint32_t* alignment) const;
    Status add_tensor_impl(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data);
    void set_raw(const std::string& key, GgufValueType type, GgufValueType array_type, uint64_t count, std::vector<uint8_t> payload);
    std::vector<Entry> entries_;
    std::vector<Tensor> tensors_;
};

// Instruction sets the kernels can use. The best one is detected at start-up; force_isa() lowers
// it (for tests and benchmarks) and affects models loaded afterwards. Status::unsupported if the
// CPU or this build lacks it.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_vnni = 3, neon = 4, neon_dotprod = 5 };
MOE_API const char* isa_name(Isa isa);
MOE_API Isa detected_isa();
MOE_API Isa current_isa();
MOE_API Status force_isa(Isa isa);
// AMX-INT8 (Intel Sapphire Rapids and later, on Linux): set_amx(true) runs the prefill panels of
// Isa::avx512_vnni on the tile unit, with bit-identical results. Off by default: with a scale per
// 32 columns it is slower than the VNNI panels (bench/RESULTS.md). amx_available(): the CPU has
// AMX-TILE and AMX-INT8 and Linux granted this process the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM),
// asked once, on the first call; a build with MOE_NO_AMX never asks). Like force_isa, set_amx is
// process-wide and affects models loaded afterwards.
MOE_API bool amx_available();
MOE_API void set_amx(bool enabled);
MOE_API bool amx_enabled();  // amx_available() and switched on
// One weight row (`n` elements of `type`) dotted with float activations `x`, through the kernel of
// `isa` (x is first quantized to the type's activation format, as the forward pass does). For tests.
MOE_API Status vec_dot(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out);
// The scalar _ref twin of the kernel vec_dot(type, isa) runs for rows of n elements: the same
// activation format (some ISAs' kernels read another one than the type's own), scalar code. For tests.
MOE_API Status vec_dot_ref(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out);
// The prefill panel kernel of `isa` (Isa::scalar: its _ref) on `rows` (1..16) weight rows of `n`
// elements, `row_bytes` apart, and `n_tokens` (1..8) float rows of x (n apart, quantized as the
// panels' activations): out[t * rows + r] = row r . x row t. Status::unsupported where the type or
// the ISA has no panel form. For tests.
MOE_API Status gemm_tile(TensorType type, Isa isa, const void* weights, size_t row_bytes, int rows, const float* x, int n_tokens,
                         int64_t n, float* out);
// One attention step on a float cache through the kernels of `isa` (Isa::scalar: their _ref
// twins): scores[i * n + j] = scale * (q_i . k_j) for nq query rows (hk floats each, packed) and n
// key rows; then e = exp(scores - the row's max) by the attention exp, written over scores; then
// acc[i * hv + d] += sum_j e[i][j] * v_j[d] (n value rows). Key and value rows are `row_floats`
// apart. Status::unsupported where the ISA has no attention kernels (they serve AVX-512). For tests.
MOE_API Status attention_step(Isa isa, const float* q, int nq, const float* keys, const float* values, int n, int hk, int hv, int64_t row_floats,
                              float scale, float* scores, float* acc);
// The attention exp of `isa` (Isa::scalar: its _ref) on x[0..n) in place. For tests.
MOE_API Status attention_exp(Isa isa, float* x, int n);
// The activation row `type`'s kernels dot against (Q8_0 / Q8_K blocks, or float), made with the
// quantizer of `isa`; dst_size >= its size. SIMD quantizers are bit-exact with the scalar ones.
MOE_API Status quantize_activations(TensorType weight_type, Isa isa, const float* x, int64_t n, void* dst, size_t dst_size);

// Reference quantization of `n` floats (n a multiple of the block size) into `dst`
// (n / block_elems * block_bytes bytes) and back. For tests, tools and GgufWriter.
MOE_API Status quantize_row(TensorType type, const float* src, void* dst, int64_t n);
MOE_API Status dequantize_row(TensorType type, const void* src, float* dst, int64_t n);
// quantize_row weighing element i's squared error by importance[i] (an importance matrix: per-
// column activation energy from a calibration text, repeated per row). Used by the quantizers that
// can weigh their error (Q4_K, Q5_K, MXFP4, NVFP4, TQ3, TQ4, AFFINE*); the others ignore it.
// importance == nullptr is quantize_row.
MOE_API Status quantize_row_weighted(TensorType type, const float* src, void* dst, int64_t n, const float* importance);
// True when quantize_row_weighted uses the importance vector for `type`.
MOE_API bool quantize_uses_importance(TensorType type);

//-----------------------------------------------------------------------------
// [SECTION] TOKENIZER
//-----------------------------------------------------------------------------
// Built from the GGUF's tokenizer.ggml.* metadata. Byte-level BPE ("gpt2") with the
// pre-tokenizers of common families, and SentencePiece-style ("llama"). Read-only after load:
// safe to call from several threads at once.
// tokenizer.ggml.pre names read as llama.cpp reads them (same words, same ids, checked against it):
//   llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano (Llama 3's
//   regex, whole-word tokens first, BOS by default); dbrx smaug-bpe glm4 chatglm-bpe (the same regex
//   only); qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2; qwen35;
//   deepseek-llm; deepseek-v3 hunyuan-dense joyai-llm hy_v4; gpt-4o llama4 kanana2 talkie
//   minimax-m2 (o200k: gpt-oss's GGUFs say gpt-4o); kimi-k2 (tokenizer.ggml.merges may be absent);
//   gpt-2; default (also when the key is absent: four regexes, punctuation runs apart first).
//   Any other name gets GPT-2's regex (llama.cpp refuses unknown names). Where llama.cpp differs
//   from the family's own regex (its Unicode class approximations), llama.cpp's behaviour is kept.
//   Invalid UTF-8 differs by design: each invalid byte stays that byte (llama.cpp makes it U+FFFD).

namespace detail { struct TokenizerImpl; }

class Tokenizer {
public:
    Tokenizer();
    ~Tokenizer();
    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;

    // Loads the vocabulary of a GGUF file (tokenizer.ggml.*). Status::tokenizer_error, missing_key or
    // invalid_file with a message naming the key on inconsistent metadata.
    static Status load(const GgufFile& file, Tokenizer* out);

    // Appends the tokens of `text` (any bytes; invalid UTF-8 is encoded byte-wise, never rejected)
    // to *out. add_special: add BOS/EOS as the vocabulary's metadata asks. parse_special: text
    // like "<|im_start|>" becomes the control token instead of being split.
    Status encode(const std::string& text, bool add_special, bool parse_special, std::vector<int32_t>* out) const;
    // Bytes of one token as they appear in text (byte-level and <0xXX> tokens decoded). Control
    // tokens give "" unless render_special. The bytes may be an incomplete UTF-8 sequence.
    std::string token_to_piece(int32_t token, bool render_special = false) const;
    // Concatenated pieces of `tokens` (SentencePiece: the leading space of the first is removed).
    std::string decode(const int32_t* tokens, size_t n, bool render_special = false) const;

    int32_t n_vocab() const;
    int32_t bos() const;   // -1 if none
    int32_t eos() const;   // -1 if none
    bool is_end_of_generation(int32_t token) const;  // EOS, EOT, <|im_end|>-style tokens
    bool is_control(int32_t token) const;
    const std::string& token_text(int32_t token) const;  // the raw vocabulary entry
    const std::string& chat_template() const;            // tokenizer.chat_template or ""
    bool valid() const;

private:
    std::unique_ptr<detail::TokenizerImpl> impl_;
};

// Streaming detokenizer: turns tokens into text pieces and never emits a split UTF-8 sequence
// (an incomplete sequence is held back until the next token completes it, or flush()).
class Detokenizer {
public:
    explicit Detokenizer(const Tokenizer& tokenizer, bool render_special = false);
    // Appends the complete text made available by `token` to *out.
    void push(int32_t token, std::string* out);
    // Appends whatever is held back; invalid bytes become U+FFFD.
    void flush(std::string* out);
    void reset();

private:
    const Tokenizer* tokenizer_;
    bool render_special_;
    bool first_ = true;
    std::string pending_;
};

//-----------------------------------------------------------------------------
// [SECTION] SAMPLER
//-----------------------------------------------------------------------------
// A fixed chain, in llama.cpp's default order: logit bias -> penalties (repetition, frequency,
// presence) -> DRY -> top-n-sigma -> top-k -> typical-p -> top-p -> min-p -> XTC -> temperature ->
// draw; with mirostat = 2 the truncation steps after DRY are replaced by temperature -> mirostat v2.
// A GBNF grammar (SamplerOptions::grammar) keeps what it refuses from being drawn: the chain draws
// once unmasked; a refused token makes it draw again among the candidates the chain kept that the
// grammar allows, or, when it allows none of them, from the whole vocabulary with every refused
// token masked (a scan of the vocabulary: ~130 ms per step for 152k tokens; grammar sampling
// allocates its parse stacks).
// temperature <= 0 means greedy (argmax after bias, penalties and DRY; ties go to the lowest id).
// Every step's "off" value is its default except top-k/top-p/min-p (llama.cpp's defaults). A value
// type: copy it to fork the RNG and mirostat state; the same seed and logits give the same tokens
// on every platform. check_sampler_options() says what is out of range (generate() refuses such
// options; a Sampler built from them anyway may give meaningless draws or ignore a bad grammar).

struct SamplerOptions {
    float temperature = 0.8f;
    int top_k = 40;                // 0 = off
    float top_p = 0.95f;           // 1 = off
    float min_p = 0.05f;           // 0 = off
    float typical_p = 1.0f;        // 1 = off: keep the tokens whose surprise is closest to the entropy, up to this mass
    float top_n_sigma = 0.0f;      // <= 0 = off: keep logits >= max - top_n_sigma * (std dev of the logits)
    // Penalties over the last repeat_last_n accepted tokens (llama.cpp semantics): repetition divides a
    // positive logit and multiplies a negative one; then logit -= count * frequency + (count > 0) * presence.
    float repeat_penalty = 1.0f;   // 1 = off
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    int repeat_last_n = 64;
    // XTC ("exclude top choices"): with probability xtc_probability, of the tokens with probability
    // >= xtc_threshold all but the least likely are removed (when there are at least two).
    float xtc_probability = 0.0f;  // 0 = off
    float xtc_threshold = 0.1f;
    // DRY ("don't repeat yourself"): a token that would extend a repeat of a sequence seen in the last
    // dry_last_n tokens by length L >= dry_allowed_length loses dry_multiplier * dry_base^(L - allowed).
    // Matches stop at tokens whose text contains a sequence breaker (needs set_vocabulary()).
    float dry_multiplier = 0.0f;   // 0 = off
    float dry_base = 1.75f;
    int dry_allowed_length = 2;
    int dry_last_n = 1024;
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};
    // Mirostat v2 (0 = off, 2 = on): keeps the surprise of the drawn tokens near mirostat_tau bits.
    int mirostat = 0;
    float mirostat_tau = 5.0f;
    float mirostat_eta = 0.1f;
    std::vector<std::pair<int32_t, float>> logit_bias;  // added to those tokens' logits first
    // A GBNF grammar (llama.cpp's format, start rule `root`): only tokens that keep the text a prefix
    // of a sentence of the grammar are drawn, and end-of-generation only once it is a whole one.
    // Needs Sampler::set_vocabulary() (generate() calls it). Empty = none.
    std::string grammar;
    uint64_t seed = 0;
};

// Status::invalid_argument naming the first option out of range (n_vocab > 0 also checks the ids
// of logit_bias). generate() and generate_batch() refuse such options.
MOE_API Status check_sampler_options(const SamplerOptions& options, int32_t n_vocab = 0);

namespace detail { class GrammarMatcher; struct SamplerVocab; }

class Sampler {
public:
    Sampler() : Sampler(SamplerOptions{}) {}
    explicit Sampler(const SamplerOptions& options);
    Sampler(const Sampler& other);  // copies the grammar's state too
    Sampler& operator=(const Sampler& other);
    Sampler(Sampler&&) noexcept;
    Sampler& operator=(Sampler&&) noexcept;
    ~Sampler();
    // Picks a token from `logits` (n_vocab floats; not modified). Allocates only on the first
    // call or when n_vocab grows.
    int32_t sample(const float* logits, int32_t n_vocab);
    // The candidates and probabilities sample() would draw from now, most likely first, without
    // drawing (no RNG or mirostat state is used: XTC is left out, mirostat truncates at its current mu;
    // a grammar masks the whole vocabulary first, as sample()'s last resort does).
    void distribution(const float* logits, int32_t n_vocab, std::vector<std::pair<int32_t, float>>* out);
    // Records a token (prompt or generated) for the penalties and DRY; the grammar moves on with the
    // token the last sample() returned.
    void accept(int32_t token);
    // The token texts the grammar matches, and DRY's sequence breakers (tokens whose text contains
    // one of dry_sequence_breakers).
    void set_vocabulary(const Tokenizer& tokenizer);
    // With a grammar: whether the text so far is a whole sentence of it.
    bool grammar_complete() const;
    void reset();  // forgets history and mirostat state and re-seeds
    // The dynamic state (RNG, token history, mirostat's mu) as bytes, and back into a sampler whose
    // options keep as many history tokens (Status::invalid_argument otherwise, or for bad bytes).
    // A grammar's parse state is not part of it: loading restarts the grammar at its beginning.
    void save_state(std::vector<uint8_t>* out) const;
    Status load_state(const uint8_t* data, size_t size);
    const SamplerOptions& options() const { return options_; }

private:
    struct Candidate { float logit; int32_t id; };
    double next_uniform();  // [0, 1)
    size_t filter(int32_t n_vocab, const float* logits, bool draw_steps);  // the chain up to the draw
    void apply_penalties(int32_t n_vocab);
    void apply_dry(int32_t n_vocab);
    SamplerOptions options_;
    uint64_t rng_state_[4] = {0, 0, 0, 0};
    std::vector<int32_t> history_;      // ring of the last max(repeat_last_n, dry_last_n) tokens
    size_t history_pos_ = 0, history_len_ = 0;
    float mirostat_mu_ = 0;
    std::vector<uint8_t> breaker_;      // per token id: its text holds a DRY sequence breaker
    std::vector<Candidate> candidates_;
    std::vector<double> probs_;
    std::vector<int32_t> scratch_, scratch2_;  // penalties' counts, DRY's reversed history and Z array
    std::vector<float> dry_penalty_;          // per token id, reset after use
    std::unique_ptr<detail::GrammarMatcher> grammar_;     // null: no grammar (or an invalid one)
    std::shared_ptr<const detail::SamplerVocab> vocab_;  // token texts and end-of-generation flags
    std::vector<float> masked_;                          // logits with the grammar's refusals at -inf
    int32_t grammar_pending_ = -1;                       // the token sample() returned, for accept()
    bool grammar_allows(int32_t token) const;
    int32_t sample_free(const float* logits, int32_t n_vocab);  // the chain without the grammar
    int32_t draw(size_t n);                                      // the last step of the chain
    const float* apply_grammar(const float* logits, int32_t n_vocab);  // masked_ (or logits when all pass)
};

//-----------------------------------------------------------------------------
// [SECTION] MODEL & SESSION
//-----------------------------------------------------------------------------

// A storage device on a virtual clock, for testing the expert store without disks: a read takes
// latency_s + bytes / bytes_per_s, reads queue one after another, and every layer's compute takes
// compute_s_per_layer. Loads then run on the calling thread and every time the store reports
// (wait, late) is virtual, so hit/miss/late accounting is exact and repeatable.
struct SimulatedStorage {
    double latency_s = 100e-6;
    double bytes_per_s = 2e9;
    double compute_s_per_layer = 0;
};

// Where the expert store (LoadOptions::mem_budget) keeps experts and how it loads them.
//   direct    pread with O_DIRECT into slots of its own, where the file system allows it (else as
//             buffered): the page cache stays free for the mapped non-expert weights. Fastest
//             measured (bench/RESULTS.md, "models larger than memory").
//   buffered  pread through the page cache into slots of its own.
//   mapped    no slots of its own: experts are used in place in the file mapping; a load is
//             posix_fadvise(WILLNEED) + madvise(MADV_POPULATE_READ) of its range, an eviction
//             madvise(MADV_DONTNEED) + posix_fadvise(DONTNEED). Needs a mapped file (use_mmap).
enum class ExpertReads : uint8_t { direct, buffered, mapped };
MOE_API const char* expert_reads_name(ExpertReads r);  // "direct", "buffered", "mapped"

struct LoadOptions {
    bool use_mmap = true;   // false: read the whole file into memory
    LogFn log = nullptr;    // optional; receives load diagnostics
    void* log_user = nullptr;
    // Memory budget in bytes for the weights; 0 = none (everything is mapped, as without the
    // store). With a budget, non-expert weights stay mapped and resident, and the routed experts'
    // matrices are read on demand into a bounded cache of (budget - non-expert bytes): each
    // expert's gate/up/down in one slot, all misses of a layer issued at once on io_threads
    // threads, predicted experts (SessionOptions::predict_depth) loaded ahead. Load fails with
    // invalid_argument, saying how much is needed, when the budget cannot hold the non-expert
    // weights plus n_expert_used experts.
    uint64_t mem_budget = 0;
    int32_t io_threads = 4;   // expert-store I/O threads (0: loads run on the thread that needs them)
    // How the store's experts get into memory (see ExpertReads).
    ExpertReads expert_reads = ExpertReads::direct;
    const SimulatedStorage* simulated_storage = nullptr;  // tests: virtual-clock storage (copied)
    // Load progress: (bytes, total) while the file is read (use_mmap false) or, mapped without a
    // mem_budget, while the mapped weights are read in once (so the first tokens do not wait for
    // page faults), every 64 MiB and once at the end. Returning false stops the load: Status::cancelled.
    bool (*progress)(void* user, uint64_t done, uint64_t total) = nullptr;
    void* progress_user = nullptr;
};

// What the expert store did since load (or reset_expert_store_stats()). A lookup is one (layer,
// expert) a token needed; it is a hit when the expert was loaded and ready, a miss when it had to
// be read then, late when a prefetch for it was still in flight.
struct ExpertStoreStats {
    uint64_t mem_budget_bytes = 0;  // LoadOptions::mem_budget (0: no store)
    uint64_t resident_bytes = 0;    // non-expert weights (mapped)
    uint64_t cache_bytes = 0;       // slots x slot bytes
    int32_t slots = 0;              // experts the cache holds at once
    ExpertReads reads = ExpertReads::direct;  // as used (direct falls back to buffered where refused)
    uint64_t lookups = 0, hits = 0, misses = 0, late = 0;
    uint64_t prefetch_hits = 0;     // hits (or late) on an expert loaded by a prediction, first use
    uint64_t prefetches = 0;        // experts loaded ahead on a prediction
    uint64_t prefetch_wasted = 0, prefetch_wasted_bytes = 0;  // prefetched, evicted before any use
    uint64_t bytes_read = 0;        // all expert bytes read
    double wait_seconds = 0;        // time the forward pass waited for experts (virtual when simulated)
    double hit_rate() const { return lookups ? (double)hits / (double)lookups : 0; }
};

// How router logits become expert weights (llama.cpp's expert_gating_func): softmax over all
// experts then top-k; sigmoid of each logit then top-k (a selection bias may steer the choice);
// softmax_weight: top-k of the logits, then a softmax over the k chosen (gpt-oss).
enum class ExpertGating : int32_t { softmax = 1, sigmoid = 2, softmax_weight = 3 };

// Hyper-parameters, all read from GGUF metadata.
struct ModelInfo {
    std::string architecture;  // "qwen3moe", "olmoe", "qwen2moe", "llama", "gpt-oss", "glm4moe", "deepseek2", "lfm2moe", "qwen35moe", "qwen3next"
    std::string name;          // general.name or ""
    int32_t n_vocab = 0, n_embd = 0, n_layer = 0, n_ctx_train = 0;  // n_layer: without NextN/MTP layers
    int32_t n_head = 0, n_head_kv = 0, head_dim = 0, n_rot = 0;
    int32_t n_expert = 0, n_expert_used = 0, n_ff = 0, n_ff_shared = 0;  // n_expert == 0: dense FFN
    // Multi-head latent attention (deepseek2): queries through a rank-q_lora_rank bottleneck (0: none),
    // keys and values from a shared latent of kv_lora_rank; head_dim = no-rope + n_rot dims of a
    // key, value_dim those of a value. The KV cache keeps the latent + n_rot per position.
    int32_t q_lora_rank = 0, kv_lora_rank = 0, value_dim = 0;
    int32_t n_expert_groups = 0, n_group_used = 0;  // grouped top-k: experts from the best groups only
    // Short-convolution layers (lfm2moe) in place of attention: a causal depthwise convolution over
    // the last shortconv_l_cache positions of each channel.
    int32_t shortconv_l_cache = 0;
    std::vector<bool> layer_conv;    // (n_layer) short-convolution layers
    // Gated delta-net layers (qwen35moe, qwen3next) in place of attention: linear attention whose state is
    // ssm_v_heads matrices of ssm_state x ssm_state per sequence, fed by a causal convolution of
    // ssm_conv_kernel taps over q, k (ssm_k_heads heads each) and v (ssm_v_heads heads).
    int32_t ssm_state = 0, ssm_k_heads = 0, ssm_v_heads = 0, ssm_conv_kernel = 0;
    std::vector<bool> layer_recurrent;  // (n_layer) gated delta-net layers
    bool attn_output_gate = false;   // attention output times sigmoid(a per-head gate from attn_q) (qwen35moe, qwen3next)
    std::vector<int32_t> rope_sections;  // IMROPE sections (qwen35moe); empty: plain RoPE
    int32_t n_layer_dense_lead = 0;  // the first layers have a dense FFN of width n_ff_dense
    int32_t n_ff_dense = 0;
    int32_t sliding_window = 0;      // > 0: layers with ModelInfo::layer_swa attend this many positions
    std::vector<bool> layer_swa;     // (n_layer) sliding-window layers (gpt-oss: every other one)
    ExpertGating expert_gating = ExpertGating::softmax;
    float expert_weights_scale = 1.f;  // routed weights are multiplied by this
    float rms_eps = 1e-6f, rope_freq_base = 10000.f, rope_freq_scale = 1.f;
    bool rope_yarn = false;          // YaRN frequencies and magnitude (rope.scaling.type = yarn)
    bool rope_neox = true;          // NEOX (i, i+d/2) pairs vs normal (2i, 2i+1) pairs
    bool expert_weights_norm = true;  // renormalise the top-k router weights to sum 1
    uint64_t weight_bytes = 0;         // bytes of all tensors
    uint64_t active_bytes_per_token = 0;  // bytes read per decoded token (only active experts)
};

namespace detail { struct ModelImpl; struct SessionImpl; }

// Read-only weights (mapped from the file) + tokenizer. Load once; share across threads: every
// const method is safe to call concurrently, and Sessions on several threads can use one Model.
// A Model is a handle to shared state: Sessions keep that state alive, so the handle may be moved
// or destroyed while they run. An unloaded Model (default-constructed, moved-from, or after a
// failed load) has valid() == false and its accessors return empty objects (a ModelInfo of zeros,
// a Tokenizer with valid() == false, a GgufFile without keys or tensors).
class Model {
public:
    Model();
    ~Model();
    Model(Model&&) noexcept;
    Model& operator=(Model&&) noexcept;

    // Status: io_error, invalid_file, unsupported (architecture or tensor type), missing_key,
    // missing_tensor, shape_mismatch; last_error() names the key or tensor.
    static Status load(const char* path, const LoadOptions& options, Model* out);
    // Same from a caller-owned buffer holding a GGUF file; it must outlive the Model.
    static Status load_memory(const void* data, size_t size, const LoadOptions& options, Model* out);

    bool valid() const;
    const ModelInfo& info() const;
    const Tokenizer& tokenizer() const;
    const GgufFile& file() const;
    // The expert store's counters (LoadOptions::mem_budget); zeros without a budget.
    ExpertStoreStats expert_store_stats() const;
    void reset_expert_store_stats() const;

private:
    friend class Session;
    std::shared_ptr<const detail::ModelImpl> impl_;
};

// How the router used the experts: per layer and expert, the tokens that chose it and the summed
// routing weights they gave it (the weights the FFN applies, after any renormalisation). Kept by
// every Session over all evaluated tokens; merge() adds sessions up for a whole run.
struct ExpertStats {
    int32_t n_layer = 0, n_expert = 0;
    uint64_t tokens = 0;           // tokens routed (through every layer)
    std::vector<uint64_t> count;   // [layer * n_expert + expert]
    std::vector<double> weight;    // [layer * n_expert + expert]
    void reset();                  // zeros, keeps the shape
    // Adds `other` (same shape, or this one empty); invalid_argument otherwise.
    Status merge(const ExpertStats& other);
    std::string to_csv() const;    // header "layer,expert,count,weight,share"; share = count / tokens
    std::string to_json() const;   // {"n_layer","n_expert","tokens","count":[[..]..],"weight":[[..]..]}
    // JSON when `path` ends in ".json", else CSV. Status: io_error.
    Status write(const char* path) const;
};

// Predicts which experts a later layer will route to, from the residual stream of an earlier one:
// SessionOptions::predictor replaces the built-in gate look-ahead (the later layer's ffn_norm and
// router applied to the current hidden state). One instance per Session; called on the thread
// that routes, so it needs no locking.
class ExpertPredictor {
public:
    virtual ~ExpertPredictor() = default;
    // While layer `layer` runs (after its attention), the experts of layer `target` (> layer) for
    // a token whose residual stream is `hidden` (n_embd floats): after attention, plus the shared
    // expert's gated output where the layer has one (the shared expert then runs before the
    // routed experts, which costs two more barriers per such layer). Writes up to `max` ids, most
    // likely first, and returns how many.
    virtual int predict(int layer, int target, const float* hidden, int32_t* experts, int max) = 0;
};

// Quality of the predictions (SessionOptions::predict_depth > 0), per target layer and look-ahead
// depth d (predicted while layer target - d ran), summed over tokens.
struct PredictionStats {
    int32_t n_layer = 0, max_depth = 0;
    // [(target * max_depth) + depth - 1]: experts predicted, predicted and routed, routed.
    std::vector<uint64_t> predicted, correct, routed;
    double recall(int target, int depth) const;     // correct / routed (recall@k at k = n_expert_used)
    double precision(int target, int depth) const;  // correct / predicted
    double recall(int depth) const;                 // over all layers
    double precision(int depth) const;
};

// The rows a layer's matmuls read, shown to SessionOptions::observe_inputs (importance matrices:
// moe-quantize --calib). attn_in: attention input (normed); attn_out: input of attn_output;
// ffn_in: FFN input (normed; router, dense and shared gate/up); expert_in: the same row once per
// routed expert it goes to (`expert` set); expert_hidden / shared_hidden / dense_hidden: the input
// of that FFN's down projection.
enum class MatInput { attn_in, attn_out, ffn_in, expert_in, expert_hidden, shared_hidden, dense_hidden };
typedef void (*InputObserverFn)(void* user, int32_t layer, MatInput what, int32_t expert, const float* row, int64_t n);

struct SessionOptions {
    // KV-cache positions; 0 = min(model's training context, 4096); at most 4,194,304. create()
    // reserves kv_cache_bytes() (K and V of kv_type); the memory is committed as positions fill.
    int32_t n_ctx = 0;
    int32_t n_threads = 0;  // 0 = hardware threads (capped at 16)
    int32_t n_batch = 0;    // max tokens per internal forward chunk during prefill; 0 = 64
    // Dot products against float32 activations instead of quantizing each matmul input to 8 bits
    // (Q8_0/Q8_K, as llama.cpp does). Closer to a float reference (transformers), slower.
    bool float_activations = false;
    // KV-cache element type: F32, or Q8_0 (head_dim a multiple of 32; 3.8x smaller; queries are
    // quantized to Q8_0 for the scores, as llama.cpp does with a q8_0 cache).
    TensorType kv_type = TensorType::f32;
    // Accumulate the wall time of each forward-pass phase (Session::profile). Costs ~1 us/layer.
    bool profile = false;
    // Bytes ahead of the current weight row that matmuls prefetch; -1 = default (2048), 0 = off.
    int32_t prefetch_distance = -1;
    // Chunks of many tokens (prefill) multiply a matrix by all the tokens that read it at once
    // (int8 panels, where the CPU and the weight type have a panel kernel) when at least this many
    // tokens read it; 0 = default (8), -1 = never (row kernels only: a token's results then do not
    // depend on how the prompt was split into chunks). Single-token decode and eval_batch always use
    // the row kernels.
    int32_t gemm_min_tokens = 0;
    // Expert prediction: while layer l runs, predict the experts of layers l+1 .. l+predict_depth
    // (0 = off, at most 4) for each decoded token (eval() of at most 4 tokens; a prompt batch
    // touches most experts anyway), predict_extra more than n_expert_used per layer (over-fetch),
    // and score them in prediction_stats(). predictor: null = gate look-ahead. Logits and tokens
    // are the same with prediction on or off.
    int32_t predict_depth = 0;
    int32_t predict_extra = 0;
    std::shared_ptr<ExpertPredictor> predictor;
    // Called with every matmul input row (see MatInput), from one thread at a time, tokens in
    // order; costs two extra barriers per phase while set. For calibration, not for serving.
    InputObserverFn observe_inputs = nullptr;
    void* observe_user = nullptr;
    // Called by eval() after each chunk of at most n_batch tokens, with the tokens of this call
    // evaluated so far and its total; returning false stops eval() there (Status::cancelled; the
    // chunks done stay in the KV cache). On the thread that called eval().
    bool (*progress)(void* user, size_t done, size_t total) = nullptr;
    void* progress_user = nullptr;
};

// Bytes of the KV cache a Session with this n_ctx (0 = the default) reserves for the model:
// 8 * n_attention_layers * n_ctx * n_head_kv * head_dim for F32 (MLA models: 4 * n_layer * n_ctx *
// (kv_lora_rank + n_rot), the latent and the rope key), 34/32 of that / 4 for Q8_0, plus the fixed
// float32 states of delta-net layers (qwen35moe). 0 for an unloaded model. Not included:
// short-convolution layers' input rings (n_batch + 64 positions of n_embd floats).
MOE_API uint64_t kv_cache_bytes(const ModelInfo& info, int32_t n_ctx, TensorType kv_type = TensorType::f32);
constexpr int32_t kMaxContextLength = 1 << 22;  // SessionOptions::n_ctx limit

// Wall time of one forward-pass phase, summed over the eval() calls since the last reset_profile().
struct PhaseTime {
    const char* phase;  // e.g. "qkv", "attention", "expert_up"
    double seconds;     // time from the end of the previous phase to the end of this one, all threads
};

// Per-sequence state: KV cache, scratch, thread pool. One Session per thread; the Model may be
// shared. All scratch is sized at create(): eval() of one token never allocates. The Session holds
// a share of the model's state, so the Model handle it was created from may be moved or destroyed
// first. A default-constructed (not created) Session answers with empty values: logits() and
// last_expert_ids() null, position() 0, model() an unloaded Model, eval() invalid_argument.
class Session {
public:
    Session();
    ~Session();
    Session(Session&&) noexcept;
    Session& operator=(Session&&) noexcept;

    // Status: invalid_argument (bad options, invalid model), out_of_memory.
    static Status create(const Model& model, const SessionOptions& options, Session* out);

    // Appends `n` tokens at the current position and runs the forward pass. If `all_logits` is
    // non-null it receives n * n_vocab floats (row i = logits after tokens[i]); logits() always
    // holds the last row. Status: context_full (position + n > n_ctx; checked before `tokens` is
    // read, and nothing is evaluated then), invalid_argument (token id out of range, n == 0).
    Status eval(const int32_t* tokens, size_t n, float* all_logits = nullptr);
    // Batched decode: token i appended to sessions[i], for n distinct sessions of one Model, in
    // passes of up to sessions[0]'s n_batch tokens on sessions[0]'s threads: an expert's weights are
    // read once per pass for every sequence routed to it. Afterwards each session's logits() and
    // position() and last_expert_ids() are what its own eval(&tokens[i], 1) would give, bit for bit,
    // when the sessions share their options (sessions[0]'s threads and activation settings are the
    // ones used), except that attention over a cache longer than 256 positions may add its KV
    // splits in another order (last-bit differences); expert_stats() of sessions[0] counts the batch.
    // No other thread may use these sessions meanwhile. Status: invalid_argument (a null, repeated,
    // uncreated or other-model session, a token out of range, n == 0), context_full (a session at
    // n_ctx; checked before anything is evaluated).
    static Status eval_batch(Session* const* sessions, const int32_t* tokens, size_t n);
    // Asks the eval() (or eval_batch() led by this session) running on another thread to stop: it
    // looks between layers, drops the chunk in flight (position() stays at the last complete chunk,
    // logits() unchanged) and returns Status::cancelled. Safe from any thread; a request made while
    // no eval() runs stops the next one.
    void cancel();
    const float* logits() const;  // n_vocab floats after the last evaluated token
    int32_t position() const;     // tokens in the KV cache
    int32_t n_ctx() const;
    void reset();                 // empties the KV cache
    // Keeps only the first `n` positions (n <= position()).
    Status truncate(int32_t n);
    // The token at each position 0 .. position() - 1 (null for an uncreated Session).
    const int32_t* tokens() const;
    // Prefix reuse: makes the cache hold exactly tokens[0, n). Keeps the longest prefix the cache
    // shares with them (at most n - 1 positions, so the last token is evaluated and logits() is its
    // row), drops the rest and evaluates the remainder; *reused (may be null) gets the positions
    // kept. With SessionOptions::gemm_min_tokens = -1 the result is bit-identical to reset() + eval().
    // Status: as eval(); after a failure the cache holds the kept prefix and the chunks evaluated.
    Status eval_prompt(const int32_t* tokens, size_t n, size_t* reused = nullptr);
    // The session's state: position, the tokens and KV-cache rows of positions 0 .. position() - 1,
    // the last logits, and (if given) a sampler's state (Sampler::save_state), to a file or a buffer
    // (native byte order). Loading needs a session of the same model - checked against a fingerprint
    // of the GGUF header (metadata and tensor layout) - whose n_ctx holds the saved position; a
    // continuation after loading is identical to one without the round trip. Status: io_error,
    // invalid_file (not a state file, truncated, another model), context_full, invalid_argument.
    Status save_state(const char* path, const Sampler* sampler = nullptr) const;
    Status load_state(const char* path, Sampler* sampler = nullptr);
    Status save_state(std::vector<uint8_t>* out, const Sampler* sampler = nullptr) const;
    Status load_state(const uint8_t* data, size_t size, Sampler* sampler = nullptr);
    const Model& model() const;  // a handle sharing the model's state (valid while the Session is)
    // Experts chosen for the last evaluated token: n_layer * n_expert_used ids (layer-major); -1 for
    // the dense layers of a MoE model.
    const int32_t* last_expert_ids() const;
    // With SessionOptions::profile: writes up to `max` phase times and returns how many phases
    // there are (0 when profiling is off).
    int profile(PhaseTime* out, int max) const;
    void reset_profile();
    // Router statistics of every token evaluated since create() or reset_expert_stats() (not
    // cleared by reset()). Shape n_layer x n_expert; empty for a dense model or an uncreated Session.
    const ExpertStats& expert_stats() const;
    void reset_expert_stats();
    // With SessionOptions::predict_depth > 0: recall and precision of the expert predictions.
    const PredictionStats& prediction_stats() const;
    void reset_prediction_stats();

private:
    std::unique_ptr<detail::SessionImpl> impl_;
    Model model_;  // shares the model's weights; empty until create()
};

//-----------------------------------------------------------------------------
// [SECTION] GENERATION
//-----------------------------------------------------------------------------

struct GenerateOptions {
    int32_t max_tokens = 128;          // tokens to generate
    SamplerOptions sampler;
    std::vector<std::string> stop;     // stop strings (not included in the streamed text)
    bool stop_at_end_of_generation = true;
};

struct GenerateResult {
    std::vector<int32_t> tokens;   // generated token ids
    std::string text;              // generated text (without a matched stop string)
    int32_t n_prompt = 0;
    double prompt_seconds = 0, decode_seconds = 0;
    bool stopped_by_eog = false, stopped_by_string = false, stopped_by_callback = false;
    bool stopped_by_grammar = false;  // the grammar allowed no token (it can neither go on nor end)
};

// Called with each newly complete piece of text (UTF-8 boundaries respected; text that might be
// the start of a stop string is held back). Return false to stop.
typedef bool (*StreamFn)(void* user, int32_t token, const char* text, size_t size);

// Evaluates `prompt` (appended to the session's KV cache), then samples up to max_tokens.
// `on_token` and `result` may be null.
MOE_API Status generate(Session& session, const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        StreamFn on_token, void* user, GenerateResult* result);

// Batched generation: prompts[i] continues sessions[i] (distinct sessions of one Model) with its own
// sampler (options[i], or options[0] for all). Each prompt is evaluated on its session, then every
// step samples one token per unfinished sequence and decodes them all in one Session::eval_batch
// pass on sessions[0]'s threads; a sequence leaves the batch when it stops. Each result (and the
// text streamed for it) is what generate() on that session alone would give. on_token gets the
// sequence index; results may be null. decode_seconds is the batch's wall time. Status: as
// generate(); after a failed pass (e.g. context_full) every unfinished sequence ends with it.
typedef bool (*BatchStreamFn)(void* user, size_t seq, int32_t token, const char* text, size_t size);
MOE_API Status generate_batch(Session* const* sessions, const std::vector<std::vector<int32_t>>& prompts, const std::vector<GenerateOptions>& options,
                              BatchStreamFn on_token, void* user, std::vector<GenerateResult>* results);

//-----------------------------------------------------------------------------
// [SECTION] CHAT TEMPLATES
//-----------------------------------------------------------------------------

struct ChatTemplateOptions {
    bool add_generation_prompt = true;
    int enable_thinking = -1;          // -1: not defined in the template context; 0 / 1: false / true
    std::string tools_json;            // JSON array of tool definitions (OpenAI format); empty = no `tools` variable
    std::string bos_token, eos_token;  // the template's bos_token / eos_token strings
    std::string extra_context_json;    // JSON object whose keys become extra template variables; empty = none
    int64_t strftime_now_time = -1;    // what strftime_now() formats: seconds since the Unix epoch, as UTC;
                                       // -1: the current local time (reproducible prompts and tests pin it)
};

// Renders a Jinja chat template for `messages_json`, a JSON array of OpenAI-style messages
// ({"role", "content", optional "tool_calls", "reasoning_content", "name", "tool_call_id"}).
// Status::invalid_argument for bad JSON, a template syntax error, a runtime error or
// raise_exception(); Status::unsupported naming the construct (filter, test, statement, method)
// the template uses that this renderer lacks. last_error() says what and where (line).
MOE_API Status render_chat_template(const std::string& template_source, const std::string& messages_json,
                                    const ChatTemplateOptions& options, std::string* out);

// A GBNF grammar (for SamplerOptions::grammar) accepting the JSON documents `schema_json` (a JSON
// Schema) describes: type, properties (in their order; required ones always), additionalProperties,
// items, minItems/maxItems, minLength/maxLength, enum, const, anyOf/oneOf, $ref to #/$defs/...
// Keywords it cannot express (pattern, format, minimum, ...) give Status::unsupported naming them.
MOE_API Status json_schema_to_grammar(const std::string& schema_json, std::string* gbnf);

}  // namespace moe

#endif  // MOE_INFER_H

// ---- Stop here if you only need the API ----

#if defined(__INTELLISENSE__) || defined(__JETBRAINS_IDE__)
#define MOE_INFER_IMPLEMENTATION
#endif

#if defined(MOE_INFER_IMPLEMENTATION) && !defined(MOE_INFER_IMPLEMENTATION_INCLUDED)
#define MOE_INFER_IMPLEMENTATION_INCLUDED

//-----------------------------------------------------------------------------
// [SECTION] CONFIG DEFAULTS & PLATFORM
//-----------------------------------------------------------------------------
// >>config

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <cctype>
#include <functional>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>

#ifndef MOE_ASSERT
#include <cassert>
#define MOE_ASSERT(x) assert(x)
#endif

// Out-of-class member functions of the public classes: inline under MOE_INFER_STATIC, so that
// several translation units may each hold the implementation.
#if defined(MOE_INFER_STATIC)
#define MOE_DETAIL_MEMBER inline
#else
#define MOE_DETAIL_MEMBER
#endif

#if defined(MOE_MALLOC) != defined(MOE_FREE)
#error "define both MOE_MALLOC and MOE_FREE, or neither"
#endif

#if !defined(MOE_NO_MMAP) && (defined(__unix__) || defined(__APPLE__))
#define MOE_DETAIL_HAS_MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#else
#define MOE_DETAIL_HAS_MMAP 0
#endif
// Windows (MSVC, MinGW-w64): file mapping through the Win32 API. NOMINMAX keeps windows.h from
// defining min/max macros, which would break std::min; define it yourself if windows.h comes first.
#if !defined(MOE_NO_MMAP) && defined(_WIN32)
#define MOE_DETAIL_HAS_WIN32_MAP 1
#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
#else
#define MOE_DETAIL_HAS_WIN32_MAP 0
#endif

// MinGW-w64's "win32" thread model has no std::thread/std::mutex before GCC 13 (libstdc++ then
// lacks gthreads): run single-threaded there rather than fail to build; "posix" MinGW has threads.
#if !defined(MOE_NO_THREADS) && !(defined(__GLIBCXX__) && !defined(_GLIBCXX_HAS_GTHREADS))
#include <thread>
#define MOE_DETAIL_HAS_THREADS 1
#else
#define MOE_DETAIL_HAS_THREADS 0
#endif

#if defined(_OPENMP) && !defined(MOE_NO_OPENMP) && MOE_DETAIL_HAS_THREADS
#include <omp.h>
#define MOE_DETAIL_HAS_OPENMP 1
#else
#define MOE_DETAIL_HAS_OPENMP 0
#endif

#include <chrono>

// x86-64 kernels are compiled with GCC/Clang target attributes (KERNELS: X86); MOE_NO_AVX2 and
// MOE_NO_AVX512 only take their level out of dispatch (AVX-512 kernels also use AVX2 instructions).
#if !defined(MOE_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MOE_DETAIL_HAS_X86 1
#else
#define MOE_DETAIL_HAS_X86 0
#endif
#if MOE_DETAIL_HAS_X86 && !defined(MOE_NO_AVX2)
#define MOE_DETAIL_HAS_AVX2 1
#else
#define MOE_DETAIL_HAS_AVX2 0
#endif
#if MOE_DETAIL_HAS_X86 && !defined(MOE_NO_AVX512)
#define MOE_DETAIL_HAS_AVX512 1
#else
#define MOE_DETAIL_HAS_AVX512 0
#endif
// AMX tiles need the kernel's permission (arch_prctl, Linux 5.16+) and a compiler that knows the
// instructions (GCC 11, Clang 12); elsewhere the AVX-512 VNNI panels serve.
#if MOE_DETAIL_HAS_AVX512 && defined(__linux__) && !defined(MOE_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define MOE_DETAIL_HAS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define MOE_DETAIL_HAS_AMX 0
#endif

// AArch64 with GCC/Clang: NEON is part of the base ISA, so its kernels need no detection; the
// dotprod ones are chosen at run time (KERNELS: ARM). Big-endian AArch64 is left to the scalar
// kernels: the GGUF block layouts are little-endian byte streams.
#if !defined(MOE_NO_SIMD) && !defined(MOE_NO_NEON) && defined(__aarch64__) && !defined(__AARCH64EB__) && \
    (defined(__GNUC__) || defined(__clang__))
#define MOE_DETAIL_HAS_NEON 1
#else
#define MOE_DETAIL_HAS_NEON 0
#endif

//-----------------------------------------------------------------------------
// [SECTION] UTILITIES
//-----------------------------------------------------------------------------
// >>util  fp16/bf16 conversion (exact, portable), overflow-checked arithmetic, aligned buffers.

namespace moe {
namespace detail {

inline float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { mant <<= 1; ++e; } while (!(mant & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round-to-nearest-even float -> fp16, as F16C and ggml's reference do.
inline uint16_t f32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
    if (absx >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to >= 65520: inf
    if (absx < 0x38800000) {  // below the smallest normal fp16: subnormal or zero
        if (absx < 0x33000000) return (uint16_t)sign;  // < 2^-25 rounds to 0
        uint32_t mant = (absx & 0x7fffff) | 0x800000;
        int shift = 113 - (int)(absx >> 23) + 13;  // 126 - exp + 1 ... bits to drop
        uint32_t half = 1u << (shift - 1);
        uint32_t rest = mant & ((1u << shift) - 1);
        uint32_t r = mant >> shift;
        if (rest > half || (rest == half && (r & 1))) ++r;
        return (uint16_t)(sign | r);
    }
    uint32_t r = absx - 0x38000000;  // rebias exponent 127 -> 15
    uint32_t rest = r & 0x1fff;
    r >>= 13;
    if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) ++r;
    return (uint16_t)(sign | r);
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 64);  // quiet NaN
    return (uint16_t)((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

// Overflow-checked arithmetic for sizes that come from files.
inline bool add_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    if (a > UINT64_MAX - b) return true;
    *out = a + b;
    return false;
}
inline bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    if (a != 0 && b > UINT64_MAX / a) return true;
    *out = a * b;
    return false;
}

// Native-byte-order serialisation of plain values (session and sampler state).
struct ByteWriter {
    std::vector<uint8_t>* out;
    explicit ByteWriter(std::vector<uint8_t>* o) : out(o) {}
    void bytes(const void* p, size_t n) {
        if (n) out->insert(out->end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
    }
    template <typename T> void put(T v) { bytes(&v, sizeof v); }
};
// Reads refuse to step past the end (a truncated or hostile buffer gives false, never a bad read).
struct ByteReader {
    const uint8_t* p;
    size_t n;
    ByteReader(const uint8_t* data, size_t size) : p(data), n(data ? size : 0) {}
    template <typename T> bool get(T* v) {
        if (n < sizeof(T)) return false;
        std::memcpy(v, p, sizeof(T));
        p += sizeof(T);
        n -= sizeof(T);
        return true;
    }
    size_t left() const { return n; }
    bool at_end() const { return n == 0; }
    const uint8_t* skip(size_t k) {  // caller checked left() >= k
        const uint8_t* at = p;
        p += k;
        n -= k;
        return at;
    }
};

// 64-byte aligned float/byte buffer, allocated once (session scratch, KV cache).
template <typename T>
struct AlignedBuffer {
    T* data = nullptr;
    size_t size = 0;
    AlignedBuffer() = default;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer() { release(); }
    // Zeroed unless `zero` is false: then untouched pages stay unallocated until first written
    // (how the KV cache of a large n_ctx costs memory only as positions fill).
    bool allocate(size_t n, bool zero = true) {
        release();
        if (n == 0) return true;
        if (n > SIZE_MAX / sizeof(T) - 64) return false;
        size_t bytes = (n * sizeof(T) + 63) & ~(size_t)63;
#if defined(MOE_MALLOC)
        void* p = MOE_MALLOC(bytes);
#elif defined(_WIN32)
        void* p = _aligned_malloc(bytes, 64);  // MSVC and MinGW have no std::aligned_alloc
#else
        void* p = std::aligned_alloc(64, bytes);
#endif
        if (!p) return false;
        if (zero) std::memset(p, 0, bytes);
        data = static_cast<T*>(p);
        size = n;
        return true;
    }
    void release() {
        if (!data) return;
#if defined(MOE_MALLOC)
        MOE_FREE(data);
#elif defined(_WIN32)
        _aligned_free(data);
#else
        std::free(data);
#endif
        data = nullptr;
        size = 0;
    }
    T& operator[](size_t i) { return data[i]; }
    const T& operator[](size_t i) const { return data[i]; }
};

inline double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

//-----------------------------------------------------------------------------
// [SECTION] STATUS & LOGGING
//-----------------------------------------------------------------------------
// >>status  last_error() is thread-local so concurrent sessions never see each other's errors.

inline std::string& last_error_storage() {
    static thread_local std::string message;
    return message;
}

// Appends `s` with control bytes and ill-formed UTF-8 written as \xNN: messages quote names and
// strings from files, and those must not reach a terminal or a log raw.
inline void append_escaped(std::string* out, const char* s) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(s);
    while (*p) {
        const unsigned char b = *p;
        int len = 0;
        unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
        if (b >= 0x20 && b < 0x7f) len = 1;
        else if (b >= 0xc2 && b <= 0xdf) len = 2;
        else if (b >= 0xe0 && b <= 0xef) { len = 3; if (b == 0xe0) lo = 0xa0; if (b == 0xed) hi = 0x9f; }
        else if (b >= 0xf0 && b <= 0xf4) { len = 4; if (b == 0xf0) lo = 0x90; if (b == 0xf4) hi = 0x8f; }
        for (int i = 1; i < len; ++i, lo = 0x80, hi = 0xbf)
            if (p[i] < lo || p[i] > hi) len = 0;
        if (len > 0) {
            out->append(reinterpret_cast<const char*>(p), (size_t)len);
            p += len;
        } else {
            char hex[8];
            std::snprintf(hex, sizeof hex, "\\x%02x", b);
            out->append(hex);
            ++p;
        }
    }
}

// MinGW's libstdc++ formats with its C99 printf (so %zu works); the attribute has to say so.
#if defined(__MINGW32__)
__attribute__((format(gnu_printf, 2, 3)))
#elif defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 2, 3)))
#endif
inline Status fail(Status status, const char* format, ...) {
    char buffer[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(buffer, sizeof buffer, format, args);
    va_end(args);
    std::string& message = last_error_storage();
    message.clear();
    append_escaped(&message, buffer);
    return status;
}

}  // namespace detail

MOE_API const char* status_string(Status s) {
    switch (s) {
#define MOE_DETAIL_STATUS_CASE(name, text) case Status::name: return text;
        MOE_STATUS_LIST(MOE_DETAIL_STATUS_CASE)
#undef MOE_DETAIL_STATUS_CASE
    }
    return "unknown status";
}

MOE_API const char* last_error() { return detail::last_error_storage().c_str(); }

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] FILE MAPPING
//-----------------------------------------------------------------------------
// >>file  A read-only view of a whole file: mmap on POSIX, MapViewOfFile on Windows (pages come
// in on demand and are shared by processes), otherwise one read into an owned buffer.

namespace moe {
namespace detail {

inline Status write_whole_file(const char* path, const void* data, size_t size) {
    std::FILE* f = std::fopen(path, "wb");
    if (!f) return fail(Status::io_error, "cannot create '%s': %s", path, std::strerror(errno));
    const bool ok = std::fwrite(data, 1, size, f) == size;
    if (std::fclose(f) != 0 || !ok) return fail(Status::io_error, "write error on '%s'", path);
    return Status::ok;
}

struct FileView {
    const uint8_t* data = nullptr;
    size_t size = 0;
    bool mapped = false;
    std::vector<uint8_t> owned;

    FileView() = default;
    FileView(const FileView&) = delete;
    FileView& operator=(const FileView&) = delete;
    ~FileView() {
#if MOE_DETAIL_HAS_MMAP
        if (mapped && data) munmap(const_cast<uint8_t*>(data), size);
#elif MOE_DETAIL_HAS_WIN32_MAP
        if (mapped && data) UnmapViewOfFile(data);
#endif
    }

    Status open(const char* path, bool use_mmap, bool (*progress)(void*, uint64_t, uint64_t) = nullptr, void* user = nullptr) {
        if (!path) return fail(Status::invalid_argument, "null path");
#if MOE_DETAIL_HAS_MMAP
        if (use_mmap) {
            int fd = ::open(path, O_RDONLY);
            if (fd < 0) return fail(Status::io_error, "cannot open '%s': %s", path, std::strerror(errno));
            struct stat st;
            if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
                ::close(fd);
                return fail(Status::io_error, "'%s' is not a regular file", path);
            }
            size = (size_t)st.st_size;
            if (size == 0) {
                ::close(fd);
                return fail(Status::invalid_file, "'%s' is empty", path);
            }
            void* p = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
            ::close(fd);
            if (p == MAP_FAILED) return fail(Status::io_error, "cannot map '%s': %s", path, std::strerror(errno));
            data = static_cast<const uint8_t*>(p);
            mapped = true;
            return Status::ok;
        }
#elif MOE_DETAIL_HAS_WIN32_MAP
        if (use_mmap) return open_win32(path);
#else
        (void)use_mmap;
#endif
        std::FILE* f = std::fopen(path, "rb");
        if (!f) return fail(Status::io_error, "cannot open '%s'", path);
        std::vector<uint8_t> bytes;
        uint64_t total = 0;
        if (progress && std::fseek(f, 0, SEEK_END) == 0) {
            const long end = std::ftell(f);
            total = end > 0 ? (uint64_t)end : 0;
            std::fseek(f, 0, SEEK_SET);
            bytes.reserve((size_t)total);
        }
        uint8_t chunk[1 << 16];
        size_t got;
        uint64_t reported = 0;
        while ((got = std::fread(chunk, 1, sizeof chunk, f)) > 0) {
            bytes.insert(bytes.end(), chunk, chunk + got);
            if (progress && bytes.size() - reported >= (64u << 20)) {
                reported = bytes.size();
                if (!progress(user, reported, std::max<uint64_t>(total, reported))) {
                    std::fclose(f);
                    return fail(Status::cancelled, "loading '%s' was stopped by the progress callback", path);
                }
            }
        }
        bool error = std::ferror(f) != 0;
        std::fclose(f);
        if (error) return fail(Status::io_error, "read error on '%s'", path);
        if (bytes.empty()) return fail(Status::invalid_file, "'%s' is empty", path);
        owned.swap(bytes);
        data = owned.data();
        size = owned.size();
        return Status::ok;
    }

#if MOE_DETAIL_HAS_WIN32_MAP
    // `path` is UTF-8 (as everywhere in the API), so it goes through the wide-character calls.
    Status open_win32(const char* path) {
        int wide_len = MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, nullptr, 0);
        if (wide_len <= 0) return fail(Status::io_error, "cannot open '%s': not a valid UTF-8 path", path);
        std::vector<wchar_t> wide((size_t)wide_len);
        MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, wide.data(), wide_len);
        HANDLE file = CreateFileW(wide.data(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING,
                                  FILE_ATTRIBUTE_NORMAL, nullptr);
        if (file == INVALID_HANDLE_VALUE)
            return fail(Status::io_error, "cannot open '%s' (Windows error %lu)", path, (unsigned long)GetLastError());
        BY_HANDLE_FILE_INFORMATION info;
        LARGE_INTEGER file_size;
        if (!GetFileInformationByHandle(file, &info) || (info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) ||
            !GetFileSizeEx(file, &file_size)) {
            CloseHandle(file);
            return fail(Status::io_error, "'%s' is not a regular file", path);
        }
        if (file_size.QuadPart == 0) {
            CloseHandle(file);
            return fail(Status::invalid_file, "'%s' is empty", path);
        }
        if ((unsigned long long)file_size.QuadPart > (unsigned long long)SIZE_MAX) {
            CloseHandle(file);
            return fail(Status::io_error, "'%s' is larger than the address space", path);
        }
        HANDLE mapping = CreateFileMappingW(file, nullptr, PAGE_READONLY, 0, 0, nullptr);
        CloseHandle(file);  // the mapping keeps the file open
        if (!mapping) return fail(Status::io_error, "cannot map '%s' (Windows error %lu)", path, (unsigned long)GetLastError());
        void* p = MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, 0);
        unsigned long map_error = p ? 0ul : (unsigned long)GetLastError();
        CloseHandle(mapping);  // the view keeps the mapping alive
        if (!p) return fail(Status::io_error, "cannot map '%s' (Windows error %lu)", path, map_error);
        data = static_cast<const uint8_t*>(p);
        size = (size_t)file_size.QuadPart;
        mapped = true;
        return Status::ok;
    }
#endif
};

//-----------------------------------------------------------------------------
// [SECTION] GGUF READER & WRITER
//-----------------------------------------------------------------------------
// >>gguf  Layout: magic "GGUF", u32 version, i64 n_tensors, i64 n_kv, KV pairs, tensor infos,
// padding to general.alignment, data. Strings are u64 length + bytes. Every read goes through
// Cursor, which refuses to step past the end; counts are capped before anything is reserved.

constexpr uint64_t kGgufMaxStringBytes = 1ull << 30;
constexpr uint64_t kGgufMaxTensors = 1ull << 20;
constexpr uint64_t kGgufMaxKeys = 1ull << 20;

struct Cursor {
    const uint8_t* base;
    size_t size;
    size_t pos = 0;
    bool read(void* dst, size_t n) {
        if (n > size - pos) return false;
        std::memcpy(dst, base + pos, n);
        pos += n;
        return true;
    }
    bool skip(uint64_t n) {
        if (n > size - pos) return false;
        pos += (size_t)n;
        return true;
    }
    template <typename T> bool get(T* v) { return read(v, sizeof(T)); }
    bool string(GgufString* s) {
        uint64_t n;
        if (!get(&n) || n > kGgufMaxStringBytes || n > size - pos) return false;
        s->data = reinterpret_cast<const char*>(base + pos);
        s->size = (size_t)n;
        pos += (size_t)n;
        return true;
    }
};

inline size_t gguf_scalar_size(GgufValueType t) {
    switch (t) {
        case GgufValueType::u8: case GgufValueType::i8: case GgufValueType::boolean: return 1;
        case GgufValueType::u16: case GgufValueType::i16: return 2;
        case GgufValueType::u32: case GgufValueType::i32: case GgufValueType::f32: return 4;
        case GgufValueType::u64: case GgufValueType::i64: case GgufValueType::f64: return 8;
        default: return 0;
    }
}

// Decodes one fixed-size scalar at p into both integer and float views.
inline void gguf_decode_scalar(GgufValueType t, const uint8_t* p, uint64_t* as_u64, double* as_f64) {
    switch (t) {
        case GgufValueType::u8: case GgufValueType::boolean: { uint8_t v = p[0]; *as_u64 = v; *as_f64 = v; break; }
        case GgufValueType::i8: { int8_t v; std::memcpy(&v, p, 1); *as_u64 = (uint64_t)(int64_t)v; *as_f64 = v; break; }
        case GgufValueType::u16: { uint16_t v; std::memcpy(&v, p, 2); *as_u64 = v; *as_f64 = v; break; }
        case GgufValueType::i16: { int16_t v; std::memcpy(&v, p, 2); *as_u64 = (uint64_t)(int64_t)v; *as_f64 = v; break; }
        case GgufValueType::u32: { uint32_t v; std::memcpy(&v, p, 4); *as_u64 = v; *as_f64 = v; break; }
        case GgufValueType::i32: { int32_t v; std::memcpy(&v, p, 4); *as_u64 = (uint64_t)(int64_t)v; *as_f64 = v; break; }
        case GgufValueType::f32: { float v; std::memcpy(&v, p, 4); *as_f64 = v; *as_u64 = 0; break; }
        case GgufValueType::u64: { uint64_t v; std::memcpy(&v, p, 8); *as_u64 = v; *as_f64 = (double)v; break; }
        case GgufValueType::i64: { int64_t v; std::memcpy(&v, p, 8); *as_u64 = (uint64_t)v; *as_f64 = (double)v; break; }
        case GgufValueType::f64: { double v; std::memcpy(&v, p, 8); *as_f64 = v; *as_u64 = 0; break; }
        default: *as_u64 = 0; *as_f64 = 0; break;
    }
}

inline bool gguf_is_integer(GgufValueType t) {
    return t == GgufValueType::u8 || t == GgufValueType::i8 || t == GgufValueType::u16 || t == GgufValueType::i16 ||
           t == GgufValueType::u32 || t == GgufValueType::i32 || t == GgufValueType::u64 || t == GgufValueType::i64;
}
inline bool gguf_is_signed(GgufValueType t) {
    return t == GgufValueType::i8 || t == GgufValueType::i16 || t == GgufValueType::i32 || t == GgufValueType::i64;
}

// The per-type table: one row per tensor type this build reads, defined in TYPE TABLE after the
// kernels it names. A new type is a block struct, its _ref functions, its SIMD kernels and one row.
// q8_0_rot: Q8_0 of the activation rotated per 128 (TQ3/TQ4).
// q8_gemm / q8_gemm_k: the panel kernels' activations (GEMM PANELS) with the codes and scales of
// q8_0 and q8_1 / of q8_k, used for chunks of many tokens.
// q8_0_split: Q8_0 re-laid per 4 blocks in the nibble order of 4-bit blocks (the AVX-512 VNNI
// kernels of Q4_0 and its kin: no shuffles to put nibbles in element order).
enum class ActFormat { f32, q8_0, q8_k, q8_1, q8_0_rot, q8_gemm, q8_gemm_k, q8_0_split };  // what a weight type's kernels dot against
constexpr int kActFormatCount = 8;  // at most 8: sets of formats are uint8_t bit sets
constexpr int kIsaCount = (int)Isa::neon_dotprod + 1;

typedef float (*VecDotFn)(const void* w, const void* x, int64_t n);      // one row . one activation row
typedef void (*QuantizeRowFn)(const float* x, void* dst, int64_t n);     // n floats -> blocks
typedef void (*DequantizeRowFn)(const void* src, float* y, int64_t n);  // blocks -> n floats
typedef void (*QuantizeWeightedFn)(const float* x, void* dst, int64_t n, const float* importance);

struct QuantType {
    TensorType type;
    const char* name;
    int block_elems, block_bytes;    // block_bytes = sizeof(the block struct)
    ActFormat act;                   // activation format of the integer kernels (as llama.cpp)
    QuantizeRowFn quantize_ref;      // file quantizer (GgufWriter, tools)
    DequantizeRowFn dequantize_ref;
    VecDotFn dot_f32;                // against float activations (SessionOptions::float_activations)
    VecDotFn dot[kIsaCount];         // by Isa against `act`; nullptr: the next lower level of the family, then dot[scalar]
    QuantizeWeightedFn quantize_weighted = nullptr;  // with an importance vector; nullptr: quantize_ref ignores it
};
// Row for a raw ggml type id; nullptr for a type this build cannot read.
inline const QuantType* quant_type(uint32_t id);

struct GgufFileImpl {
    FileView view;          // owns the bytes when opened from a path
    const uint8_t* data = nullptr;
    size_t size = 0;
    uint32_t version = 0;
    uint32_t alignment = 32;
    uint64_t data_offset = 0;
    std::vector<GgufKeyValue> kv;
    std::vector<GgufTensorInfo> tensors;
    std::unordered_map<std::string, size_t> key_index, tensor_index;

    Status parse();
    Status check_custom_type(const GgufTensorInfo& t, const QuantType& tt) const;
};

// A tensor of one of our own type ids must be named identically in `moe_infer.custom_types`
// ("ID:NAME" strings): an id reused for another layout by some other writer is refused, not misread.
inline Status GgufFileImpl::check_custom_type(const GgufTensorInfo& t, const QuantType& tt) const {
    const auto it = key_index.find("moe_infer.custom_types");
    const GgufKeyValue* kv = it == key_index.end() ? nullptr : &this->kv[it->second];
    const std::string want = std::to_string(t.type) + ":" + tt.name;
    if (kv && kv->type == GgufValueType::array && kv->array_type == GgufValueType::string) {
        Cursor c{kv->array_data, size - (size_t)(kv->array_data - data)};
        for (uint64_t i = 0; i < kv->array_count; ++i) {
            GgufString str;
            if (!c.string(&str)) break;
            const std::string entry = str.str();
            if (entry == want) return Status::ok;
            if (entry.compare(0, entry.find(':'), std::to_string(t.type)) == 0)
                return fail(Status::unsupported, "tensor '%s': type id %u is '%s' in this file but '%s' in this build", t.name.c_str(), t.type,
                            entry.c_str() + entry.find(':') + 1, tt.name);
        }
    }
    return fail(Status::invalid_file, "tensor '%s' has moe_infer type id %u but the file's moe_infer.custom_types does not name it", t.name.c_str(), t.type);
}

inline Status GgufFileImpl::parse() {
    Cursor c{data, size};
    uint32_t magic;
    if (!c.get(&magic)) return fail(Status::invalid_file, "file too small for a GGUF header (%zu bytes)", size);
    if (std::memcmp(data, "GGUF", 4) != 0) return fail(Status::invalid_file, "not a GGUF file (bad magic)");
    if (!c.get(&version)) return fail(Status::invalid_file, "truncated GGUF header");
    if ((version & 0xffff) == 0) return fail(Status::invalid_file, "GGUF version %u: wrong endianness", version);
    if (version != 2 && version != 3) return fail(Status::invalid_file, "unsupported GGUF version %u (need 2 or 3)", version);
    int64_t n_tensors, n_kv;
    if (!c.get(&n_tensors) || !c.get(&n_kv)) return fail(Status::invalid_file, "truncated GGUF header");
    if (n_tensors < 0 || (uint64_t)n_tensors > kGgufMaxTensors) return fail(Status::invalid_file, "absurd tensor count %lld", (long long)n_tensors);
    if (n_kv < 0 || (uint64_t)n_kv > kGgufMaxKeys) return fail(Status::invalid_file, "absurd metadata count %lld", (long long)n_kv);
    // Each KV pair needs at least 8 (key length) + 4 (type) + 1 bytes; reject counts the file can't hold.
    if ((uint64_t)n_kv > (size - c.pos) / 13) return fail(Status::invalid_file, "metadata count %lld exceeds the file", (long long)n_kv);

    kv.reserve((size_t)n_kv);
    for (int64_t i = 0; i < n_kv; ++i) {
        GgufKeyValue e;
        GgufString key;
        if (!c.string(&key)) return fail(Status::invalid_file, "truncated metadata key #%lld", (long long)i);
        e.key.assign(key.data, key.size);
        if (key.size == 0 || std::memchr(key.data, 0, key.size)) return fail(Status::invalid_file, "metadata key #%lld is empty or contains a NUL byte", (long long)i);
        uint32_t type;
        if (!c.get(&type)) return fail(Status::invalid_file, "truncated metadata '%s'", e.key.c_str());
        if (type > 12) return fail(Status::invalid_file, "metadata '%s' has unknown value type %u", e.key.c_str(), type);
        e.type = (GgufValueType)type;
        if (e.type == GgufValueType::string) {
            if (!c.string(&e.scalar_str)) return fail(Status::invalid_file, "truncated string value of '%s'", e.key.c_str());
        } else if (e.type == GgufValueType::array) {
            uint32_t elem_type;
            uint64_t count;
            if (!c.get(&elem_type) || !c.get(&count)) return fail(Status::invalid_file, "truncated array header of '%s'", e.key.c_str());
            if (elem_type > 12 || elem_type == (uint32_t)GgufValueType::array)
                return fail(Status::invalid_file, "array '%s' has invalid element type %u", e.key.c_str(), elem_type);
            e.array_type = (GgufValueType)elem_type;
            e.array_count = count;
            e.array_data = data + c.pos;
            if (e.array_type == GgufValueType::string) {
                if (count > (size - c.pos) / 8) return fail(Status::invalid_file, "array '%s' count %llu exceeds the file", e.key.c_str(), (unsigned long long)count);
                for (uint64_t j = 0; j < count; ++j) {
                    GgufString s;
                    if (!c.string(&s)) return fail(Status::invalid_file, "truncated string #%llu of array '%s'", (unsigned long long)j, e.key.c_str());
                }
            } else {
                uint64_t bytes;
                if (mul_overflows(count, gguf_scalar_size(e.array_type), &bytes) || !c.skip(bytes))
                    return fail(Status::invalid_file, "array '%s' (%llu elements) exceeds the file", e.key.c_str(), (unsigned long long)count);
            }
        } else {
            size_t n = gguf_scalar_size(e.type);
            uint8_t buf[8];
            if (!c.read(buf, n)) return fail(Status::invalid_file, "truncated value of '%s'", e.key.c_str());
            gguf_decode_scalar(e.type, buf, &e.scalar_u64, &e.scalar_f64);
        }
        if (!key_index.emplace(e.key, kv.size()).second) return fail(Status::invalid_file, "duplicate metadata key '%s'", e.key.c_str());
        kv.push_back(std::move(e));
    }

    auto align_it = key_index.find("general.alignment");
    if (align_it != key_index.end()) {
        const GgufKeyValue& a = kv[align_it->second];
        if (a.type != GgufValueType::u32 || a.scalar_u64 == 0 || (a.scalar_u64 & (a.scalar_u64 - 1)) != 0 || a.scalar_u64 > (1u << 20))
            return fail(Status::invalid_file, "general.alignment must be a u32 power of two");
        alignment = (uint32_t)a.scalar_u64;
    }

    // Each tensor info needs at least 8 + 4 + 8 + 4 + 8 bytes.
    if ((uint64_t)n_tensors > (size - c.pos) / 32) return fail(Status::invalid_file, "tensor count %lld exceeds the file", (long long)n_tensors);
    tensors.reserve((size_t)n_tensors);
    for (int64_t i = 0; i < n_tensors; ++i) {
        GgufTensorInfo t;
        GgufString name;
        if (!c.string(&name)) return fail(Status::invalid_file, "truncated tensor info #%lld", (long long)i);
        t.name.assign(name.data, name.size);
        if (name.size == 0 || name.size > 255 || std::memchr(name.data, 0, name.size))
            return fail(Status::invalid_file, "tensor #%lld has an empty, overlong or NUL-containing name", (long long)i);
        if (!c.get(&t.n_dims)) return fail(Status::invalid_file, "truncated tensor info '%s'", t.name.c_str());
        if (t.n_dims < 1 || t.n_dims > 4) return fail(Status::invalid_file, "tensor '%s' has %u dimensions (need 1..4)", t.name.c_str(), t.n_dims);
        uint64_t n_elem = 1;
        for (uint32_t d = 0; d < t.n_dims; ++d) {
            if (!c.get(&t.ne[d])) return fail(Status::invalid_file, "truncated shape of '%s'", t.name.c_str());
            if (t.ne[d] <= 0 || t.ne[d] > (int64_t(1) << 40) || mul_overflows(n_elem, (uint64_t)t.ne[d], &n_elem) || n_elem > (uint64_t(1) << 42))
                return fail(Status::invalid_file, "tensor '%s' has an invalid dimension %lld", t.name.c_str(), (long long)t.ne[d]);
        }
        if (!c.get(&t.type) || !c.get(&t.offset)) return fail(Status::invalid_file, "truncated tensor info '%s'", t.name.c_str());
        if (!tensor_index.emplace(t.name, tensors.size()).second) return fail(Status::invalid_file, "duplicate tensor name '%s'", t.name.c_str());
        tensors.push_back(std::move(t));
    }

    uint64_t end_of_infos = c.pos;
    data_offset = (end_of_infos + alignment - 1) / alignment * alignment;
    if (!tensors.empty() && data_offset > size) return fail(Status::invalid_file, "data section starts past the end of the file");

    for (GgufTensorInfo& t : tensors) {
        const QuantType* tt = quant_type(t.type);
        if (!tt) return fail(Status::unsupported, "tensor '%s' has unsupported type id %u (0x%x)", t.name.c_str(), t.type, t.type);
        if (t.type >= kCustomTypeBase) {
            Status s = check_custom_type(t, *tt);
            if (s != Status::ok) return s;
        }
        if (t.ne[0] % tt->block_elems != 0)
            return fail(Status::invalid_file, "tensor '%s': row length %lld is not a multiple of the %s block (%d)", t.name.c_str(), (long long)t.ne[0], tt->name, tt->block_elems);
        uint64_t rows = (uint64_t)t.ne[1] * (uint64_t)t.ne[2] * (uint64_t)t.ne[3];  // bounded by the 2^42 element cap
        uint64_t row_bytes = (uint64_t)t.ne[0] / tt->block_elems * tt->block_bytes;
        uint64_t start, end;
        if (mul_overflows(row_bytes, rows, &t.n_bytes) || t.offset % alignment != 0 || add_overflows(data_offset, t.offset, &start) ||
            add_overflows(start, t.n_bytes, &end) || end > size)
            return fail(Status::invalid_file, "tensor '%s' (offset %llu, %llu bytes) lies outside the file or is misaligned", t.name.c_str(),
                        (unsigned long long)t.offset, (unsigned long long)t.n_bytes);
        t.data = data + start;
    }
    // Overlapping tensors would alias weights: check with the tensors sorted by offset.
    std::vector<const GgufTensorInfo*> by_offset;
    by_offset.reserve(tensors.size());
    for (const GgufTensorInfo& t : tensors) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
    for (size_t i = 1; i < by_offset.size(); ++i)
        if (by_offset[i - 1]->offset + by_offset[i - 1]->n_bytes > by_offset[i]->offset)
            return fail(Status::invalid_file, "tensors '%s' and '%s' overlap", by_offset[i - 1]->name.c_str(), by_offset[i]->name.c_str());
    return Status::ok;
}

}  // namespace detail

MOE_API const char* tensor_type_name(TensorType t) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)t);
    return tt ? tt->name : "unknown";
}
MOE_API int tensor_type_block_elems(TensorType t) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)t);
    return tt ? tt->block_elems : 0;
}
MOE_API int tensor_type_block_bytes(TensorType t) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)t);
    return tt ? tt->block_bytes : 0;
}
MOE_API bool tensor_type_supported(uint32_t raw) { return detail::quant_type(raw) != nullptr; }

MOE_DETAIL_MEMBER GgufFile::GgufFile() = default;
MOE_DETAIL_MEMBER GgufFile::~GgufFile() = default;
MOE_DETAIL_MEMBER GgufFile::GgufFile(GgufFile&&) noexcept = default;
MOE_DETAIL_MEMBER GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;

MOE_DETAIL_MEMBER Status GgufFile::open(const char* path, bool use_mmap, GgufFile* out) { return open(path, use_mmap, out, nullptr, nullptr); }

MOE_DETAIL_MEMBER Status GgufFile::open(const char* path, bool use_mmap, GgufFile* out, bool (*progress)(void*, uint64_t, uint64_t), void* user) {
    if (!out) return detail::fail(Status::invalid_argument, "null output");
    std::unique_ptr<detail::GgufFileImpl> impl(new (std::nothrow) detail::GgufFileImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = impl->view.open(path, use_mmap, progress, user);
    if (s != Status::ok) return s;
    impl->data = impl->view.data;
    impl->size = impl->view.size;
    s = impl->parse();
    if (s != Status::ok) {
        std::string detail = last_error();
        return detail::fail(s, "%s: %s", path, detail.c_str());
    }
    out->impl_ = std::move(impl);
    return Status::ok;
}

MOE_DETAIL_MEMBER Status GgufFile::open_memory(const void* data, size_t size, GgufFile* out) {
    if (!out || (!data && size)) return detail::fail(Status::invalid_argument, "null argument");
    std::unique_ptr<detail::GgufFileImpl> impl(new (std::nothrow) detail::GgufFileImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    impl->data = static_cast<const uint8_t*>(data);
    impl->size = size;
    Status s = impl->parse();
    if (s != Status::ok) return s;
    out->impl_ = std::move(impl);
    return Status::ok;
}

MOE_DETAIL_MEMBER uint32_t GgufFile::version() const { return impl_ ? impl_->version : 0; }
MOE_DETAIL_MEMBER uint32_t GgufFile::alignment() const { return impl_ ? impl_->alignment : 0; }
MOE_DETAIL_MEMBER size_t GgufFile::n_keys() const { return impl_ ? impl_->kv.size() : 0; }
MOE_DETAIL_MEMBER const GgufKeyValue& GgufFile::key_at(size_t i) const { return impl_->kv[i]; }
MOE_DETAIL_MEMBER size_t GgufFile::n_tensors() const { return impl_ ? impl_->tensors.size() : 0; }
MOE_DETAIL_MEMBER const GgufTensorInfo& GgufFile::tensor_at(size_t i) const { return impl_->tensors[i]; }
MOE_DETAIL_MEMBER size_t GgufFile::file_size() const { return impl_ ? impl_->size : 0; }
MOE_DETAIL_MEMBER const uint8_t* GgufFile::data() const { return impl_ ? impl_->data : nullptr; }

MOE_DETAIL_MEMBER const GgufKeyValue* GgufFile::find(const char* key) const {
    if (!impl_ || !key) return nullptr;
    auto it = impl_->key_index.find(key);
    return it == impl_->key_index.end() ? nullptr : &impl_->kv[it->second];
}
MOE_DETAIL_MEMBER const GgufTensorInfo* GgufFile::find_tensor(const char* name) const {
    if (!impl_ || !name) return nullptr;
    auto it = impl_->tensor_index.find(name);
    return it == impl_->tensor_index.end() ? nullptr : &impl_->tensors[it->second];
}

MOE_DETAIL_MEMBER Status GgufFile::get_u32(const char* key, uint32_t* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (!detail::gguf_is_integer(e->type)) return detail::fail(Status::invalid_file, "metadata '%s' is not an integer", key);
    if ((detail::gguf_is_signed(e->type) && (int64_t)e->scalar_u64 < 0) || e->scalar_u64 > UINT32_MAX)
        return detail::fail(Status::invalid_file, "metadata '%s' is out of range", key);
    *out = (uint32_t)e->scalar_u64;
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_f32(const char* key, float* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type == GgufValueType::string || e->type == GgufValueType::array || e->type == GgufValueType::boolean)
        return detail::fail(Status::invalid_file, "metadata '%s' is not a number", key);
    *out = (float)e->scalar_f64;
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_bool(const char* key, bool* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::boolean && !detail::gguf_is_integer(e->type)) return detail::fail(Status::invalid_file, "metadata '%s' is not a bool", key);
    *out = e->scalar_u64 != 0;
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_string(const char* key, std::string* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::string) return detail::fail(Status::invalid_file, "metadata '%s' is not a string", key);
    out->assign(e->scalar_str.data, e->scalar_str.size);
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_string_array(const char* key, std::vector<std::string>* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::array || e->array_type != GgufValueType::string)
        return detail::fail(Status::invalid_file, "metadata '%s' is not a string array", key);
    out->clear();
    out->reserve((size_t)e->array_count);
    // Bounds were validated by parse(); re-walk the packed strings.
    const uint8_t* p = e->array_data;
    for (uint64_t i = 0; i < e->array_count; ++i) {
        uint64_t n;
        std::memcpy(&n, p, 8);
        out->emplace_back(reinterpret_cast<const char*>(p + 8), (size_t)n);
        p += 8 + n;
    }
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_f32_array(const char* key, std::vector<float>* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::array || e->array_type == GgufValueType::string)
        return detail::fail(Status::invalid_file, "metadata '%s' is not a numeric array", key);
    size_t es = detail::gguf_scalar_size(e->array_type);
    out->resize((size_t)e->array_count);
    for (uint64_t i = 0; i < e->array_count; ++i) {
        uint64_t u; double f;
        detail::gguf_decode_scalar(e->array_type, e->array_data + i * es, &u, &f);
        (*out)[(size_t)i] = (float)f;
    }
    return Status::ok;
}
MOE_DETAIL_MEMBER Status GgufFile::get_i32_array(const char* key, std::vector<int32_t>* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::array || !detail::gguf_is_integer(e->array_type))
        return detail::fail(Status::invalid_file, "metadata '%s' is not an integer array", key);
    size_t es = detail::gguf_scalar_size(e->array_type);
    out->resize((size_t)e->array_count);
    for (uint64_t i = 0; i < e->array_count; ++i) {
        uint64_t u; double f;
        detail::gguf_decode_scalar(e->array_type, e->array_data + i * es, &u, &f);
        int64_t v = detail::gguf_is_signed(e->array_type) ? (int64_t)u : (u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)u);
        if (v < INT32_MIN || v > INT32_MAX) return detail::fail(Status::invalid_file, "metadata '%s'[%llu] does not fit in int32", key, (unsigned long long)i);
        (*out)[(size_t)i] = (int32_t)v;
    }
    return Status::ok;
}

// ---- writer ----

namespace detail {
inline void put_bytes(std::vector<uint8_t>& out, const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
}
template <typename T> inline void put(std::vector<uint8_t>& out, T v) { put_bytes(out, &v, sizeof v); }
inline void put_string(std::vector<uint8_t>& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    put_bytes(out, s.data(), s.size());
}
}  // namespace detail

MOE_DETAIL_MEMBER void GgufWriter::set_raw(const std::string& key, GgufValueType type, GgufValueType array_type, uint64_t count, std::vector<uint8_t> payload) {
    for (Entry& e : entries_)
        if (e.key == key) {
            e.type = type; e.array_type = array_type; e.count = count; e.payload = std::move(payload);
            return;
        }
    entries_.push_back(Entry{key, type, array_type, count, std::move(payload)});
}
MOE_DETAIL_MEMBER void GgufWriter::set_u32(const std::string& key, uint32_t v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::u32, GgufValueType::u8, 0, p); }
MOE_DETAIL_MEMBER void GgufWriter::set_i32(const std::string& key, int32_t v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::i32, GgufValueType::u8, 0, p); }
MOE_DETAIL_MEMBER void GgufWriter::set_f32(const std::string& key, float v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::f32, GgufValueType::u8, 0, p); }
MOE_DETAIL_MEMBER void GgufWriter::set_bool(const std::string& key, bool v) { std::vector<uint8_t> p; detail::put<uint8_t>(p, v ? 1 : 0); set_raw(key, GgufValueType::boolean, GgufValueType::u8, 0, p); }
MOE_DETAIL_MEMBER void GgufWriter::set_string(const std::string& key, const std::string& v) { std::vector<uint8_t> p; detail::put_string(p, v); set_raw(key, GgufValueType::string, GgufValueType::u8, 0, p); }
MOE_DETAIL_MEMBER void GgufWriter::set_string_array(const std::string& key, const std::vector<std::string>& v) {
    std::vector<uint8_t> p;
    for (const std::string& s : v) detail::put_string(p, s);
    set_raw(key, GgufValueType::array, GgufValueType::string, v.size(), p);
}
MOE_DETAIL_MEMBER void GgufWriter::copy_key(const GgufKeyValue& kv) {
    std::vector<uint8_t> p;
    if (kv.type == GgufValueType::string) {
        detail::put_string(p, kv.scalar_str.str());
    } else if (kv.type == GgufValueType::array) {
        if (kv.array_type == GgufValueType::string) {
            const uint8_t* q = kv.array_data;  // validated by the reader: u64 length + bytes each
            for (uint64_t i = 0; i < kv.array_count; ++i) {
                uint64_t n;
                std::memcpy(&n, q, 8);
                detail::put_bytes(p, q, (size_t)(8 + n));
                q += 8 + n;
            }
        } else {
            detail::put_bytes(p, kv.array_data, (size_t)(kv.array_count * detail::gguf_scalar_size(kv.array_type)));
        }
    } else {
        const size_t n = detail::gguf_scalar_size(kv.type);
        uint64_t bits = kv.scalar_u64;
        if (kv.type == GgufValueType::f32) { const float f = (float)kv.scalar_f64; std::memcpy(&bits, &f, 4); }
        if (kv.type == GgufValueType::f64) std::memcpy(&bits, &kv.scalar_f64, 8);
        detail::put_bytes(p, &bits, n);  // little-endian: the low n bytes
    }
    set_raw(kv.key, kv.type, kv.array_type, kv.type == GgufValueType::array ? kv.array_count : 0, std::move(p));
}
MOE_DETAIL_MEMBER void GgufWriter::set_f32_array(const std::string& key, const std::vector<float>& v) {
    std::vector<uint8_t> p;
    detail::put_bytes(p, v.data(), v.size() * 4);
    set_raw(key, GgufValueType::array, GgufValueType::f32, v.size(), p);
}
MOE_DETAIL_MEMBER void GgufWriter::set_i32_array(const std::string& key, const std::vector<int32_t>& v) {
    std::vector<uint8_t> p;
    detail::put_bytes(p, v.data(), v.size() * 4);
    set_raw(key, GgufValueType::array, GgufValueType::i32, v.size(), p);
}

MOE_DETAIL_MEMBER Status GgufWriter::add_tensor(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data) {
    if (!data) return detail::fail(Status::invalid_argument, "tensor '%s': null data", name.c_str());
    return add_tensor_impl(name, type, n_dims, ne, data);
}

MOE_DETAIL_MEMBER Status GgufWriter::add_tensor_deferred(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne) {
    return add_tensor_impl(name, type, n_dims, ne, nullptr);
}

MOE_DETAIL_MEMBER Status GgufWriter::add_tensor_impl(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt) return detail::fail(Status::unsupported, "tensor '%s': unsupported type", name.c_str());
    if (n_dims < 1 || n_dims > 4 || !ne) return detail::fail(Status::invalid_argument, "tensor '%s': bad shape", name.c_str());
    if (name.empty() || name.size() > 255) return detail::fail(Status::invalid_argument, "tensor name '%s' is empty or too long", name.c_str());
    Tensor t;
    t.name = name; t.type = (uint32_t)type; t.n_dims = n_dims; t.deferred = data == nullptr;
    uint64_t rows = 1;
    for (int d = 0; d < 4; ++d) {
        t.ne[d] = d < (int)n_dims ? ne[d] : 1;
        if (t.ne[d] <= 0 || t.ne[d] > (int64_t(1) << 40)) return detail::fail(Status::invalid_argument, "tensor '%s': bad dimension", name.c_str());
        if (d > 0 && detail::mul_overflows(rows, (uint64_t)t.ne[d], &rows)) return detail::fail(Status::invalid_argument, "tensor '%s': too large", name.c_str());
    }
    if (t.ne[0] % tt->block_elems) return detail::fail(Status::invalid_argument, "tensor '%s': row not a multiple of the block", name.c_str());
    for (const Tensor& other : tensors_)
        if (other.name == name) return detail::fail(Status::invalid_argument, "duplicate tensor '%s'", name.c_str());
    if (detail::mul_overflows(rows, (uint64_t)(t.ne[0] / tt->block_elems * tt->block_bytes), &t.n_bytes) || t.n_bytes > SIZE_MAX / 2)
        return detail::fail(Status::invalid_argument, "tensor '%s': too large", name.c_str());
    if (data) t.data.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + t.n_bytes);
    if (t.type >= kCustomTypeBase) {  // name our own type ids in the file (see TensorType)
        std::vector<std::string> names;
        tensors_.push_back(std::move(t));
        for (const Tensor& other : tensors_) {
            if (other.type < kCustomTypeBase) continue;
            const std::string e = std::to_string(other.type) + ":" + detail::quant_type(other.type)->name;
            if (std::find(names.begin(), names.end(), e) == names.end()) names.push_back(e);
        }
        set_string_array("moe_infer.custom_types", names);
        return Status::ok;
    }
    tensors_.push_back(std::move(t));
    return Status::ok;
}

MOE_DETAIL_MEMBER Status GgufWriter::add_tensor_f32(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const float* values) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || n_dims < 1 || n_dims > 4 || !ne) return detail::fail(Status::invalid_argument, "tensor '%s': bad type or shape", name.c_str());
    int64_t n = 1;
    for (uint32_t d = 0; d < n_dims; ++d) n *= ne[d];
    if (ne[0] % tt->block_elems) return detail::fail(Status::invalid_argument, "tensor '%s': row not a multiple of the block", name.c_str());
    std::vector<uint8_t> bytes((size_t)(n / tt->block_elems * tt->block_bytes));
    Status s = quantize_row(type, values, bytes.data(), n);
    if (s != Status::ok) return s;
    return add_tensor(name, type, n_dims, ne, bytes.data());
}

MOE_DETAIL_MEMBER std::vector<uint8_t> GgufWriter::header_bytes(uint32_t* alignment_out) const {
    uint32_t alignment = 32;
    for (const Entry& e : entries_)
        if (e.key == "general.alignment" && e.type == GgufValueType::u32) std::memcpy(&alignment, e.payload.data(), 4);
    if (alignment == 0 || (alignment & (alignment - 1))) alignment = 32;
    std::vector<uint8_t> out;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    detail::put<uint32_t>(out, 3);
    detail::put<int64_t>(out, (int64_t)tensors_.size());
    detail::put<int64_t>(out, (int64_t)entries_.size());
    for (const Entry& e : entries_) {
        detail::put_string(out, e.key);
        detail::put<uint32_t>(out, (uint32_t)e.type);
        if (e.type == GgufValueType::array) {
            detail::put<uint32_t>(out, (uint32_t)e.array_type);
            detail::put<uint64_t>(out, e.count);
        }
        detail::put_bytes(out, e.payload.data(), e.payload.size());
    }
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
        detail::put_string(out, t.name);
        detail::put<uint32_t>(out, t.n_dims);
        for (uint32_t d = 0; d < t.n_dims; ++d) detail::put<int64_t>(out, t.ne[d]);
        detail::put<uint32_t>(out, t.type);
        detail::put<uint64_t>(out, offset);
        offset += (t.n_bytes + alignment - 1) / alignment * alignment;
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
    *alignment_out = alignment;
    return out;
}

MOE_DETAIL_MEMBER std::vector<uint8_t> GgufWriter::to_bytes() const {
    uint32_t alignment;
    std::vector<uint8_t> out = header_bytes(&alignment);
    for (const Tensor& t : tensors_) {
        MOE_ASSERT(!t.deferred && "to_bytes() cannot hold deferred tensors; use write_streaming()");
        detail::put_bytes(out, t.data.data(), t.data.size());
        out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
    }
    return out;
}

MOE_DETAIL_MEMBER Status GgufWriter::write(const char* path) const { return write_streaming(path, nullptr, nullptr); }

MOE_DETAIL_MEMBER Status GgufWriter::write_streaming(const char* path, FillFn fill, void* user) const {
    if (!path) return detail::fail(Status::invalid_argument, "null path");
    for (const Tensor& t : tensors_)
        if (t.deferred && !fill) return detail::fail(Status::invalid_argument, "tensor '%s' is deferred but no fill callback was given", t.name.c_str());
    uint32_t alignment;
    std::vector<uint8_t> header = header_bytes(&alignment);
    std::FILE* f = std::fopen(path, "wb");
    if (!f) return detail::fail(Status::io_error, "cannot create '%s'", path);
    bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size();
    std::vector<uint8_t> buffer;
    static const uint8_t zeros[256] = {0};
    for (size_t i = 0; ok && i < tensors_.size(); ++i) {
        const Tensor& t = tensors_[i];
        const uint8_t* bytes = t.data.data();
        if (t.deferred) {
            buffer.resize((size_t)t.n_bytes);
            if (!fill(user, i, buffer.data(), buffer.size())) {
                std::fclose(f);
                std::remove(path);
                return detail::fail(Status::cancelled, "writing '%s' was cancelled at tensor '%s'", path, t.name.c_str());
            }
            bytes = buffer.data();
        }
        ok = std::fwrite(bytes, 1, (size_t)t.n_bytes, f) == (size_t)t.n_bytes;
        size_t pad = (size_t)((alignment - t.n_bytes % alignment) % alignment);
        while (ok && pad > 0) {
            size_t n = std::min(pad, sizeof zeros);
            ok = std::fwrite(zeros, 1, n, f) == n;
            pad -= n;
        }
    }
    ok = (std::fclose(f) == 0) && ok;
    return ok ? Status::ok : detail::fail(Status::io_error, "write error on '%s'", path);
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] QUANT FORMATS
//-----------------------------------------------------------------------------
// >>quant  Block layouts bit-compatible with ggml (ggml-common.h, MIT, (c) 2023-2026 The ggml
// authors); only the layouts and formulas are shared, the code is ours. Each block stores
// block_elems weights; rows never split a block. Activations are quantized once per matrix input
// to the weight type's activation format (Q8_0 for Q8_0/Q4_0, Q8_K for the K-quants).

namespace moe {
namespace detail {

constexpr int kQK = 32;    // elements per legacy block
constexpr int kQKK = 256;  // elements per K-quant super-block

// Q8_0: x = d * q, q in [-127, 127]. 8.5 bits per weight.
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
static_assert(sizeof(BlockQ8_0) == 34, "wrong q8_0 block size");
// ActFormat::q8_0_split: four Q8_0 blocks k = 0..3 (128 elements) as lo[16k + j] = element j and
// hi[16k + j] = element j + 16 of block k - the order in which a 4-bit block's 16 bytes hold low and
// high nibbles - with each block's scale (as float) and minus its code sum, at 32-bit lane 4k
// (d in lanes 4k..4k+3; neg_sum in lane 4k, zeros beside it): the layout of one 512-bit register.
struct BlockQ8Split { int8_t lo[64]; int8_t hi[64]; float d[16]; int32_t neg_sum[16]; };
static_assert(sizeof(BlockQ8Split) == 256, "wrong q8_0_split block size");
// Q4_0: x = d * (q - 8), q in [0, 15]; byte j: element j (low nibble), j + 16 (high). 4.5 bpw.
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockQ4_0) == 18, "wrong q4_0 block size");
// Q4_1: x = d * q + m, q in [0, 15], nibbles ordered as Q4_0. 5 bpw.
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockQ4_1) == 20, "wrong q4_1 block size");
// Q5_0: x = d * (q - 16), q 5-bit: the Q4_0 nibble plus bit j of qh (little-endian 32 bits) as
// the fifth bit of element j. 5.5 bpw.
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockQ5_0) == 22, "wrong q5_0 block size");
// Q5_1: x = d * q + m with Q5_0's q. 6 bpw.
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockQ5_1) == 24, "wrong q5_1 block size");
// IQ4_NL: x = d * kIq4Values[code], codes in Q4_0's nibble order. 4.5 bpw.
struct BlockIQ4NL { uint16_t d; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockIQ4NL) == 18, "wrong iq4_nl block size");
// IQ4_XS: 8 sub-blocks of 32, x = d * (ls - 32) * kIq4Values[code]; ls of sub-block i: its low 4
// bits are nibble i of scales_l (low nibble first), its high 2 bits bits 2i..2i+1 of scales_h;
// sub-block i's codes are qs[16i..16i+15] in Q4_0's nibble order. 4.25 bpw.
struct BlockIQ4XS { uint16_t d, scales_h; uint8_t scales_l[kQKK / 64]; uint8_t qs[kQKK / 2]; };
static_assert(sizeof(BlockIQ4XS) == 136, "wrong iq4_xs block size");
// The IQ4 codebook: a non-uniform 4-bit grid, part of the format (ggml-common.h, MIT).
alignas(16) constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Ternary (values d * {-1, 0, 1}, BitNet-style). TQ2_0: 2 bits per trit (code t in 0..2 = value
// + 1), Q2_K's element order. 2.0625 bpw.
struct BlockTQ2 { uint8_t qs[kQKK / 4]; uint16_t d; };
static_assert(sizeof(BlockTQ2) == 66, "wrong tq2_0 block size");
// TQ1_0: five trits per byte as a base-3 fraction: byte = ceil(v * 256 / 243) with v the trits
// read as a base-3 number (first trit most significant), so trit n of byte q is
// ((uint8_t)(q * 3^n) * 3) >> 8. qs[0..31] hold elements 32n + m (n < 5), qs[32..47] elements
// 160 + 16n + m, qh[0..3] four trits each: elements 240 + 4n + m. 1.6875 bpw.
struct BlockTQ1 { uint8_t qs[48]; uint8_t qh[4]; uint16_t d; };
static_assert(sizeof(BlockTQ1) == 54, "wrong tq1_0 block size");

// Q1_0 and Q2_0 (llama.cpp 0.5.0's newest legacy types; both dot against Q8_0 activations, one
// weight block spanning 4 resp. 2 activation blocks). Q1_0: x = +d where bit j of the block (bit
// j % 8 of qs[j / 8]) is set, -d where clear. 1.125 bpw. Q2_0: x = d * (q - 1), q the 2 bits at
// 2 * (j % 4) of qs[j / 4]. 2.25 bpw.
constexpr int kQK1 = 128;
constexpr int kQK2 = 64;
struct BlockQ1_0 { uint16_t d; uint8_t qs[kQK1 / 8]; };
static_assert(sizeof(BlockQ1_0) == 18, "wrong q1_0 block size");
struct BlockQ2_0 { uint16_t d; uint8_t qs[kQK2 / 4]; };
static_assert(sizeof(BlockQ2_0) == 18, "wrong q2_0 block size");

// IQ grid types ("i-quants"): a super-block of 256 is 8 groups of 32; each 8 (IQ2, IQ1) or 4 (IQ3)
// weights of a group are one entry of a fixed grid of small magnitudes, plus sign bits. Scales are
// odd integers ls = 2 * s + 1 per group or 16-weight half: x = d * ls / kDiv * grid * sign, kDiv
// 8 for IQ2, 4 for IQ3_XXS, 1 for IQ3_S. Where 7 sign bits are stored, the 8th makes the parity
// even (kIqSigns). Layouts as ggml-common.h:
//  IQ2_XXS: qs as 8 pairs of uint32 (a, b): a's bytes index the grid (4 x 8 weights), b holds four
//           7-bit sign fields and s in bits 28..31. 2.0625 bpw.
//  IQ2_XS:  qs[4g + l]: 9-bit grid index | 7 sign bits << 9; scales[g]: s of the halves (low
//           nibble first). 2.3125 bpw.
//  IQ2_S:   10-bit index: qs[4g + l] | bits 2l..2l+1 of qh[g] << 8; 8 plain sign bits per 8 weights
//           in qs[32 + 4g + l]; scales as IQ2_XS. 2.5625 bpw.
//  IQ3_XXS: qs[8g + k] indexes the 4-weight grid; the uint32 at qs[64 + 4g] holds four 7-bit sign
//           fields and s in bits 28..31. 3.0625 bpw.
//  IQ3_S:   9-bit index: qs[8g + k] | bit k of qh[g] << 8; plain sign bits signs[4g + l]; one 4-bit
//           s per group (scales[g / 2], low nibble first). 3.4375 bpw.
// IQ1: the grid values are -1, 0, 1 and every 8 weights get a shift of +-1/8:
//  x = d * ls * (grid + delta). IQ1_S: index qs[4g + l] | bits 3l..3l+2 of qh[g] << 8, s in bits
//  12..14 of qh[g], bit 15 set: delta = -1/8 for the group. 1.5625 bpw.
//  IQ1_M: index qs[4g + l] | 3 bits of qh[2g + l / 2] (low nibble for even l) << 8, the nibble's
//  bit 3 set: delta = -1/8 for those 8 weights; a 3-bit s per 16 weights, four per uint16 of
//  scales (12 bits), and d, an fp16, from the top nibbles of those four uint16. 1.75 bpw.
struct BlockIQ2XXS { uint16_t d; uint16_t qs[kQKK / 8]; };
static_assert(sizeof(BlockIQ2XXS) == 66, "wrong iq2_xxs block size");
struct BlockIQ2XS { uint16_t d; uint16_t qs[kQKK / 8]; uint8_t scales[kQKK / 32]; };
static_assert(sizeof(BlockIQ2XS) == 74, "wrong iq2_xs block size");
struct BlockIQ2S { uint16_t d; uint8_t qs[kQKK / 4]; uint8_t qh[kQKK / 32]; uint8_t scales[kQKK / 32]; };
static_assert(sizeof(BlockIQ2S) == 82, "wrong iq2_s block size");
struct BlockIQ3XXS { uint16_t d; uint8_t qs[3 * kQKK / 8]; };
static_assert(sizeof(BlockIQ3XXS) == 98, "wrong iq3_xxs block size");
struct BlockIQ3S { uint16_t d; uint8_t qs[kQKK / 4]; uint8_t qh[kQKK / 32]; uint8_t signs[kQKK / 8]; uint8_t scales[kQKK / 64]; };
static_assert(sizeof(BlockIQ3S) == 110, "wrong iq3_s block size");
struct BlockIQ1S { uint16_t d; uint8_t qs[kQKK / 8]; uint16_t qh[kQKK / 32]; };
static_assert(sizeof(BlockIQ1S) == 50, "wrong iq1_s block size");
struct BlockIQ1M { uint8_t qs[kQKK / 8]; uint8_t qh[kQKK / 16]; uint8_t scales[kQKK / 32]; };
static_assert(sizeof(BlockIQ1M) == 56, "wrong iq1_m block size");

// The grids are part of the formats: ggml's iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid,
// iq3s_grid and iq1s_grid (ggml-common.h, MIT, the ggml authors), written here as level indices
// by tools/gen_iq_grids.py and expanded to ggml's one-byte-per-value entries at compile time.
// kIq2xxsGridCodes: 256 entries (ggml's iq2xxs_grid), 2-bit level indices
constexpr uint16_t kIq2xxsGridCodes[256] = {
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0020, 0x0022, 0x0028, 0x002a, 0x0041, 0x0044, 0x0050, 0x0058, 0x0061,
    0x0064, 0x0080, 0x0082, 0x008a, 0x00a2, 0x0101, 0x0104, 0x0110, 0x0115, 0x0140, 0x0184, 0x0198, 0x0200, 0x0202, 0x0222, 0x0282,
    0x0401, 0x0404, 0x0410, 0x0421, 0x0424, 0x0440, 0x0442, 0x0448, 0x0460, 0x0481, 0x0484, 0x0490, 0x04a4, 0x0500, 0x0502, 0x0508,
    0x0520, 0x0546, 0x0569, 0x0580, 0x0591, 0x0609, 0x0610, 0x0640, 0x0684, 0x06a4, 0x0800, 0x0805, 0x0808, 0x0814, 0x0828, 0x0841,
    0x0844, 0x0850, 0x0852, 0x0888, 0x0904, 0x0940, 0x0a02, 0x0a14, 0x1001, 0x1004, 0x1010, 0x1021, 0x1040, 0x1060, 0x1084, 0x1090,
    0x1095, 0x1100, 0x1108, 0x1120, 0x1150, 0x115a, 0x1180, 0x1224, 0x1245, 0x1400, 0x1408, 0x1420, 0x1425, 0x1449, 0x1480, 0x1518,
    0x1562, 0x1600, 0x1616, 0x1801, 0x1804, 0x1810, 0x1840, 0x1881, 0x1900, 0x1905, 0x19a0, 0x1a51, 0x2000, 0x2002, 0x200a, 0x2044,
    0x2061, 0x2080, 0x2082, 0x2129, 0x2148, 0x2200, 0x2202, 0x2401, 0x2404, 0x2410, 0x2440, 0x2456, 0x2500, 0x2541, 0x2564, 0x2690,
    0x2808, 0x2820, 0x2894, 0x2a44, 0x4001, 0x4004, 0x4010, 0x4018, 0x4021, 0x4024, 0x4040, 0x4048, 0x4056, 0x4060, 0x4081, 0x4084,
    0x4090, 0x4100, 0x4120, 0x4161, 0x4180, 0x4185, 0x4201, 0x4210, 0x4248, 0x4256, 0x4268, 0x4400, 0x4408, 0x4420, 0x4480, 0x4499,
    0x4512, 0x4524, 0x4600, 0x4801, 0x4804, 0x4810, 0x4840, 0x4845, 0x4900, 0x4958, 0x4961, 0x4982, 0x4a45, 0x4a90, 0x5000, 0x5008,
    0x5011, 0x5019, 0x5020, 0x5080, 0x5088, 0x5104, 0x5142, 0x51a4, 0x5291, 0x5490, 0x5492, 0x550a, 0x5601, 0x5654, 0x5800, 0x5811,
    0x5819, 0x5864, 0x5940, 0x5a08, 0x6004, 0x6010, 0x6040, 0x6068, 0x6100, 0x6155, 0x6218, 0x6260, 0x6400, 0x6405, 0x6510, 0x6512,
    0x6584, 0x6842, 0x8000, 0x8002, 0x800a, 0x8041, 0x8082, 0x8104, 0x8118, 0x8140, 0x8211, 0x8401, 0x8404, 0x8410, 0x8415, 0x8440,
    0x8460, 0x8500, 0x8546, 0x8594, 0x8609, 0x8640, 0x8660, 0x8802, 0x8904, 0x8a11, 0x9004, 0x9010, 0x9024, 0x9040, 0x90a1, 0x9116,
    0x9180, 0x9245, 0x9400, 0x9422, 0x9444, 0x9551, 0x9881, 0x9920, 0xa002, 0xa050, 0xa085, 0xa109, 0xa200, 0xa418, 0xa850, 0xa904,
};
// kIq2xsGridCodes: 512 entries (ggml's iq2xs_grid), 2-bit level indices
constexpr uint16_t kIq2xsGridCodes[512] = {
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0016, 0x0019, 0x0020, 0x0022, 0x0025, 0x0028, 0x0041, 0x0044, 0x0046,
    0x0049, 0x0050, 0x0052, 0x0055, 0x0058, 0x0061, 0x0064, 0x0080, 0x0082, 0x0085, 0x0088, 0x0091, 0x0094, 0x0099, 0x00a0, 0x0101,
    0x0104, 0x0106, 0x0109, 0x0110, 0x0112, 0x0115, 0x0118, 0x011a, 0x0121, 0x0124, 0x0140, 0x0142, 0x0145, 0x0148, 0x0151, 0x0154,
    0x0160, 0x0168, 0x0181, 0x0184, 0x0190, 0x0200, 0x0202, 0x0205, 0x0208, 0x0211, 0x0214, 0x0220, 0x0241, 0x0244, 0x0250, 0x0255,
    0x0280, 0x028a, 0x0401, 0x0404, 0x0406, 0x0409, 0x0410, 0x0412, 0x0415, 0x0418, 0x0421, 0x0424, 0x0440, 0x0442, 0x0445, 0x0448,
    0x0451, 0x0454, 0x0456, 0x0460, 0x0481, 0x0484, 0x0490, 0x0500, 0x0502, 0x0505, 0x0508, 0x0511, 0x0514, 0x0520, 0x0541, 0x0544,
    0x0550, 0x0561, 0x0580, 0x0601, 0x0604, 0x0610, 0x0626, 0x0640, 0x0642, 0x0684, 0x0800, 0x0802, 0x0805, 0x0808, 0x080a, 0x0811,
    0x0814, 0x0820, 0x0825, 0x0841, 0x0844, 0x0850, 0x0858, 0x0880, 0x08a0, 0x08aa, 0x0901, 0x0904, 0x0910, 0x0940, 0x0981, 0x0989,
    0x0a00, 0x0a20, 0x0a28, 0x0a96, 0x0aa0, 0x1001, 0x1004, 0x1006, 0x1009, 0x1010, 0x1012, 0x1015, 0x1018, 0x1021, 0x1024, 0x1040,
    0x1042, 0x1045, 0x1048, 0x1051, 0x1054, 0x1060, 0x106a, 0x1081, 0x1084, 0x1090, 0x1100, 0x1102, 0x1105, 0x1108, 0x1111, 0x1114,
    0x1120, 0x1141, 0x1144, 0x1150, 0x1180, 0x1194, 0x1196, 0x1201, 0x1204, 0x1206, 0x1210, 0x1240, 0x1260, 0x1400, 0x1402, 0x1405,
    0x1408, 0x1411, 0x1414, 0x1420, 0x1441, 0x1444, 0x1449, 0x1450, 0x1464, 0x1480, 0x1501, 0x1504, 0x1510, 0x1540, 0x1600, 0x1614,
    0x1649, 0x1801, 0x1804, 0x1810, 0x1812, 0x1840, 0x1854, 0x1886, 0x1900, 0x1905, 0x1966, 0x1a51, 0x1aa9, 0x2000, 0x2002, 0x2005,
    0x2008, 0x200a, 0x2011, 0x2014, 0x2020, 0x2041, 0x2044, 0x2050, 0x2080, 0x20a0, 0x2101, 0x2104, 0x2110, 0x2140, 0x2148, 0x2165,
    0x2200, 0x2222, 0x2280, 0x22a8, 0x2401, 0x2404, 0x2410, 0x2429, 0x2440, 0x2500, 0x2541, 0x2552, 0x2599, 0x2601, 0x261a, 0x26a6,
    0x2800, 0x2808, 0x280a, 0x2820, 0x2855, 0x2888, 0x28a2, 0x2968, 0x2990, 0x2a08, 0x2a20, 0x2a82, 0x2a88, 0x2a8a, 0x4001, 0x4004,
    0x4006, 0x4009, 0x4010, 0x4012, 0x4015, 0x4018, 0x4021, 0x4024, 0x4040, 0x4042, 0x4045, 0x4048, 0x404a, 0x4051, 0x4054, 0x4060,
    0x4065, 0x4081, 0x4084, 0x4090, 0x4100, 0x4102, 0x4105, 0x4108, 0x4111, 0x4114, 0x4120, 0x4141, 0x4144, 0x4150, 0x4180, 0x4185,
    0x41a2, 0x4201, 0x4204, 0x4210, 0x4212, 0x4229, 0x4240, 0x4400, 0x4402, 0x4405, 0x4408, 0x4411, 0x4414, 0x4419, 0x4420, 0x4441,
    0x4444, 0x4450, 0x4480, 0x4494, 0x4501, 0x4504, 0x4510, 0x4524, 0x4540, 0x459a, 0x4600, 0x460a, 0x4644, 0x4650, 0x4801, 0x4804,
    0x4810, 0x4840, 0x4845, 0x4854, 0x4862, 0x4900, 0x4911, 0x4944, 0x4950, 0x4969, 0x4a04, 0x5000, 0x5002, 0x5005, 0x5008, 0x5011,
    0x5014, 0x5020, 0x5028, 0x5041, 0x5044, 0x5050, 0x5080, 0x5101, 0x5104, 0x5110, 0x5115, 0x5140, 0x5142, 0x5200, 0x5244, 0x52aa,
    0x5401, 0x5404, 0x5410, 0x5421, 0x5440, 0x5460, 0x5481, 0x54a1, 0x5500, 0x5508, 0x5580, 0x5588, 0x5621, 0x5668, 0x56a1, 0x5800,
    0x5814, 0x5841, 0x5850, 0x5899, 0x591a, 0x5940, 0x5942, 0x5a85, 0x6001, 0x6004, 0x6010, 0x6040, 0x6054, 0x6062, 0x6086, 0x60a9,
    0x6100, 0x6224, 0x624a, 0x6292, 0x6400, 0x6416, 0x6510, 0x6540, 0x6545, 0x65a4, 0x6801, 0x686a, 0x6925, 0x6a06, 0x6a54, 0x6a62,
    0x8000, 0x8002, 0x8005, 0x8008, 0x8011, 0x8014, 0x8020, 0x802a, 0x8041, 0x8044, 0x8050, 0x8080, 0x8082, 0x80a8, 0x80aa, 0x8101,
    0x8104, 0x8106, 0x8110, 0x8140, 0x8151, 0x8159, 0x8200, 0x8220, 0x8280, 0x8282, 0x82a0, 0x82a8, 0x8401, 0x8404, 0x8410, 0x8412,
    0x8415, 0x8440, 0x8460, 0x8489, 0x8500, 0x8544, 0x85a5, 0x8618, 0x866a, 0x8800, 0x8808, 0x8825, 0x885a, 0x8880, 0x8882, 0x88a8,
    0x8906, 0x8a22, 0x8a80, 0x8a88, 0x8a96, 0x8aa8, 0x9001, 0x9004, 0x9010, 0x9040, 0x9056, 0x9084, 0x9100, 0x9122, 0x9164, 0x9256,
    0x9289, 0x9400, 0x9405, 0x9444, 0x9450, 0x9458, 0x9529, 0x9590, 0x9592, 0x9641, 0x9851, 0x98a6, 0x9949, 0x9a15, 0x9a60, 0xa000,
    0xa002, 0xa008, 0xa00a, 0xa020, 0xa02a, 0xa0a0, 0xa151, 0xa159, 0xa1a6, 0xa200, 0xa202, 0xa208, 0xa22a, 0xa280, 0xa2a0, 0xa440,
    0xa495, 0xa665, 0xa698, 0xa80a, 0xa820, 0xa822, 0xa828, 0xa8a0, 0xa8a8, 0xa904, 0xa984, 0xa986, 0xaa28, 0xaa2a, 0xaa91, 0xaaaa,
};
// kIq2sGridCodes: 1024 entries (ggml's iq2s_grid), 2-bit level indices
constexpr uint16_t kIq2sGridCodes[1024] = {
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0016, 0x0019, 0x0020, 0x0022, 0x0025, 0x0028, 0x0041, 0x0044, 0x0046,
    0x0049, 0x0050, 0x0052, 0x0055, 0x0058, 0x0061, 0x0064, 0x0066, 0x0069, 0x0080, 0x0082, 0x0085, 0x0088, 0x0091, 0x0094, 0x00a0,
    0x00a5, 0x00aa, 0x0101, 0x0104, 0x0106, 0x0109, 0x0110, 0x0112, 0x0115, 0x0118, 0x0121, 0x0124, 0x0140, 0x0142, 0x0145, 0x0148,
    0x0151, 0x0154, 0x0156, 0x0159, 0x0160, 0x0165, 0x0168, 0x0181, 0x0184, 0x0190, 0x0192, 0x0195, 0x01a1, 0x01a4, 0x0200, 0x0202,
    0x0205, 0x0208, 0x0211, 0x0214, 0x0220, 0x022a, 0x0241, 0x0244, 0x0246, 0x0249, 0x0250, 0x0255, 0x0280, 0x0285, 0x028a, 0x0294,
    0x02a2, 0x0401, 0x0404, 0x0406, 0x0409, 0x0410, 0x0412, 0x0415, 0x0418, 0x0421, 0x0424, 0x0426, 0x0429, 0x0440, 0x0442, 0x0445,
    0x0448, 0x044a, 0x0451, 0x0454, 0x0456, 0x0459, 0x0460, 0x0462, 0x0465, 0x0481, 0x0484, 0x0486, 0x0489, 0x0490, 0x0495, 0x0498,
    0x04a1, 0x04a4, 0x0500, 0x0502, 0x0505, 0x0508, 0x050a, 0x0511, 0x0514, 0x0516, 0x0519, 0x0520, 0x0525, 0x0528, 0x0541, 0x0544,
    0x0546, 0x0549, 0x0550, 0x0552, 0x0555, 0x0558, 0x0561, 0x0564, 0x0580, 0x0582, 0x0585, 0x0588, 0x0591, 0x0594, 0x05a0, 0x0601,
    0x0604, 0x0606, 0x0609, 0x0610, 0x0615, 0x0640, 0x0645, 0x0648, 0x0651, 0x0654, 0x0660, 0x0681, 0x0684, 0x0690, 0x0800, 0x0802,
    0x0805, 0x0808, 0x0811, 0x0814, 0x0816, 0x0819, 0x0820, 0x0825, 0x082a, 0x0841, 0x0844, 0x0846, 0x0849, 0x0850, 0x0852, 0x0855,
    0x0858, 0x0861, 0x0864, 0x0880, 0x0885, 0x0894, 0x08aa, 0x0901, 0x0904, 0x0910, 0x0912, 0x0915, 0x0918, 0x0921, 0x0940, 0x0945,
    0x0948, 0x0951, 0x0954, 0x0960, 0x0981, 0x0990, 0x0a00, 0x0a11, 0x0a14, 0x0a22, 0x0a28, 0x0a2a, 0x0a50, 0x0a99, 0x1001, 0x1004,
    0x1006, 0x1009, 0x1010, 0x1012, 0x1015, 0x1018, 0x1021, 0x1024, 0x1026, 0x1040, 0x1042, 0x1045, 0x1048, 0x1051, 0x1054, 0x1056,
    0x1059, 0x1060, 0x1062, 0x1065, 0x1068, 0x1081, 0x1084, 0x1086, 0x1090, 0x1095, 0x1098, 0x10a1, 0x10a4, 0x1100, 0x1102, 0x1105,
    0x1108, 0x110a, 0x1111, 0x1114, 0x1116, 0x1119, 0x1120, 0x1122, 0x1125, 0x1128, 0x1141, 0x1144, 0x1146, 0x1149, 0x1150, 0x1152,
    0x1155, 0x1158, 0x1161, 0x1164, 0x1180, 0x1182, 0x1185, 0x1188, 0x1191, 0x1194, 0x1201, 0x1204, 0x1209, 0x1210, 0x1215, 0x1221,
    0x1224, 0x1240, 0x1245, 0x1251, 0x1254, 0x1281, 0x1284, 0x1290, 0x1400, 0x1402, 0x1405, 0x1408, 0x1411, 0x1414, 0x1416, 0x1419,
    0x1420, 0x1425, 0x1428, 0x1441, 0x1444, 0x1446, 0x1449, 0x1450, 0x1452, 0x1455, 0x1458, 0x1461, 0x1464, 0x1480, 0x1482, 0x1485,
    0x1488, 0x1491, 0x1494, 0x14a0, 0x1501, 0x1504, 0x1506, 0x1509, 0x1510, 0x1512, 0x1515, 0x1518, 0x1521, 0x1524, 0x1540, 0x1542,
    0x1545, 0x1548, 0x1551, 0x1554, 0x1560, 0x1581, 0x1584, 0x1590, 0x1600, 0x1605, 0x1608, 0x1611, 0x1614, 0x1620, 0x1641, 0x1644,
    0x1650, 0x1680, 0x16aa, 0x1801, 0x1804, 0x1806, 0x1809, 0x1810, 0x1815, 0x1818, 0x1821, 0x1840, 0x1842, 0x1845, 0x1848, 0x1851,
    0x1854, 0x1860, 0x1881, 0x1884, 0x1900, 0x1902, 0x1905, 0x1908, 0x1911, 0x1914, 0x1920, 0x1941, 0x1944, 0x1950, 0x1969, 0x19a2,
    0x1a04, 0x1a10, 0x1a40, 0x1a56, 0x2000, 0x2002, 0x2005, 0x2008, 0x2011, 0x2014, 0x2016, 0x2019, 0x2020, 0x2025, 0x202a, 0x2041,
    0x2044, 0x2050, 0x2052, 0x2055, 0x2064, 0x2080, 0x208a, 0x2094, 0x20aa, 0x2101, 0x2104, 0x2110, 0x2112, 0x2115, 0x2121, 0x2140,
    0x2142, 0x2145, 0x2151, 0x2154, 0x2160, 0x2181, 0x2184, 0x2190, 0x2200, 0x220a, 0x2222, 0x2228, 0x222a, 0x2244, 0x2250, 0x2288,
    0x228a, 0x22a8, 0x2401, 0x2404, 0x2406, 0x2409, 0x2410, 0x2415, 0x2418, 0x2421, 0x2424, 0x2440, 0x2442, 0x2445, 0x2448, 0x2451,
    0x2454, 0x2460, 0x2481, 0x2484, 0x2490, 0x2500, 0x2505, 0x2508, 0x2511, 0x2514, 0x2520, 0x2541, 0x2544, 0x2550, 0x2566, 0x2580,
    0x2601, 0x2604, 0x2610, 0x2640, 0x2659, 0x2800, 0x2805, 0x2811, 0x2814, 0x2841, 0x2844, 0x2850, 0x288a, 0x28aa, 0x2901, 0x2904,
    0x2910, 0x2995, 0x2a0a, 0x2a22, 0x2a64, 0x2a88, 0x2a8a, 0x4001, 0x4004, 0x4006, 0x4009, 0x4010, 0x4012, 0x4015, 0x4018, 0x401a,
    0x4021, 0x4024, 0x4026, 0x4040, 0x4042, 0x4045, 0x4048, 0x404a, 0x4051, 0x4054, 0x4056, 0x4059, 0x4060, 0x4062, 0x4065, 0x4081,
    0x4084, 0x4090, 0x4095, 0x4098, 0x40a1, 0x40a4, 0x4100, 0x4102, 0x4105, 0x4108, 0x4111, 0x4114, 0x4116, 0x4119, 0x4120, 0x4122,
    0x4125, 0x4141, 0x4144, 0x4146, 0x4149, 0x4150, 0x4152, 0x4155, 0x4158, 0x4161, 0x4164, 0x4180, 0x4182, 0x4185, 0x4188, 0x4191,
    0x4194, 0x41a0, 0x4201, 0x4204, 0x4210, 0x4212, 0x4215, 0x4218, 0x4224, 0x4240, 0x4245, 0x4248, 0x4251, 0x4254, 0x4260, 0x4281,
    0x4284, 0x4400, 0x4402, 0x4405, 0x4408, 0x440a, 0x4411, 0x4414, 0x4416, 0x4419, 0x4420, 0x4422, 0x4425, 0x4428, 0x4441, 0x4444,
    0x4446, 0x4449, 0x4450, 0x4452, 0x4455, 0x4458, 0x4461, 0x4464, 0x4480, 0x4482, 0x4485, 0x4488, 0x4491, 0x4494, 0x44a0, 0x4501,
    0x4504, 0x4506, 0x4509, 0x4510, 0x4512, 0x4515, 0x4518, 0x4521, 0x4524, 0x4540, 0x4542, 0x4545, 0x4548, 0x4551, 0x4554, 0x4560,
    0x456a, 0x4581, 0x4584, 0x4590, 0x4600, 0x4602, 0x4605, 0x4608, 0x4611, 0x4614, 0x4620, 0x4641, 0x4644, 0x4650, 0x4680, 0x46a5,
    0x4801, 0x4804, 0x4809, 0x4810, 0x4812, 0x4815, 0x4818, 0x4821, 0x4824, 0x4840, 0x4842, 0x4845, 0x4848, 0x4851, 0x4854, 0x4860,
    0x4884, 0x4890, 0x4900, 0x4902, 0x4905, 0x4908, 0x4911, 0x4914, 0x4920, 0x4941, 0x4944, 0x4950, 0x4980, 0x4996, 0x4a01, 0x4a04,
    0x4a10, 0x4a40, 0x5000, 0x5002, 0x5005, 0x5008, 0x5011, 0x5014, 0x5016, 0x5019, 0x5020, 0x5022, 0x5025, 0x5028, 0x5041, 0x5044,
    0x5046, 0x5049, 0x5050, 0x5052, 0x5055, 0x5058, 0x5061, 0x5064, 0x5080, 0x5082, 0x5085, 0x5088, 0x5091, 0x5094, 0x5101, 0x5104,
    0x5106, 0x5109, 0x5110, 0x5112, 0x5115, 0x5118, 0x5121, 0x5124, 0x5140, 0x5142, 0x5145, 0x5148, 0x5151, 0x5154, 0x5160, 0x5181,
    0x5184, 0x5190, 0x5200, 0x5205, 0x5208, 0x5211, 0x5214, 0x5220, 0x5241, 0x5244, 0x5250, 0x5269, 0x5280, 0x5401, 0x5404, 0x5406,
    0x5409, 0x5410, 0x5412, 0x5415, 0x5418, 0x5421, 0x5424, 0x5440, 0x5442, 0x5445, 0x5448, 0x5451, 0x5454, 0x5460, 0x5481, 0x5484,
    0x5490, 0x5500, 0x5502, 0x5505, 0x5508, 0x5511, 0x5514, 0x5520, 0x5541, 0x5544, 0x5550, 0x5580, 0x5601, 0x5604, 0x5610, 0x5626,
    0x5640, 0x5800, 0x5802, 0x5805, 0x5808, 0x5811, 0x5814, 0x5820, 0x5841, 0x5844, 0x5850, 0x585a, 0x5880, 0x5901, 0x5904, 0x5910,
    0x5940, 0x5a00, 0x5a19, 0x5a85, 0x5aa8, 0x6001, 0x6004, 0x6006, 0x6010, 0x6012, 0x6015, 0x6018, 0x6021, 0x6024, 0x6040, 0x6045,
    0x6048, 0x6051, 0x6054, 0x6060, 0x6084, 0x6090, 0x6100, 0x6102, 0x6105, 0x6108, 0x6111, 0x6114, 0x6120, 0x6141, 0x6144, 0x6150,
    0x6180, 0x6199, 0x6204, 0x6210, 0x6240, 0x6256, 0x62a1, 0x6400, 0x6405, 0x6408, 0x6411, 0x6414, 0x6420, 0x6441, 0x6444, 0x6450,
    0x6480, 0x6501, 0x6504, 0x6510, 0x6540, 0x654a, 0x6568, 0x6592, 0x6600, 0x6694, 0x6801, 0x6804, 0x6810, 0x6865, 0x6898, 0x6900,
    0x692a, 0x6a42, 0x6aa1, 0x8000, 0x8002, 0x8005, 0x8008, 0x8011, 0x8014, 0x8019, 0x8020, 0x8025, 0x8041, 0x8044, 0x8050, 0x8052,
    0x8055, 0x8058, 0x8061, 0x8080, 0x8085, 0x8091, 0x8094, 0x8101, 0x8104, 0x8109, 0x8110, 0x8112, 0x8115, 0x8118, 0x8121, 0x8124,
    0x8140, 0x8142, 0x8145, 0x8148, 0x8151, 0x8154, 0x8181, 0x8184, 0x8190, 0x81a9, 0x8200, 0x8205, 0x820a, 0x8211, 0x8214, 0x8241,
    0x8244, 0x8250, 0x8401, 0x8404, 0x8406, 0x8409, 0x8410, 0x8412, 0x8415, 0x8418, 0x8421, 0x8440, 0x8442, 0x8445, 0x8448, 0x8451,
    0x8454, 0x8460, 0x8481, 0x8484, 0x8490, 0x8500, 0x8502, 0x8505, 0x8508, 0x8511, 0x8514, 0x8520, 0x8541, 0x8544, 0x8550, 0x8580,
    0x858a, 0x8601, 0x8604, 0x8610, 0x8629, 0x8640, 0x8800, 0x8805, 0x8811, 0x8814, 0x8841, 0x8844, 0x8850, 0x88a2, 0x8901, 0x8904,
    0x8940, 0x8965, 0x8a22, 0x8a58, 0x8a5a, 0x8a82, 0x8aa2, 0x9001, 0x9004, 0x9009, 0x9010, 0x9012, 0x9015, 0x9018, 0x9024, 0x9040,
    0x9042, 0x9045, 0x9048, 0x9051, 0x9054, 0x9060, 0x9081, 0x9084, 0x9090, 0x9100, 0x9105, 0x9111, 0x9114, 0x9141, 0x9144, 0x9150,
    0x915a, 0x9201, 0x9204, 0x9210, 0x9240, 0x92a6, 0x9400, 0x9402, 0x9405, 0x9408, 0x9411, 0x9414, 0x9420, 0x9441, 0x9444, 0x9450,
    0x9480, 0x9496, 0x9501, 0x9504, 0x9510, 0x9540, 0x9598, 0x95a1, 0x9600, 0x9646, 0x9664, 0x9801, 0x9804, 0x9810, 0x9826, 0x9840,
    0x98a9, 0x9900, 0x9949, 0x9952, 0x9a90, 0xa000, 0xa005, 0xa00a, 0xa014, 0xa022, 0xa02a, 0xa041, 0xa044, 0xa050, 0xa0a2, 0xa0aa,
    0xa140, 0xa165, 0xa202, 0xa20a, 0xa222, 0xa228, 0xa22a, 0xa282, 0xa288, 0xa28a, 0xa2a8, 0xa401, 0xa404, 0xa410, 0xa440, 0xa489,
    0xa4a4, 0xa500, 0xa519, 0xa651, 0xa80a, 0xa828, 0xa8a2, 0xa954, 0xa986, 0xaa08, 0xaa0a, 0xaa20, 0xaa22, 0xaa28, 0xaa88, 0xaaaa,
};
// kIq3xxsGridCodes: 256 entries (ggml's iq3xxs_grid), 3-bit level indices
constexpr uint16_t kIq3xxsGridCodes[256] = {
    0x0000, 0x0002, 0x0004, 0x0009, 0x000b, 0x000f, 0x0010, 0x0012, 0x0019, 0x0022, 0x003b, 0x003d, 0x0041, 0x0043, 0x0048, 0x004a,
    0x0051, 0x0055, 0x0058, 0x005a, 0x0061, 0x006c, 0x0078, 0x0080, 0x0082, 0x0084, 0x0089, 0x0090, 0x0092, 0x0099, 0x009b, 0x009f,
    0x00a9, 0x00af, 0x00bd, 0x00c1, 0x00c7, 0x00c8, 0x00ca, 0x00d5, 0x00f8, 0x010b, 0x011f, 0x0124, 0x012f, 0x013b, 0x013d, 0x0141,
    0x0147, 0x015a, 0x016a, 0x019d, 0x01b4, 0x01c8, 0x01cc, 0x01ce, 0x01e3, 0x01f1, 0x0201, 0x0203, 0x0208, 0x020a, 0x0211, 0x0213,
    0x0218, 0x021a, 0x021c, 0x0227, 0x0228, 0x0240, 0x0242, 0x0249, 0x0250, 0x0252, 0x0281, 0x0283, 0x0288, 0x028a, 0x0291, 0x0298,
    0x02ba, 0x02c0, 0x02c2, 0x02d0, 0x02d9, 0x02e6, 0x02f6, 0x0301, 0x0305, 0x0328, 0x0350, 0x0354, 0x0366, 0x0379, 0x0385, 0x03d2,
    0x03e0, 0x0400, 0x0402, 0x0409, 0x040b, 0x0410, 0x0412, 0x0416, 0x0419, 0x0422, 0x0441, 0x0443, 0x0445, 0x0448, 0x044a, 0x0451,
    0x0458, 0x0473, 0x0477, 0x0478, 0x0480, 0x0482, 0x0489, 0x048f, 0x0490, 0x0492, 0x049f, 0x04a0, 0x04ad, 0x04c1, 0x04c8, 0x04cc,
    0x04f8, 0x04fc, 0x051d, 0x052b, 0x0543, 0x0557, 0x0561, 0x057c, 0x05c1, 0x05c3, 0x05ce, 0x05e5, 0x0601, 0x0608, 0x060a, 0x0611,
    0x0613, 0x0628, 0x0635, 0x063a, 0x0640, 0x0642, 0x0650, 0x0659, 0x0664, 0x0666, 0x0681, 0x0683, 0x0688, 0x0695, 0x06aa, 0x06ba,
    0x06c9, 0x06db, 0x0718, 0x0727, 0x073a, 0x0740, 0x0746, 0x0752, 0x076d, 0x078c, 0x079e, 0x07b3, 0x07db, 0x07f0, 0x0804, 0x080f,
    0x081d, 0x081f, 0x082b, 0x082f, 0x087c, 0x0890, 0x089f, 0x08a0, 0x08b0, 0x08b6, 0x08c7, 0x08e5, 0x0904, 0x0929, 0x0934, 0x0955,
    0x0963, 0x0978, 0x09c5, 0x09c8, 0x09ca, 0x09d8, 0x0a0a, 0x0a21, 0x0a38, 0x0a40, 0x0a46, 0x0a56, 0x0a6d, 0x0a8c, 0x0a9a, 0x0aba,
    0x0ac2, 0x0aeb, 0x0b08, 0x0b13, 0x0b17, 0x0b3a, 0x0b42, 0x0b59, 0x0ba8, 0x0bd4, 0x0be2, 0x0c14, 0x0c24, 0x0c26, 0x0c34, 0x0c51,
    0x0c71, 0x0c8f, 0x0cb4, 0x0cd8, 0x0cde, 0x0d24, 0x0d45, 0x0d6a, 0x0d9b, 0x0dc3, 0x0dd1, 0x0e03, 0x0e05, 0x0e07, 0x0e08, 0x0e1a,
    0x0e2a, 0x0e56, 0x0e60, 0x0e8a, 0x0ea5, 0x0eaa, 0x0ec0, 0x0ecd, 0x0edb, 0x0ef0, 0x0f11, 0x0f21, 0x0f40, 0x0f42, 0x0f54, 0x0f98,
};
// kIq3sGridCodes: 512 entries (ggml's iq3s_grid), 3-bit level indices
constexpr uint16_t kIq3sGridCodes[512] = {
    0x0000, 0x0001, 0x0002, 0x0005, 0x0007, 0x0008, 0x0009, 0x000a, 0x000c, 0x000e, 0x0010, 0x0011, 0x0015, 0x001b, 0x0020, 0x0022,
    0x0025, 0x0027, 0x0029, 0x002b, 0x0030, 0x0032, 0x0039, 0x003c, 0x003f, 0x0040, 0x0041, 0x0042, 0x0044, 0x0048, 0x0049, 0x004d,
    0x0050, 0x0053, 0x0057, 0x0059, 0x005d, 0x0064, 0x0071, 0x0075, 0x007a, 0x0080, 0x0081, 0x0085, 0x0087, 0x0088, 0x008b, 0x008e,
    0x0091, 0x0095, 0x0098, 0x009c, 0x00a2, 0x00a5, 0x00a7, 0x00a9, 0x00ab, 0x00b8, 0x00bb, 0x00c3, 0x00c9, 0x00cd, 0x00d0, 0x00d2,
    0x00d9, 0x00db, 0x00de, 0x00e4, 0x00e8, 0x00ea, 0x00f7, 0x00f9, 0x00fd, 0x0100, 0x010b, 0x010f, 0x0111, 0x0114, 0x011a, 0x0120,
    0x0123, 0x0129, 0x0138, 0x0142, 0x0144, 0x0150, 0x0152, 0x0156, 0x015b, 0x0161, 0x0165, 0x0167, 0x0176, 0x017b, 0x0186, 0x0189,
    0x018b, 0x0199, 0x01aa, 0x01b9, 0x01c0, 0x01c2, 0x01c4, 0x01d0, 0x01d2, 0x01d6, 0x01db, 0x01e8, 0x01ec, 0x0200, 0x0201, 0x0202,
    0x0204, 0x0208, 0x0209, 0x020b, 0x020d, 0x020f, 0x0210, 0x0212, 0x0219, 0x021c, 0x021e, 0x022c, 0x022e, 0x0231, 0x023a, 0x0240,
    0x0241, 0x0243, 0x0246, 0x0248, 0x024c, 0x0251, 0x0258, 0x025b, 0x0261, 0x0268, 0x026a, 0x0278, 0x027e, 0x0280, 0x028a, 0x028d,
    0x028f, 0x0290, 0x0294, 0x029a, 0x02a0, 0x02a3, 0x02ad, 0x02b0, 0x02ba, 0x02c1, 0x02c4, 0x02c7, 0x02c8, 0x02cb, 0x02d1, 0x02d7,
    0x02d8, 0x02dc, 0x02e1, 0x02f2, 0x02f8, 0x0303, 0x0305, 0x030a, 0x030c, 0x0319, 0x031b, 0x0322, 0x0326, 0x0328, 0x032c, 0x0341,
    0x0348, 0x034b, 0x0351, 0x0358, 0x035a, 0x0369, 0x0390, 0x0394, 0x0397, 0x03a4, 0x03a6, 0x03c1, 0x03c3, 0x03c8, 0x03ca, 0x03d1,
    0x03dd, 0x03e1, 0x03f2, 0x03f8, 0x0400, 0x0401, 0x0403, 0x0405, 0x0407, 0x0408, 0x040a, 0x040c, 0x040e, 0x0411, 0x0413, 0x0417,
    0x0418, 0x041a, 0x0421, 0x0423, 0x0425, 0x0428, 0x042a, 0x0437, 0x0438, 0x043b, 0x043d, 0x0440, 0x0442, 0x0448, 0x044b, 0x044f,
    0x0452, 0x0455, 0x0459, 0x045c, 0x0462, 0x0469, 0x0481, 0x0484, 0x0487, 0x0491, 0x0493, 0x0498, 0x049f, 0x04a1, 0x04ab, 0x04af,
    0x04b9, 0x04bc, 0x04c0, 0x04c2, 0x04c5, 0x04c9, 0x04d2, 0x04d4, 0x04d9, 0x04db, 0x04e2, 0x04e8, 0x04f6, 0x0501, 0x0507, 0x0510,
    0x0513, 0x051a, 0x051d, 0x0521, 0x053a, 0x053d, 0x0544, 0x0549, 0x0552, 0x055f, 0x0560, 0x056b, 0x0578, 0x0580, 0x0582, 0x0587,
    0x0591, 0x05ad, 0x05b1, 0x05c5, 0x05c9, 0x05d6, 0x05d8, 0x05e3, 0x05e8, 0x0602, 0x0609, 0x060b, 0x060d, 0x060f, 0x0612, 0x0619,
    0x061b, 0x061d, 0x0622, 0x0624, 0x0627, 0x0629, 0x0633, 0x0639, 0x0641, 0x0643, 0x0645, 0x064c, 0x0651, 0x0653, 0x0660, 0x0670,
    0x067a, 0x067e, 0x0680, 0x068a, 0x0690, 0x069a, 0x069c, 0x06a8, 0x06c1, 0x06c8, 0x06cc, 0x06d1, 0x06d3, 0x06d7, 0x06d8, 0x06e1,
    0x06e3, 0x06e7, 0x06ed, 0x06fb, 0x0703, 0x0709, 0x070e, 0x0712, 0x0719, 0x072a, 0x0730, 0x0734, 0x0741, 0x0748, 0x074a, 0x0755,
    0x075a, 0x0764, 0x076e, 0x077b, 0x078e, 0x07a1, 0x07c1, 0x07c3, 0x07d0, 0x07d2, 0x07dd, 0x0800, 0x0804, 0x080a, 0x0810, 0x0814,
    0x0817, 0x081a, 0x0821, 0x0828, 0x0838, 0x0842, 0x0847, 0x0849, 0x084b, 0x0852, 0x0858, 0x085d, 0x0863, 0x0869, 0x086d, 0x0881,
    0x0883, 0x0888, 0x088d, 0x0891, 0x089b, 0x08a0, 0x08af, 0x08b2, 0x08b8, 0x08c4, 0x08c9, 0x08cb, 0x08d0, 0x08d2, 0x08d9, 0x08dd,
    0x0900, 0x0902, 0x0914, 0x091f, 0x0920, 0x0939, 0x0945, 0x0947, 0x0951, 0x0972, 0x098b, 0x099c, 0x09b0, 0x09c8, 0x09cd, 0x09d8,
    0x09e3, 0x09e9, 0x0a02, 0x0a08, 0x0a0c, 0x0a12, 0x0a20, 0x0a24, 0x0a27, 0x0a2a, 0x0a36, 0x0a3c, 0x0a41, 0x0a43, 0x0a45, 0x0a4a,
    0x0a51, 0x0a5a, 0x0a7a, 0x0a80, 0x0a89, 0x0a93, 0x0a98, 0x0a9e, 0x0aab, 0x0ac2, 0x0ac7, 0x0ac8, 0x0ad7, 0x0ae4, 0x0ae9, 0x0af5,
    0x0afb, 0x0b01, 0x0b04, 0x0b10, 0x0b1a, 0x0b26, 0x0b4a, 0x0b56, 0x0b69, 0x0b6b, 0x0ba2, 0x0bc2, 0x0bc4, 0x0bd2, 0x0c09, 0x0c0b,
    0x0c0d, 0x0c19, 0x0c1b, 0x0c30, 0x0c40, 0x0c50, 0x0c57, 0x0c74, 0x0c8a, 0x0c9c, 0x0ca2, 0x0cad, 0x0cb2, 0x0cb8, 0x0cc0, 0x0ccc,
    0x0cd1, 0x0ce0, 0x0d15, 0x0d23, 0x0d32, 0x0d40, 0x0d43, 0x0d5c, 0x0d70, 0x0d85, 0x0da0, 0x0dc9, 0x0dcb, 0x0e00, 0x0e04, 0x0e07,
    0x0e10, 0x0e12, 0x0e1e, 0x0e20, 0x0e2c, 0x0e32, 0x0e42, 0x0e49, 0x0e54, 0x0e63, 0x0e65, 0x0e81, 0x0e84, 0x0e88, 0x0e8e, 0x0e91,
    0x0e98, 0x0ea9, 0x0ec2, 0x0eda, 0x0edd, 0x0eeb, 0x0f01, 0x0f05, 0x0f0b, 0x0f10, 0x0f28, 0x0f52, 0x0f62, 0x0f82, 0x0f99, 0x0fc0,
};
// kIq1sGridCodes: 2048 entries (ggml's iq1s_grid), 2-bit level indices
constexpr uint16_t kIq1sGridCodes[2048] = {
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0015, 0x0020, 0x0022, 0x0028, 0x002a, 0x0045, 0x0051, 0x0054, 0x0056, 0x0065,
    0x0080, 0x0082, 0x0088, 0x008a, 0x0095, 0x00a0, 0x00a2, 0x00a8, 0x00aa, 0x0104, 0x0105, 0x0111, 0x0114, 0x0116, 0x0119, 0x011a,
    0x0125, 0x0141, 0x0146, 0x0149, 0x0152, 0x0155, 0x015a, 0x0161, 0x0164, 0x0166, 0x0168, 0x0185, 0x0191, 0x0194, 0x0196, 0x01a5,
    0x0200, 0x0202, 0x0208, 0x020a, 0x0215, 0x0220, 0x0222, 0x0228, 0x022a, 0x0245, 0x0251, 0x0259, 0x0264, 0x0269, 0x0280, 0x0282,
    0x0288, 0x028a, 0x0291, 0x0295, 0x0299, 0x02a0, 0x02a2, 0x02a8, 0x02aa, 0x0411, 0x0414, 0x0416, 0x0425, 0x0441, 0x0449, 0x0455,
    0x045a, 0x0464, 0x0465, 0x0491, 0x0499, 0x04a5, 0x0501, 0x0504, 0x0505, 0x0506, 0x0515, 0x0518, 0x051a, 0x0529, 0x0540, 0x0545,
    0x054a, 0x0550, 0x0551, 0x0554, 0x0555, 0x0556, 0x0559, 0x0560, 0x0562, 0x0565, 0x0568, 0x056a, 0x0581, 0x0591, 0x0595, 0x0598,
    0x059a, 0x05a1, 0x05a4, 0x05a5, 0x05a6, 0x05a9, 0x0614, 0x0619, 0x0641, 0x0644, 0x0650, 0x0652, 0x0655, 0x0658, 0x0660, 0x0661,
    0x0666, 0x0669, 0x0685, 0x0691, 0x0694, 0x0699, 0x0800, 0x0802, 0x0808, 0x080a, 0x0815, 0x0820, 0x0822, 0x0828, 0x082a, 0x0845,
    0x0851, 0x0856, 0x0865, 0x0880, 0x0882, 0x0888, 0x088a, 0x0895, 0x08a0, 0x08a2, 0x08a8, 0x08aa, 0x0905, 0x0911, 0x0914, 0x0919,
    0x0924, 0x0925, 0x0941, 0x0950, 0x0951, 0x0955, 0x0961, 0x0964, 0x0969, 0x0991, 0x0994, 0x0996, 0x0999, 0x09a5, 0x0a00, 0x0a02,
    0x0a08, 0x0a0a, 0x0a15, 0x0a20, 0x0a22, 0x0a28, 0x0a2a, 0x0a45, 0x0a51, 0x0a59, 0x0a61, 0x0a65, 0x0a80, 0x0a82, 0x0a85, 0x0a88,
    0x0a8a, 0x0a95, 0x0aa0, 0x0aa2, 0x0aa8, 0x0aaa, 0x1010, 0x1011, 0x1014, 0x1019, 0x1024, 0x1025, 0x1041, 0x1044, 0x1050, 0x1055,
    0x1058, 0x1061, 0x1064, 0x1065, 0x1069, 0x1091, 0x1094, 0x1096, 0x10a1, 0x10a5, 0x1101, 0x1104, 0x1106, 0x1109, 0x1110, 0x1112,
    0x1115, 0x1118, 0x1121, 0x1124, 0x1129, 0x1145, 0x114a, 0x1150, 0x1151, 0x1152, 0x1154, 0x1155, 0x1156, 0x1159, 0x1160, 0x1165,
    0x1184, 0x1192, 0x1195, 0x11a1, 0x11a4, 0x1211, 0x1214, 0x1216, 0x1225, 0x1240, 0x1246, 0x1249, 0x1252, 0x1255, 0x1258, 0x125a,
    0x1264, 0x1266, 0x1285, 0x1291, 0x1294, 0x1296, 0x12a5, 0x1401, 0x1406, 0x1409, 0x1414, 0x1415, 0x1418, 0x1419, 0x1421, 0x1426,
    0x1441, 0x1445, 0x1446, 0x1448, 0x144a, 0x1451, 0x1454, 0x1455, 0x1456, 0x1459, 0x1462, 0x1465, 0x1468, 0x1484, 0x1489, 0x1490,
    0x1494, 0x1495, 0x1498, 0x1499, 0x149a, 0x14a1, 0x14a4, 0x14a5, 0x14a9, 0x1502, 0x1505, 0x150a, 0x1511, 0x1514, 0x1515, 0x1516,
    0x1519, 0x1520, 0x1522, 0x1525, 0x1528, 0x152a, 0x1541, 0x1544, 0x1545, 0x1546, 0x1551, 0x1552, 0x1554, 0x1555, 0x1556, 0x1559,
    0x155a, 0x1561, 0x1564, 0x1565, 0x1566, 0x1569, 0x1580, 0x1582, 0x1584, 0x1585, 0x1588, 0x158a, 0x1590, 0x1591, 0x1594, 0x1595,
    0x1596, 0x1599, 0x159a, 0x15a0, 0x15a2, 0x15a5, 0x1601, 0x1604, 0x1605, 0x1606, 0x1615, 0x1616, 0x1618, 0x161a, 0x1621, 0x1626,
    0x1640, 0x1642, 0x1644, 0x1645, 0x1648, 0x164a, 0x1651, 0x1655, 0x1656, 0x1658, 0x1659, 0x1661, 0x1664, 0x1665, 0x1668, 0x1669,
    0x166a, 0x1686, 0x168a, 0x1692, 0x1695, 0x16a4, 0x16a9, 0x1811, 0x1816, 0x1825, 0x1841, 0x1844, 0x1846, 0x1849, 0x1850, 0x1855,
    0x1858, 0x185a, 0x1860, 0x1861, 0x1864, 0x1866, 0x1869, 0x1885, 0x1891, 0x1894, 0x18a5, 0x1910, 0x1912, 0x1915, 0x191a, 0x1921,
    0x1925, 0x1942, 0x1944, 0x1945, 0x1948, 0x1951, 0x1954, 0x1955, 0x1956, 0x1959, 0x195a, 0x1960, 0x1965, 0x196a, 0x1989, 0x1991,
    0x1992, 0x1995, 0x1998, 0x19a1, 0x19a6, 0x19a9, 0x1a09, 0x1a16, 0x1a24, 0x1a26, 0x1a44, 0x1a46, 0x1a49, 0x1a50, 0x1a52, 0x1a55,
    0x1a58, 0x1a61, 0x1a66, 0x1a69, 0x1a85, 0x1a91, 0x1a96, 0x1a9a, 0x2000, 0x2002, 0x2008, 0x200a, 0x2015, 0x2020, 0x2022, 0x2025,
    0x2028, 0x202a, 0x2045, 0x2051, 0x2059, 0x2061, 0x2065, 0x2080, 0x2082, 0x2088, 0x208a, 0x2095, 0x20a0, 0x20a2, 0x20a5, 0x20a8,
    0x20aa, 0x2105, 0x2111, 0x2114, 0x2119, 0x2125, 0x2142, 0x2144, 0x2149, 0x2155, 0x2158, 0x215a, 0x2161, 0x2164, 0x2165, 0x2166,
    0x2185, 0x2190, 0x2196, 0x2199, 0x21a5, 0x2201, 0x2208, 0x220a, 0x2211, 0x2215, 0x2220, 0x2222, 0x2228, 0x222a, 0x2245, 0x2251,
    0x2256, 0x2259, 0x2265, 0x2281, 0x2288, 0x228a, 0x2291, 0x2295, 0x22a0, 0x22a2, 0x22a8, 0x22aa, 0x2405, 0x2414, 0x2416, 0x2419,
    0x2425, 0x2444, 0x2445, 0x2446, 0x2449, 0x2452, 0x2455, 0x2458, 0x245a, 0x2466, 0x2485, 0x2491, 0x2494, 0x2499, 0x24a1, 0x24a5,
    0x2509, 0x2515, 0x2521, 0x2529, 0x2540, 0x2545, 0x2548, 0x2551, 0x2554, 0x2555, 0x2559, 0x2562, 0x2565, 0x2568, 0x2589, 0x2590,
    0x2594, 0x2595, 0x2598, 0x259a, 0x25a1, 0x25a4, 0x25a6, 0x25a9, 0x2605, 0x2610, 0x2612, 0x2619, 0x2625, 0x2641, 0x2649, 0x2655,
    0x2660, 0x2661, 0x2669, 0x2684, 0x2686, 0x2690, 0x269a, 0x2800, 0x2802, 0x2808, 0x280a, 0x2815, 0x2820, 0x2822, 0x2828, 0x282a,
    0x2845, 0x2851, 0x2854, 0x2865, 0x2880, 0x2882, 0x2888, 0x288a, 0x28a0, 0x28a2, 0x28a8, 0x28aa, 0x2909, 0x2911, 0x2914, 0x2919,
    0x2925, 0x2946, 0x2949, 0x2952, 0x2955, 0x2961, 0x2964, 0x2966, 0x2969, 0x2985, 0x2990, 0x2996, 0x2999, 0x29a4, 0x29a5, 0x2a00,
    0x2a02, 0x2a08, 0x2a0a, 0x2a20, 0x2a22, 0x2a28, 0x2a2a, 0x2a45, 0x2a51, 0x2a56, 0x2a59, 0x2a65, 0x2a80, 0x2a82, 0x2a88, 0x2a8a,
    0x2a95, 0x2aa0, 0x2aa2, 0x2aa8, 0x2aaa, 0x4005, 0x4011, 0x4016, 0x4025, 0x4049, 0x4052, 0x4055, 0x4058, 0x405a, 0x4061, 0x4064,
    0x4066, 0x4094, 0x4099, 0x40a1, 0x40a6, 0x4100, 0x4101, 0x4104, 0x4106, 0x4109, 0x4112, 0x4115, 0x4116, 0x4118, 0x411a, 0x4121,
    0x4126, 0x4129, 0x4145, 0x4148, 0x414a, 0x4151, 0x4154, 0x4155, 0x4156, 0x4159, 0x415a, 0x4165, 0x4168, 0x416a, 0x4181, 0x4184,
    0x4186, 0x4190, 0x4192, 0x4195, 0x41a0, 0x41a1, 0x41a2, 0x4205, 0x4211, 0x4214, 0x4216, 0x4225, 0x4241, 0x4252, 0x4255, 0x425a,
    0x4264, 0x4269, 0x4289, 0x4294, 0x42a5, 0x4401, 0x4415, 0x4419, 0x4429, 0x4445, 0x4448, 0x444a, 0x4451, 0x4454, 0x4455, 0x4456,
    0x4461, 0x4462, 0x4465, 0x4468, 0x446a, 0x4481, 0x4486, 0x4489, 0x4490, 0x4492, 0x4495, 0x44a0, 0x44a1, 0x44a9, 0x4501, 0x4502,
    0x4505, 0x450a, 0x4511, 0x4514, 0x4515, 0x4516, 0x4519, 0x4520, 0x4525, 0x452a, 0x4541, 0x4544, 0x4545, 0x4546, 0x4549, 0x4550,
    0x4551, 0x4554, 0x4555, 0x4556, 0x4558, 0x4559, 0x4561, 0x4564, 0x4565, 0x4566, 0x4569, 0x4582, 0x4584, 0x4585, 0x4588, 0x4591,
    0x4594, 0x4595, 0x4596, 0x4599, 0x459a, 0x45a5, 0x45a8, 0x45aa, 0x4601, 0x4605, 0x4609, 0x4614, 0x4615, 0x4618, 0x461a, 0x4621,
    0x4624, 0x4629, 0x4640, 0x4642, 0x4645, 0x4648, 0x4650, 0x4651, 0x4652, 0x4655, 0x4656, 0x4659, 0x4662, 0x4665, 0x4668, 0x4681,
    0x4685, 0x468a, 0x4694, 0x4695, 0x46a1, 0x46a4, 0x46a6, 0x4805, 0x4811, 0x4815, 0x481a, 0x4825, 0x4842, 0x4849, 0x4850, 0x4855,
    0x4858, 0x4861, 0x4864, 0x4866, 0x4869, 0x4885, 0x4891, 0x4894, 0x4896, 0x4899, 0x48a5, 0x4901, 0x4905, 0x4906, 0x490a, 0x4910,
    0x4914, 0x4915, 0x4918, 0x4921, 0x4924, 0x4926, 0x4940, 0x4945, 0x494a, 0x4951, 0x4952, 0x4954, 0x4955, 0x4956, 0x4959, 0x4960,
    0x4962, 0x4965, 0x4966, 0x496a, 0x4986, 0x4989, 0x4992, 0x4995, 0x4996, 0x4998, 0x49a1, 0x49a4, 0x49a6, 0x49a9, 0x4a16, 0x4a44,
    0x4a46, 0x4a49, 0x4a55, 0x4a58, 0x4a5a, 0x4a64, 0x4a69, 0x4a94, 0x4aa5, 0x5001, 0x5004, 0x5005, 0x5006, 0x5009, 0x5012, 0x5015,
    0x501a, 0x5021, 0x5024, 0x5029, 0x5040, 0x5045, 0x5048, 0x5051, 0x5054, 0x5055, 0x5056, 0x5059, 0x5065, 0x5068, 0x5086, 0x5089,
    0x5095, 0x5098, 0x50a0, 0x50a1, 0x50a6, 0x50a9, 0x5105, 0x5108, 0x5109, 0x510a, 0x5111, 0x5114, 0x5115, 0x5116, 0x5118, 0x5119,
    0x5120, 0x5125, 0x5126, 0x5128, 0x512a, 0x5141, 0x5144, 0x5145, 0x5146, 0x5149, 0x5150, 0x5151, 0x5152, 0x5154, 0x5155, 0x5156,
    0x5158, 0x5159, 0x515a, 0x5161, 0x5164, 0x5165, 0x5166, 0x5169, 0x5182, 0x5185, 0x5191, 0x5194, 0x5195, 0x5196, 0x5199, 0x51a0,
    0x51a5, 0x51aa, 0x5201, 0x5206, 0x5212, 0x5215, 0x521a, 0x5221, 0x5224, 0x5242, 0x5245, 0x524a, 0x5251, 0x5254, 0x5255, 0x5256,
    0x5259, 0x5262, 0x5265, 0x5285, 0x5290, 0x5292, 0x5295, 0x5299, 0x529a, 0x52a4, 0x5404, 0x5405, 0x5411, 0x5414, 0x5415, 0x5416,
    0x5418, 0x5419, 0x5421, 0x5425, 0x5428, 0x542a, 0x5441, 0x5444, 0x5445, 0x5446, 0x5449, 0x544a, 0x5450, 0x5451, 0x5454, 0x5455,
    0x5456, 0x5458, 0x5459, 0x545a, 0x5461, 0x5462, 0x5464, 0x5465, 0x5466, 0x5469, 0x5480, 0x5488, 0x548a, 0x5491, 0x5494, 0x5495,
    0x5496, 0x5499, 0x54a1, 0x54a4, 0x54a5, 0x54aa, 0x5501, 0x5502, 0x5504, 0x5505, 0x5506, 0x5509, 0x5510, 0x5511, 0x5512, 0x5514,
    0x5515, 0x5516, 0x5519, 0x551a, 0x5521, 0x5524, 0x5525, 0x5526, 0x5529, 0x5540, 0x5541, 0x5542, 0x5544, 0x5545, 0x5546, 0x5548,
    0x5549, 0x5550, 0x5551, 0x5552, 0x5554, 0x5555, 0x5556, 0x5558, 0x5559, 0x555a, 0x5560, 0x5561, 0x5564, 0x5565, 0x5566, 0x5568,
    0x5569, 0x556a, 0x5581, 0x5584, 0x5585, 0x5589, 0x558a, 0x5590, 0x5591, 0x5594, 0x5595, 0x5596, 0x5598, 0x5599, 0x55a1, 0x55a4,
    0x55a5, 0x55a6, 0x55a9, 0x5600, 0x5601, 0x5602, 0x5604, 0x5606, 0x5608, 0x5609, 0x5611, 0x5614, 0x5615, 0x5618, 0x5619, 0x5620,
    0x5621, 0x5622, 0x5624, 0x5625, 0x5626, 0x5628, 0x5629, 0x5641, 0x5645, 0x5646, 0x5648, 0x5649, 0x564a, 0x5650, 0x5651, 0x5652,
    0x5654, 0x5655, 0x5656, 0x5658, 0x5659, 0x565a, 0x5661, 0x5664, 0x5665, 0x5669, 0x5682, 0x5685, 0x5686, 0x5688, 0x5689, 0x568a,
    0x5691, 0x5695, 0x569a, 0x56a2, 0x56a5, 0x56a6, 0x56a8, 0x56a9, 0x5804, 0x5805, 0x5806, 0x5809, 0x5810, 0x5815, 0x5818, 0x5821,
    0x582a, 0x5845, 0x5848, 0x584a, 0x5851, 0x5854, 0x5855, 0x5856, 0x5858, 0x5859, 0x5860, 0x5862, 0x5864, 0x5865, 0x5882, 0x5889,
    0x5890, 0x5892, 0x5895, 0x5898, 0x58a1, 0x58a9, 0x5901, 0x5902, 0x5905, 0x590a, 0x5911, 0x5914, 0x5915, 0x5916, 0x5919, 0x5925,
    0x5941, 0x5944, 0x5945, 0x5946, 0x5949, 0x5950, 0x5951, 0x5952, 0x5954, 0x5955, 0x5956, 0x5958, 0x5959, 0x595a, 0x5961, 0x5964,
    0x5965, 0x5966, 0x5969, 0x5981, 0x5985, 0x5989, 0x5991, 0x5994, 0x5995, 0x5996, 0x5998, 0x5999, 0x59a5, 0x5a04, 0x5a08, 0x5a15,
    0x5a1a, 0x5a20, 0x5a25, 0x5a26, 0x5a29, 0x5a45, 0x5a48, 0x5a49, 0x5a51, 0x5a55, 0x5a56, 0x5a58, 0x5a59, 0x5a62, 0x5a65, 0x5a68,
    0x5a6a, 0x5a81, 0x5a8a, 0x5a92, 0x5a95, 0x5a96, 0x5a98, 0x5a9a, 0x5aa1, 0x6005, 0x6014, 0x6016, 0x6019, 0x6025, 0x6044, 0x6050,
    0x6055, 0x6056, 0x6058, 0x605a, 0x6061, 0x6064, 0x6066, 0x6069, 0x6081, 0x6096, 0x60a5, 0x6101, 0x6104, 0x6106, 0x6109, 0x6112,
    0x6115, 0x6121, 0x6122, 0x6126, 0x6129, 0x6145, 0x6149, 0x6151, 0x6155, 0x6156, 0x6159, 0x6165, 0x6166, 0x616a, 0x6184, 0x618a,
    0x6192, 0x6195, 0x61a1, 0x61a6, 0x61a9, 0x6211, 0x6216, 0x6219, 0x6240, 0x6241, 0x6246, 0x6255, 0x6256, 0x6258, 0x6260, 0x6285,
    0x6291, 0x6296, 0x62a5, 0x6411, 0x6412, 0x6415, 0x6416, 0x641a, 0x6421, 0x6426, 0x6429, 0x6440, 0x6442, 0x6445, 0x6448, 0x644a,
    0x6451, 0x6454, 0x6455, 0x6456, 0x6459, 0x645a, 0x6460, 0x6462, 0x6465, 0x6484, 0x6485, 0x6489, 0x6490, 0x6492, 0x6494, 0x6495,
    0x6496, 0x6498, 0x649a, 0x64a1, 0x64a4, 0x64a9, 0x6505, 0x6508, 0x650a, 0x6511, 0x6515, 0x6516, 0x6519, 0x6544, 0x6545, 0x6546,
    0x6549, 0x6550, 0x6551, 0x6554, 0x6555, 0x6556, 0x6559, 0x6561, 0x6564, 0x6565, 0x6566, 0x6569, 0x6586, 0x6589, 0x658a, 0x6591,
    0x6595, 0x6596, 0x6599, 0x659a, 0x65a2, 0x65a5, 0x65a6, 0x65a8, 0x6602, 0x6609, 0x6615, 0x6620, 0x6626, 0x6628, 0x6629, 0x6640,
    0x6645, 0x6648, 0x664a, 0x6651, 0x6654, 0x6655, 0x6656, 0x6658, 0x665a, 0x6660, 0x6665, 0x6668, 0x6680, 0x6682, 0x6685, 0x668a,
    0x6694, 0x6696, 0x6698, 0x6699, 0x66a0, 0x66a4, 0x66a6, 0x66aa, 0x6816, 0x6819, 0x6825, 0x6841, 0x6852, 0x6855, 0x685a, 0x6861,
    0x6869, 0x6885, 0x6891, 0x6898, 0x68a6, 0x6901, 0x6904, 0x6910, 0x6915, 0x6921, 0x6924, 0x6926, 0x6929, 0x6940, 0x6941, 0x6945,
    0x6946, 0x6948, 0x6951, 0x6954, 0x6955, 0x6956, 0x6959, 0x6960, 0x6965, 0x696a, 0x6982, 0x6984, 0x698a, 0x6995, 0x69a1, 0x69a4,
    0x69a5, 0x69a9, 0x6a11, 0x6a16, 0x6a18, 0x6a41, 0x6a44, 0x6a49, 0x6a50, 0x6a55, 0x6a58, 0x6a5a, 0x6a64, 0x6a65, 0x6a69, 0x6a86,
    0x6a94, 0x6a98, 0x6a9a, 0x6aa6, 0x8000, 0x8002, 0x8008, 0x800a, 0x8020, 0x8022, 0x8028, 0x802a, 0x8045, 0x8050, 0x8051, 0x8054,
    0x8056, 0x8059, 0x8065, 0x8080, 0x8082, 0x8088, 0x808a, 0x8095, 0x80a0, 0x80a2, 0x80a8, 0x80aa, 0x8105, 0x8111, 0x8114, 0x8116,
    0x8119, 0x8125, 0x8141, 0x8144, 0x8149, 0x8150, 0x8152, 0x8155, 0x8156, 0x8158, 0x8159, 0x8164, 0x8166, 0x8169, 0x8185, 0x8189,
    0x8194, 0x8196, 0x8199, 0x81a5, 0x8200, 0x8202, 0x8208, 0x820a, 0x8215, 0x8220, 0x8222, 0x8228, 0x822a, 0x8251, 0x8254, 0x8259,
    0x8265, 0x8280, 0x8282, 0x8288, 0x828a, 0x8295, 0x82a0, 0x82a2, 0x82a8, 0x82aa, 0x8414, 0x8419, 0x8441, 0x8444, 0x8451, 0x8455,
    0x845a, 0x8461, 0x8464, 0x8469, 0x8494, 0x8499, 0x8501, 0x8509, 0x8512, 0x8515, 0x851a, 0x8526, 0x8529, 0x8540, 0x8541, 0x8545,
    0x8548, 0x8551, 0x8554, 0x8555, 0x8556, 0x8559, 0x855a, 0x8565, 0x8566, 0x8568, 0x856a, 0x8581, 0x8584, 0x8586, 0x8589, 0x8590,
    0x8592, 0x8595, 0x8598, 0x85a6, 0x8611, 0x8616, 0x8619, 0x8625, 0x8641, 0x8644, 0x8649, 0x864a, 0x8650, 0x8655, 0x8659, 0x865a,
    0x8661, 0x8666, 0x866a, 0x8685, 0x8691, 0x869a, 0x86a4, 0x8800, 0x8802, 0x8808, 0x880a, 0x8815, 0x8820, 0x8822, 0x8828, 0x882a,
    0x8841, 0x8845, 0x8851, 0x8854, 0x8859, 0x8865, 0x8869, 0x8880, 0x8882, 0x8888, 0x888a, 0x8895, 0x88a0, 0x88a2, 0x88a8, 0x88aa,
    0x8905, 0x8906, 0x8911, 0x8914, 0x8916, 0x8925, 0x8941, 0x8944, 0x8946, 0x8949, 0x8950, 0x8952, 0x8955, 0x895a, 0x8961, 0x8964,
    0x8985, 0x8996, 0x8999, 0x89a5, 0x8a00, 0x8a02, 0x8a08, 0x8a0a, 0x8a15, 0x8a20, 0x8a22, 0x8a28, 0x8a2a, 0x8a45, 0x8a51, 0x8a54,
    0x8a56, 0x8a80, 0x8a82, 0x8a88, 0x8a8a, 0x8a95, 0x8aa0, 0x8aa2, 0x8aa8, 0x8aaa, 0x9005, 0x9011, 0x9016, 0x9018, 0x9019, 0x9025,
    0x9041, 0x9046, 0x9049, 0x9055, 0x9058, 0x905a, 0x9069, 0x906a, 0x9085, 0x9091, 0x9094, 0x9096, 0x9099, 0x90a5, 0x9101, 0x9104,
    0x9106, 0x9109, 0x9110, 0x9115, 0x9118, 0x911a, 0x9121, 0x9124, 0x9126, 0x9129, 0x9140, 0x9145, 0x9150, 0x9151, 0x9154, 0x9155,
    0x9156, 0x9159, 0x9162, 0x9165, 0x9184, 0x9186, 0x9192, 0x9195, 0x9198, 0x91a1, 0x91a4, 0x91a6, 0x91a9, 0x9205, 0x9211, 0x9214,
    0x9219, 0x9225, 0x9244, 0x9246, 0x9249, 0x9250, 0x9252, 0x9255, 0x9258, 0x9266, 0x9269, 0x9285, 0x9294, 0x9296, 0x92a9, 0x9401,
    0x9404, 0x9406, 0x9410, 0x9415, 0x9418, 0x9426, 0x9440, 0x944a, 0x9451, 0x9454, 0x9455, 0x9456, 0x9458, 0x9459, 0x9460, 0x9461,
    0x9462, 0x9465, 0x9484, 0x9486, 0x9492, 0x9494, 0x9495, 0x9498, 0x94a1, 0x94a9, 0x9500, 0x9505, 0x9508, 0x950a, 0x9510, 0x9511,
    0x9514, 0x9515, 0x9516, 0x9519, 0x9521, 0x9525, 0x9529, 0x952a, 0x9541, 0x9544, 0x9545, 0x9546, 0x9549, 0x9550, 0x9551, 0x9552,
    0x9554, 0x9555, 0x9556, 0x9558, 0x9559, 0x955a, 0x9561, 0x9564, 0x9565, 0x9566, 0x9569, 0x9581, 0x9585, 0x9588, 0x9591, 0x9592,
    0x9594, 0x9595, 0x9596, 0x9599, 0x959a, 0x95a0, 0x95a2, 0x95a5, 0x95a8, 0x95aa, 0x9601, 0x9604, 0x9610, 0x9615, 0x9619, 0x9620,
    0x9626, 0x9629, 0x9645, 0x9648, 0x9649, 0x9651, 0x9652, 0x9655, 0x9656, 0x9659, 0x9665, 0x9668, 0x9682, 0x9684, 0x9689, 0x968a,
    0x9692, 0x9694, 0x9695, 0x96a4, 0x96a6, 0x96a9, 0x9805, 0x9816, 0x9819, 0x9825, 0x9841, 0x9846, 0x9850, 0x9852, 0x9855, 0x9856,
    0x985a, 0x9864, 0x9865, 0x9885, 0x9891, 0x9896, 0x9899, 0x98a5, 0x9904, 0x9906, 0x9909, 0x9910, 0x9912, 0x9915, 0x9918, 0x991a,
    0x9920, 0x9921, 0x9924, 0x9926, 0x9940, 0x9942, 0x9945, 0x9948, 0x994a, 0x9951, 0x9954, 0x9955, 0x9956, 0x9959, 0x9962, 0x9965,
    0x9966, 0x996a, 0x9981, 0x9984, 0x9990, 0x9992, 0x9995, 0x999a, 0x99a1, 0x99a6, 0x9a05, 0x9a15, 0x9a25, 0x9a44, 0x9a46, 0x9a49,
    0x9a50, 0x9a55, 0x9a58, 0x9a61, 0x9a85, 0x9a91, 0x9a94, 0x9a95, 0x9a96, 0xa000, 0xa002, 0xa008, 0xa00a, 0xa015, 0xa020, 0xa022,
    0xa028, 0xa02a, 0xa045, 0xa051, 0xa054, 0xa056, 0xa059, 0xa080, 0xa082, 0xa088, 0xa08a, 0xa095, 0xa0a0, 0xa0a2, 0xa0a8, 0xa0aa,
    0xa105, 0xa109, 0xa111, 0xa114, 0xa116, 0xa119, 0xa11a, 0xa146, 0xa149, 0xa151, 0xa155, 0xa158, 0xa15a, 0xa161, 0xa164, 0xa185,
    0xa190, 0xa192, 0xa196, 0xa199, 0xa202, 0xa208, 0xa20a, 0xa210, 0xa219, 0xa222, 0xa228, 0xa22a, 0xa245, 0xa251, 0xa256, 0xa259,
    0xa265, 0xa280, 0xa282, 0xa288, 0xa28a, 0xa295, 0xa2a0, 0xa2a2, 0xa2a8, 0xa2aa, 0xa419, 0xa425, 0xa441, 0xa444, 0xa450, 0xa454,
    0xa455, 0xa458, 0xa45a, 0xa461, 0xa465, 0xa466, 0xa468, 0xa469, 0xa485, 0xa506, 0xa509, 0xa510, 0xa512, 0xa515, 0xa518, 0xa526,
    0xa529, 0xa542, 0xa545, 0xa551, 0xa554, 0xa555, 0xa556, 0xa559, 0xa565, 0xa56a, 0xa581, 0xa584, 0xa585, 0xa586, 0xa589, 0xa592,
    0xa595, 0xa598, 0xa605, 0xa611, 0xa616, 0xa61a, 0xa621, 0xa625, 0xa644, 0xa646, 0xa64a, 0xa652, 0xa655, 0xa656, 0xa658, 0xa660,
    0xa662, 0xa686, 0xa690, 0xa695, 0xa696, 0xa699, 0xa6a1, 0xa6a4, 0xa6a6, 0xa800, 0xa802, 0xa808, 0xa80a, 0xa820, 0xa822, 0xa828,
    0xa82a, 0xa851, 0xa854, 0xa856, 0xa859, 0xa880, 0xa882, 0xa888, 0xa88a, 0xa895, 0xa8a0, 0xa8a2, 0xa8a8, 0xa8aa, 0xa905, 0xa914,
    0xa919, 0xa921, 0xa925, 0xa941, 0xa950, 0xa955, 0xa95a, 0xa961, 0xa966, 0xa969, 0xa990, 0xa996, 0xaa00, 0xaa02, 0xaa08, 0xaa0a,
    0xaa20, 0xaa22, 0xaa28, 0xaa2a, 0xaa51, 0xaa54, 0xaa56, 0xaa80, 0xaa82, 0xaa88, 0xaa8a, 0xaa95, 0xaaa0, 0xaaa2, 0xaaa8, 0xaaaa,
};

template <int N> struct IqGrid { uint64_t v[N]; };
// Entry i: value j (byte j) is levels[index j of codes[i]], `bits` bits per index.
template <int N>
constexpr IqGrid<N> expand_iq_grid(const uint16_t (&codes)[N], const uint8_t* levels, int values, int bits) {
    IqGrid<N> g{};
    for (int i = 0; i < N; ++i)
        for (int j = 0; j < values; ++j) g.v[i] |= (uint64_t)levels[(codes[i] >> (bits * j)) & ((1 << bits) - 1)] << (8 * j);
    return g;
}
constexpr uint8_t kIq2Levels[4] = {8, 25, 43, 0};
constexpr uint8_t kIq3xxsLevels[8] = {4, 12, 20, 28, 36, 44, 52, 62};
constexpr uint8_t kIq3sLevels[8] = {1, 3, 5, 7, 9, 11, 13, 15};
constexpr uint8_t kIq1Levels[4] = {0xff, 0, 1, 0};  // int8 -1, 0, 1
constexpr IqGrid<256> kIq2xxsGrid = expand_iq_grid(kIq2xxsGridCodes, kIq2Levels, 8, 2);
constexpr IqGrid<512> kIq2xsGrid = expand_iq_grid(kIq2xsGridCodes, kIq2Levels, 8, 2);
constexpr IqGrid<1024> kIq2sGrid = expand_iq_grid(kIq2sGridCodes, kIq2Levels, 8, 2);
constexpr IqGrid<256> kIq3xxsGrid = expand_iq_grid(kIq3xxsGridCodes, kIq3xxsLevels, 4, 3);
constexpr IqGrid<512> kIq3sGrid = expand_iq_grid(kIq3sGridCodes, kIq3sLevels, 4, 3);
constexpr IqGrid<2048> kIq1sGrid = expand_iq_grid(kIq1sGridCodes, kIq1Levels, 8, 2);

// 7 stored sign bits -> 8, the 8th making the count of set bits even.
struct IqSigns { uint8_t v[128]; };
constexpr IqSigns make_iq_signs() {
    IqSigns s{};
    for (int i = 0; i < 128; ++i) {
        int ones = 0;
        for (int b = 0; b < 7; ++b) ones += (i >> b) & 1;
        s.v[i] = (uint8_t)(i | ((ones & 1) << 7));
    }
    return s;
}
constexpr IqSigns kIqSigns = make_iq_signs();

// One decoded group of 32 weights of a grid type: |grid| bytes (mag[l] = weights 8l..8l+7), sign
// bit j set = weight j negative, the scales of the two 16-weight halves. Every kernel of these
// types reads its blocks through the decoders below (one per type), so they are the format's one
// reading; the SIMD kernels only vectorise the arithmetic.
struct IqGroup { uint64_t mag[4]; uint32_t signs; int ls[2]; };
inline uint32_t load_u32(const void* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline IqGroup iq_group(const BlockIQ2XXS& b, int g) {
    const uint32_t idx = load_u32(b.qs + 4 * g), aux = load_u32(b.qs + 4 * g + 2);
    IqGroup r;
    r.signs = 0;
    for (int l = 0; l < 4; ++l) {
        r.mag[l] = kIq2xxsGrid.v[(idx >> (8 * l)) & 255];
        r.signs |= (uint32_t)kIqSigns.v[(aux >> (7 * l)) & 127] << (8 * l);
    }
    r.ls[0] = r.ls[1] = 2 * (int)(aux >> 28) + 1;
    return r;
}
inline IqGroup iq_group(const BlockIQ2XS& b, int g) {
    IqGroup r;
    r.signs = 0;
    for (int l = 0; l < 4; ++l) {
        const uint16_t q = b.qs[4 * g + l];
        r.mag[l] = kIq2xsGrid.v[q & 511];
        r.signs |= (uint32_t)kIqSigns.v[q >> 9] << (8 * l);
    }
    r.ls[0] = 2 * (b.scales[g] & 15) + 1;
    r.ls[1] = 2 * (b.scales[g] >> 4) + 1;
    return r;
}
inline IqGroup iq_group(const BlockIQ2S& b, int g) {
    IqGroup r;
    for (int l = 0; l < 4; ++l) r.mag[l] = kIq2sGrid.v[b.qs[4 * g + l] | (((b.qh[g] >> (2 * l)) & 3) << 8)];
    r.signs = load_u32(b.qs + kQKK / 8 + 4 * g);
    r.ls[0] = 2 * (b.scales[g] & 15) + 1;
    r.ls[1] = 2 * (b.scales[g] >> 4) + 1;
    return r;
}
inline IqGroup iq_group(const BlockIQ3XXS& b, int g) {
    const uint32_t aux = load_u32(b.qs + kQKK / 4 + 4 * g);
    const uint8_t* qs = b.qs + 8 * g;
    IqGroup r;
    r.signs = 0;
    for (int l = 0; l < 4; ++l) {
        r.mag[l] = kIq3xxsGrid.v[qs[2 * l]] | kIq3xxsGrid.v[qs[2 * l + 1]] << 32;
        r.signs |= (uint32_t)kIqSigns.v[(aux >> (7 * l)) & 127] << (8 * l);
    }
    r.ls[0] = r.ls[1] = 2 * (int)(aux >> 28) + 1;
    return r;
}
inline IqGroup iq_group(const BlockIQ3S& b, int g) {
    const uint8_t* qs = b.qs + 8 * g;
    const int qh = b.qh[g];
    IqGroup r;
    for (int l = 0; l < 4; ++l)
        r.mag[l] = kIq3sGrid.v[qs[2 * l] | (((qh >> (2 * l)) & 1) << 8)] | kIq3sGrid.v[qs[2 * l + 1] | (((qh >> (2 * l + 1)) & 1) << 8)] << 32;
    r.signs = load_u32(b.signs + 4 * g);
    r.ls[0] = r.ls[1] = 2 * ((b.scales[g / 2] >> (4 * (g % 2))) & 15) + 1;
    return r;
}
template <typename Block> constexpr int iq_divisor();
template <> constexpr int iq_divisor<BlockIQ2XXS>() { return 8; }
template <> constexpr int iq_divisor<BlockIQ2XS>() { return 8; }
template <> constexpr int iq_divisor<BlockIQ2S>() { return 8; }
template <> constexpr int iq_divisor<BlockIQ3XXS>() { return 4; }
template <> constexpr int iq_divisor<BlockIQ3S>() { return 1; }

// IQ1 groups: grid values as int8 bytes (-1, 0, 1), the shift of each 8 weights in 1/8 (+1 or -1),
// the scales of the two halves; d per super-block.
struct Iq1Group { uint64_t grid[4]; int delta[4]; int ls[2]; };
// v (-128..127) in each byte of a uint64.
inline uint64_t repeat_byte(int v) { return (uint64_t)(uint8_t)(int8_t)v * 0x0101010101010101ull; }
inline Iq1Group iq1_group(const BlockIQ1S& b, int g) {
    const int qh = b.qh[g];
    Iq1Group r;
    for (int l = 0; l < 4; ++l) {
        r.grid[l] = kIq1sGrid.v[b.qs[4 * g + l] | (((qh >> (3 * l)) & 7) << 8)];
        r.delta[l] = qh & 0x8000 ? -1 : 1;
    }
    r.ls[0] = r.ls[1] = 2 * ((qh >> 12) & 7) + 1;
    return r;
}
inline Iq1Group iq1_group(const BlockIQ1M& b, int g) {
    Iq1Group r;
    for (int l = 0; l < 4; ++l) {
        const int nib = (b.qh[2 * g + l / 2] >> (4 * (l % 2))) & 15;
        r.grid[l] = kIq1sGrid.v[b.qs[4 * g + l] | ((nib & 7) << 8)];
        r.delta[l] = nib & 8 ? -1 : 1;
    }
    uint16_t sc;
    std::memcpy(&sc, b.scales + 2 * (g / 2), 2);
    r.ls[0] = 2 * ((sc >> (6 * (g % 2))) & 7) + 1;
    r.ls[1] = 2 * ((sc >> (6 * (g % 2) + 3)) & 7) + 1;
    return r;
}
inline uint16_t iq1m_d(const BlockIQ1M& b) {
    uint16_t sc[4];
    std::memcpy(sc, b.scales, 8);
    return (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
}
inline float iq_d(const BlockIQ1M& b) { return fp16_to_f32(iq1m_d(b)); }
template <typename Block> inline float iq_d(const Block& b) { return fp16_to_f32(b.d); }

// Q2_K and Q3_K share Q6_K's element order: element 128h + 32j + l (h < 2, j < 4, l < 32) is in
// bits 2j..2j+1 of qs[32h + l], and its 16-element sub-block is 8h + 2j + l / 16.
// Q2_K: x = d * (sc & 15) * q - dmin * (sc >> 4) per sub-block, q 2-bit. 2.625 bpw.
struct BlockQ2K { uint8_t scales[kQKK / 16]; uint8_t qs[kQKK / 4]; uint16_t d, dmin; };
static_assert(sizeof(BlockQ2K) == 84, "wrong q2_K block size");
// Q3_K: x = d * (sc - 32) * q, q in [-4, 3]: the low 2 bits in qs, and bit h*4 + j of hmask[l]
// set means +4 (q = low - 4 when clear); the 16 6-bit scales packed in 12 bytes. 3.4375 bpw.
struct BlockQ3K { uint8_t hmask[kQKK / 8]; uint8_t qs[kQKK / 4]; uint8_t scales[12]; uint16_t d; };
static_assert(sizeof(BlockQ3K) == 110, "wrong q3_K block size");
// Q4_K: 8 sub-blocks of 32 with 6-bit scale/min: x = d * sc * q - dmin * m. 4.5 bpw.
struct BlockQ4K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[kQKK / 2]; };
static_assert(sizeof(BlockQ4K) == 144, "wrong q4_K block size");
// Q5_K: as Q4_K with a 5th bit per weight in qh. 5.5 bpw.
struct BlockQ5K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[kQKK / 8]; uint8_t qs[kQKK / 2]; };
static_assert(sizeof(BlockQ5K) == 176, "wrong q5_K block size");
// Q6_K: 16 sub-blocks of 16, x = d * scale_i * (q - 32), q 6-bit. 6.5625 bpw.
struct BlockQ6K { uint8_t ql[kQKK / 2]; uint8_t qh[kQKK / 4]; int8_t scales[kQKK / 16]; uint16_t d; };
static_assert(sizeof(BlockQ6K) == 210, "wrong q6_K block size");
// Q8_1 (activations of Q4_1/Q5_1, like ggml's): Q8_0 plus s = d * Σ qs from the unrounded d,
// rounded to fp16 as ggml stores it, so that the offset term m * s matches llama.cpp to the bit;
// kept as a float so that where fp16 would overflow (ggml: inf) it stays the exact value.
struct BlockQ8_1 { float s; uint16_t d; int8_t qs[kQK]; uint8_t pad[2]; };
static_assert(sizeof(BlockQ8_1) == 40, "wrong q8_1 block size");
// Q8_K (activations only): d is f32 and may be negative; bsums[i] = sum of qs[16i..16i+15].
struct BlockQ8K { float d; int8_t qs[kQKK]; int16_t bsums[kQKK / 16]; };
static_assert(sizeof(BlockQ8K) == 292, "wrong q8_K block size");

inline int nearest_int(float x) { return (int)std::nearbyint(x); }

// ---- quantize (reference) ----

inline void quantize_row_f32_ref(float* y, const float* x, int64_t n) { std::memcpy(y, x, (size_t)n * 4); }
inline void quantize_row_f16_ref(uint16_t* y, const float* x, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = f32_to_fp16(x[i]); }
inline void quantize_row_bf16_ref(uint16_t* y, const float* x, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = f32_to_bf16(x[i]); }

inline void quantize_row_q8_0_ref(BlockQ8_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
        float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        y[b].d = f32_to_fp16(d);
        for (int j = 0; j < kQK; ++j) y[b].qs[j] = (int8_t)std::round(x[j] * id);  // ties away from 0
    }
}

inline void quantize_row_q4_0_ref(BlockQ4_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0, vmax = 0;
        for (int j = 0; j < kQK; ++j)
            if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); vmax = x[j]; }
        float d = vmax / -8.f, id = d ? 1.f / d : 0.f;
        y[b].d = f32_to_fp16(d);
        for (int j = 0; j < kQK / 2; ++j) {
            int q0 = std::min(15, (int)(x[j] * id + 8.5f)), q1 = std::min(15, (int)(x[j + 16] * id + 8.5f));
            y[b].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

inline void q4k_get_scale_min(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = s[j] & 63; *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

inline void q4k_pack_scales(uint8_t* s, const uint8_t* sc, const uint8_t* m) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            s[j] = sc[j]; s[j + 4] = m[j];
        } else {
            s[j + 4] = (uint8_t)((sc[j] & 15) | ((m[j] & 15) << 4));
            s[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
            s[j] |= (uint8_t)((m[j] >> 4) << 6);
        }
    }
}

// Affine fit of one sub-block: x ~ scale * q - min with q in [0, nmax], min >= 0. A small grid
// search over the scale, then least squares, weighted by w (the K-quant reference recipe).
inline float fit_affine(int n, int nmax, const float* x, const float* w, uint8_t* q, float* the_min) {
    float xmin = x[0], xmax = x[0], sum_w = 0, sum_x = 0;
    for (int i = 0; i < n; ++i) { xmin = std::min(xmin, x[i]); xmax = std::max(xmax, x[i]); sum_w += w[i]; sum_x += w[i] * x[i]; }
    if (xmin > 0) xmin = 0;
    if (xmax == xmin) { std::fill(q, q + n, 0); *the_min = -xmin; return 0; }
    float iscale = nmax / (xmax - xmin), scale = 1 / iscale, best_err = 0;
    for (int i = 0; i < n; ++i) {
        int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - xmin))));
        q[i] = (uint8_t)l;
        float diff = scale * l + xmin - x[i];
        best_err += w[i] * diff * diff;
    }
    uint8_t trial[32];
    for (int step = 0; step <= 20; ++step) {
        iscale = (-1.f + 0.1f * step + nmax) / (xmax - xmin);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - xmin))));
            trial[i] = (uint8_t)l;
            sum_l += w[i] * l; sum_l2 += w[i] * l * l; sum_xl += w[i] * l * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det <= 0) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
        float err = 0;
        for (int i = 0; i < n; ++i) { float diff = this_scale * trial[i] + this_min - x[i]; err += w[i] * diff * diff; }
        if (err < best_err) { best_err = err; std::memcpy(q, trial, (size_t)n); scale = this_scale; xmin = this_min; }
    }
    *the_min = -xmin;
    return scale;
}

// Q4_K and Q5_K share the scale/min packing; `bits` is 4 or 5.
// With an importance vector `imp` the weights are imp * sqrt(2 * mean(x^2) + x^2) (ggml's with an
// importance matrix) instead of rms + |x|.
inline void quantize_superblock_k(const float* x, int bits, uint16_t* d_out, uint16_t* dmin_out, uint8_t* scales, uint8_t* L,
                                  const float* imp = nullptr) {
    int nmax = (1 << bits) - 1;
    float sc[8], mn[8], w[32], max_sc = 0, max_mn = 0;
    float sum_x2 = 0;
    for (int i = 0; i < kQKK; ++i) sum_x2 += x[i] * x[i];
    float av_x = std::sqrt(sum_x2 / kQKK);
    for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < 32; ++i)
            w[i] = imp ? imp[32 * j + i] * std::sqrt(2.f * av_x * av_x + x[32 * j + i] * x[32 * j + i]) : av_x + std::fabs(x[32 * j + i]);
        sc[j] = fit_affine(32, nmax, x + 32 * j, w, L + 32 * j, &mn[j]);
        max_sc = std::max(max_sc, sc[j]); max_mn = std::max(max_mn, mn[j]);
    }
    float inv_sc = max_sc > 0 ? 63.f / max_sc : 0.f, inv_mn = max_mn > 0 ? 63.f / max_mn : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        ls[j] = (uint8_t)std::min(63, nearest_int(inv_sc * sc[j]));
        lm[j] = (uint8_t)std::min(63, nearest_int(inv_mn * mn[j]));
    }
    std::memset(scales, 0, 12);
    q4k_pack_scales(scales, ls, lm);
    *d_out = f32_to_fp16(max_sc / 63.f);
    *dmin_out = f32_to_fp16(max_mn / 63.f);
    float d = fp16_to_f32(*d_out), dmin = fp16_to_f32(*dmin_out);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        q4k_get_scale_min(j, scales, &s, &m);
        float dd = d * s, dm = dmin * m;
        for (int i = 0; i < 32; ++i) {
            int l = dd ? nearest_int((x[32 * j + i] + dm) / dd) : 0;
            L[32 * j + i] = (uint8_t)std::max(0, std::min(nmax, l));
        }
    }
}

// The fifth bit of Q5_K lives in qh: element 64c + l is bit 2c of qh[l], element 64c + 32 + l bit
// 2c + 1. These return it in place (16 or 0); a Q4_K block has none.
inline int qk_fifth_bit(const BlockQ4K&, int, int, int) { return 0; }
inline int qk_fifth_bit(const BlockQ5K& blk, int c, int high_half, int l) { return ((blk.qh[l] >> (2 * c + high_half)) & 1) << 4; }
template <typename Block> constexpr bool kHasFifthBit = std::is_same<Block, BlockQ5K>::value;

// Q4_K and Q5_K: the same super-block fit, with 4 or 5 bits per value.
template <typename Block>
inline void quantize_row_q45k_weighted(Block* y, const float* x, int64_t n, const float* imp) {
    uint8_t L[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        quantize_superblock_k(x, kHasFifthBit<Block> ? 5 : 4, &y[b].d, &y[b].dmin, y[b].scales, L, imp ? imp + b * kQKK : nullptr);
        if constexpr (kHasFifthBit<Block>) std::memset(y[b].qh, 0, sizeof y[b].qh);
        for (int c = 0; c < 4; ++c)
            for (int l = 0; l < 32; ++l) {
                const int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                y[b].qs[32 * c + l] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
                if constexpr (kHasFifthBit<Block>) y[b].qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            }
    }
}
template <typename Block>
inline void quantize_row_q45k_ref(Block* y, const float* x, int64_t n) { quantize_row_q45k_weighted(y, x, n, nullptr); }

// Code j (0..31) of a 32-element Q5_0/Q5_1 block.
inline int q5_code(const uint8_t* qs, const uint8_t* qh, int j) {
    const int nibble = j < 16 ? qs[j] & 15 : qs[j - 16] >> 4;
    return nibble | (((qh[j / 8] >> (j % 8)) & 1) << 4);
}
inline void q5_pack(const int* codes, uint8_t* qs, uint8_t* qh) {
    std::memset(qh, 0, 4);
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((codes[j] & 15) | ((codes[j + 16] & 15) << 4));
    for (int j = 0; j < 32; ++j) qh[j / 8] |= (uint8_t)(((codes[j] >> 4) & 1) << (j % 8));
}
// Q4_1/Q5_1: the block's [min, max] in 15 or 31 steps, against the stored fp16 d and m.
template <typename Block, int kMaxCode>
inline void quantize_row_affine_ref(Block* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float lo = x[0], hi = x[0];
        for (int j = 1; j < kQK; ++j) { lo = std::min(lo, x[j]); hi = std::max(hi, x[j]); }
        y[b].d = f32_to_fp16((hi - lo) / kMaxCode);
        y[b].m = f32_to_fp16(lo);
        const float d = fp16_to_f32(y[b].d), m = fp16_to_f32(y[b].m);
        int codes[kQK];
        for (int j = 0; j < kQK; ++j) codes[j] = d > 0 ? std::max(0, std::min(kMaxCode, nearest_int((x[j] - m) / d))) : 0;
        if constexpr (kMaxCode == 15) {
            for (int j = 0; j < 16; ++j) y[b].qs[j] = (uint8_t)(codes[j] | (codes[j + 16] << 4));
        } else {
            q5_pack(codes, y[b].qs, y[b].qh);
        }
    }
}
// Q5_0: symmetric as Q4_0, the extreme value on code 0 (q - 16 = -16).
inline void quantize_row_q5_0_ref(BlockQ5_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0, vmax = 0;
        for (int j = 0; j < kQK; ++j)
            if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); vmax = x[j]; }
        y[b].d = f32_to_fp16(vmax / -16.f);
        const float d = fp16_to_f32(y[b].d);
        int codes[kQK];
        for (int j = 0; j < kQK; ++j) codes[j] = d != 0 ? std::max(0, std::min(31, nearest_int(x[j] / d) + 16)) : 16;
        q5_pack(codes, y[b].qs, y[b].qh);
    }
}
template <typename Block>
inline void dequantize_row_affine(const Block* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        const float d = fp16_to_f32(x[b].d), m = fp16_to_f32(x[b].m);
        for (int j = 0; j < kQK; ++j) {
            int q;
            if constexpr (std::is_same<Block, BlockQ4_1>::value) q = j < 16 ? x[b].qs[j] & 15 : x[b].qs[j - 16] >> 4;
            else q = q5_code(x[b].qs, x[b].qh, j);
            y[b * kQK + j] = d * (float)q + m;
        }
    }
}
inline void dequantize_row_q5_0(const BlockQ5_0* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        const float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK; ++j) y[b * kQK + j] = d * (float)(q5_code(x[b].qs, x[b].qh, j) - 16);
    }
}
// Nearest IQ4 code to v (the grid is sorted).
inline int iq4_nearest(float v) {
    int best = 0;
    for (int c = 1; c < 16; ++c)
        if (std::fabs(v - (float)kIq4Values[c]) < std::fabs(v - (float)kIq4Values[best])) best = c;
    return best;
}
// Best scale for 32 values on the IQ4 grid: candidates from a sweep that puts the extreme value
// near the grid's ends, each refit by least squares over its codes; least squared error wins.
inline float iq4_fit32(const float* x) {
    float amax = 0, vmax = 0;
    for (int j = 0; j < kQK; ++j)
        if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); vmax = x[j]; }
    if (amax == 0) return 0;
    double best_err = 0;
    for (int j = 0; j < kQK; ++j) best_err += (double)x[j] * x[j];
    float best = 0;
    for (int t = -10; t <= 10; ++t) {
        const float d = vmax / ((float)kIq4Values[0] + 2.5f * (float)t);
        double sxq = 0, sqq = 0;
        int codes[kQK];
        for (int j = 0; j < kQK; ++j) {
            codes[j] = iq4_nearest(x[j] / d);
            sxq += (double)x[j] * kIq4Values[codes[j]];
            sqq += (double)kIq4Values[codes[j]] * kIq4Values[codes[j]];
        }
        const double fit = sqq > 0 ? sxq / sqq : 0;
        double err = 0;
        for (int j = 0; j < kQK; ++j) {
            const double e = x[j] - fit * kIq4Values[codes[j]];
            err += e * e;
        }
        if (err < best_err) { best_err = err; best = (float)fit; }
    }
    return best;
}
inline void iq4_codes(const float* x, float d, uint8_t* qs) {
    int codes[kQK];
    for (int j = 0; j < kQK; ++j) codes[j] = d != 0 ? iq4_nearest(x[j] / d) : iq4_nearest(0);
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(codes[j] | (codes[j + 16] << 4));
}
inline void quantize_row_iq4nl_ref(BlockIQ4NL* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        y[b].d = f32_to_fp16(iq4_fit32(x));
        iq4_codes(x, fp16_to_f32(y[b].d), y[b].qs);
    }
}
// IQ4_XS: each sub-block's scale fit as for IQ4_NL, then to 6 signed bits against the largest.
inline void quantize_row_iq4xs_ref(BlockIQ4XS* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float scale[8], max_abs = 0, max_scale = 0;
        for (int i = 0; i < 8; ++i) {
            scale[i] = iq4_fit32(x + 32 * i);
            if (std::fabs(scale[i]) > max_abs) { max_abs = std::fabs(scale[i]); max_scale = scale[i]; }
        }
        BlockIQ4XS& blk = y[b];
        blk.d = f32_to_fp16(max_abs > 0 ? max_scale / -32.f : 0.f);
        const float d = fp16_to_f32(blk.d);
        blk.scales_h = 0;
        std::memset(blk.scales_l, 0, sizeof blk.scales_l);
        for (int i = 0; i < 8; ++i) {
            const int ls = (d != 0 ? std::max(-32, std::min(31, nearest_int(scale[i] / d))) : 0) + 32;
            blk.scales_l[i / 2] |= (uint8_t)((ls & 15) << (4 * (i % 2)));
            blk.scales_h = (uint16_t)(blk.scales_h | ((ls >> 4) << (2 * i)));
            iq4_codes(x + 32 * i, d * (float)(ls - 32), blk.qs + 16 * i);
        }
    }
}
inline int iq4xs_scale(const BlockIQ4XS& blk, int i) {
    return (((blk.scales_l[i / 2] >> (4 * (i % 2))) & 15) | (((blk.scales_h >> (2 * i)) & 3) << 4)) - 32;
}
inline void dequantize_row_iq4nl(const BlockIQ4NL* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        const float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < 16; ++j) {
            y[b * kQK + j] = d * (float)kIq4Values[x[b].qs[j] & 15];
            y[b * kQK + j + 16] = d * (float)kIq4Values[x[b].qs[j] >> 4];
        }
    }
}
inline void dequantize_row_iq4xs(const BlockIQ4XS* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const float d = fp16_to_f32(x[b].d);
        for (int i = 0; i < 8; ++i) {
            const float dl = d * (float)iq4xs_scale(x[b], i);
            const uint8_t* qs = x[b].qs + 16 * i;
            for (int j = 0; j < 16; ++j) {
                y[b * kQKK + 32 * i + j] = dl * (float)kIq4Values[qs[j] & 15];
                y[b * kQKK + 32 * i + j + 16] = dl * (float)kIq4Values[qs[j] >> 4];
            }
        }
    }
}

// Q3_K scale s (0..15): low 4 bits in byte s % 8 (low nibble for s < 8, else high), high 2 bits
// in byte 8 + s % 4 at bit 2 * (s / 4); stored with +32.
inline int q3k_scale(const uint8_t* packed, int s) {
    const int low = s < 8 ? packed[s] & 15 : packed[s - 8] >> 4;
    const int high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
    return (low | (high << 4)) - 32;
}
// All 16 Q3_K scales at once (values q3k_scale gives), 32 bits at a time: byte s of word s / 4
// gathers its low nibble and its two high bits. Little-endian (as the file format).
inline void q3k_scales16(const uint8_t* packed, int8_t* out) {
    uint32_t w[4];
    std::memcpy(w, packed, 12);
    const uint32_t high = w[2], m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    w[3] = ((w[1] >> 4) & m4) | (((high >> 6) & m2) << 4);
    w[2] = ((w[0] >> 4) & m4) | (((high >> 4) & m2) << 4);
    w[1] = (w[1] & m4) | (((high >> 2) & m2) << 4);
    w[0] = (w[0] & m4) | ((high & m2) << 4);
    std::memcpy(out, w, 16);
    for (int i = 0; i < 16; ++i) out[i] = (int8_t)(out[i] - 32);
}
// Unpacks a Q2_K block's 2-bit values (0..3) or a Q3_K block's values (-4..3) in element order.
inline void q2k_unpack(const BlockQ2K& blk, int8_t* q) {
    for (int i = 0; i < kQKK; ++i) q[i] = (int8_t)((blk.qs[32 * (i / 128) + i % 32] >> (2 * (i / 32 % 4))) & 3);
}
inline void q3k_unpack(const BlockQ3K& blk, int8_t* q) {
    for (int i = 0; i < kQKK; ++i) {
        const int low = (blk.qs[32 * (i / 128) + i % 32] >> (2 * (i / 32 % 4))) & 3;
        const int high = (blk.hmask[i % 32] >> (i / 32)) & 1;  // bit 4h + j = i / 32
        q[i] = (int8_t)(low + 4 * high - 4);
    }
}
// Packs 256 values (2-bit codes for Q2_K, 0..7 = q + 4 for Q3_K) into qs (and hmask).
inline void q23k_pack(const uint8_t* codes, uint8_t* qs, uint8_t* hmask) {
    std::memset(qs, 0, kQKK / 4);
    if (hmask) std::memset(hmask, 0, kQKK / 8);
    for (int i = 0; i < kQKK; ++i) {
        qs[32 * (i / 128) + i % 32] |= (uint8_t)((codes[i] & 3) << (2 * (i / 32 % 4)));
        if (hmask) hmask[i % 32] |= (uint8_t)(((codes[i] >> 2) & 1) << (i / 32));
    }
}
// Best scale (and offset) for 16 values on the integer grid [qmin, qmax]: candidate grids from
// a sweep of the inverse scale, each refit by least squares (x ~ s*q + o, o <= 0 when `affine`,
// else o = 0); the fit with the least squared error wins. Unweighted (no importance matrix yet).
inline void fit_grid16(const float* x, int qmin, int qmax, bool affine, float* scale, float* offset) {
    float lo = 0, hi = 0, amax = 0, vmax = 0;
    for (int i = 0; i < 16; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
        if (std::fabs(x[i]) > amax) { amax = std::fabs(x[i]); vmax = x[i]; }
    }
    *scale = 0;
    *offset = 0;
    if (amax == 0) return;
    double best = 0;
    for (int i = 0; i < 16; ++i) best += (double)x[i] * x[i];  // all zero
    for (int t = -10; t <= 10; ++t) {
        // affine: the range [lo, hi] over (qmax - qmin) steps; symmetric: the extreme on qmin.
        const float step = affine ? (hi - lo) / ((float)(qmax - qmin) + 0.1f * (float)t) : vmax / ((float)qmin + 0.1f * (float)t);
        if (!(step != 0) || (affine && step < 0)) continue;
        const float base = affine ? lo : 0.f;
        int q[16];
        double sq = 0, sx = 0, sqq = 0, sqx = 0;
        for (int i = 0; i < 16; ++i) {
            q[i] = std::max(qmin, std::min(qmax, nearest_int((x[i] - base) / step)));
            sq += q[i]; sx += x[i]; sqq += (double)q[i] * q[i]; sqx += (double)q[i] * x[i];
        }
        double s_fit = 0, o_fit = 0;
        if (affine) {
            const double det = 16 * sqq - sq * sq;
            if (det > 0) { s_fit = (16 * sqx - sq * sx) / det; o_fit = (sx - s_fit * sq) / 16; }
            if (o_fit > 0 || det <= 0) { o_fit = 0; s_fit = sqq > 0 ? sqx / sqq : 0; }
        } else {
            s_fit = sqq > 0 ? sqx / sqq : 0;
        }
        if (s_fit <= 0 && affine) continue;
        double err = 0;
        for (int i = 0; i < 16; ++i) {
            const double e = x[i] - (s_fit * q[i] + o_fit);
            err += e * e;
        }
        if (err < best) { best = err; *scale = (float)s_fit; *offset = (float)o_fit; }
    }
}
// Q2_K: each sub-block fit as x ~ s*q - m (q 0..3, m >= 0), then s and m to 4 bits against the
// block's largest, and q again against the stored ones.
inline void quantize_row_q2k_ref(BlockQ2K* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float scale[16], mins[16], max_scale = 0, max_min = 0;
        for (int s = 0; s < 16; ++s) {
            float offset;
            fit_grid16(x + 16 * s, 0, 3, true, &scale[s], &offset);
            mins[s] = -offset;
            max_scale = std::max(max_scale, scale[s]);
            max_min = std::max(max_min, mins[s]);
        }
        BlockQ2K& blk = y[b];
        blk.d = f32_to_fp16(max_scale / 15);
        blk.dmin = f32_to_fp16(max_min / 15);
        const float d = fp16_to_f32(blk.d), dmin = fp16_to_f32(blk.dmin);
        uint8_t codes[kQKK];
        for (int s = 0; s < 16; ++s) {
            const int sc = d > 0 ? std::min(15, nearest_int(scale[s] / d)) : 0;
            const int m = dmin > 0 ? std::min(15, nearest_int(mins[s] / dmin)) : 0;
            blk.scales[s] = (uint8_t)(sc | (m << 4));
            const float dl = d * (float)sc, ml = dmin * (float)m;
            for (int i = 0; i < 16; ++i)
                codes[16 * s + i] = (uint8_t)(dl > 0 ? std::max(0, std::min(3, nearest_int((x[16 * s + i] + ml) / dl))) : 0);
        }
        q23k_pack(codes, blk.qs, nullptr);
    }
}
// Q3_K: each sub-block fit as x ~ s*q (q -4..3), the scales to 6 signed bits against the largest,
// and q again against the stored scales.
inline void quantize_row_q3k_ref(BlockQ3K* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float scale[16], max_abs = 0, max_scale = 0;
        for (int s = 0; s < 16; ++s) {
            float unused;
            fit_grid16(x + 16 * s, -4, 3, false, &scale[s], &unused);
            if (std::fabs(scale[s]) > max_abs) { max_abs = std::fabs(scale[s]); max_scale = scale[s]; }
        }
        BlockQ3K& blk = y[b];
        std::memset(blk.scales, 0, sizeof blk.scales);
        const float iscale = max_abs > 0 ? -32.f / max_scale : 0;
        blk.d = f32_to_fp16(max_abs > 0 ? 1 / iscale : 0.f);
        const float d = fp16_to_f32(blk.d);
        uint8_t codes[kQKK];
        for (int s = 0; s < 16; ++s) {
            const int sc = std::max(-32, std::min(31, nearest_int(iscale * scale[s])));
            const int v = sc + 32;
            blk.scales[s % 8] |= (uint8_t)((v & 15) << (s < 8 ? 0 : 4));
            blk.scales[8 + s % 4] |= (uint8_t)((v >> 4) << (2 * (s / 4)));
            const float dl = d * (float)sc;
            for (int i = 0; i < 16; ++i)
                codes[16 * s + i] = (uint8_t)((dl != 0 ? std::max(-4, std::min(3, nearest_int(x[16 * s + i] / dl))) : 0) + 4);
        }
        q23k_pack(codes, blk.qs, blk.hmask);
    }
}
// The 256 trit codes (0..2) of a TQ1_0 or TQ2_0 block in element order.
inline void tq1_unpack(const BlockTQ1& blk, uint8_t* t) {
    static const uint8_t kPow3[5] = {1, 3, 9, 27, 81};
    for (int n = 0; n < 5; ++n) {
        for (int m = 0; m < 32; ++m) t[32 * n + m] = (uint8_t)(((uint8_t)(blk.qs[m] * kPow3[n]) * 3) >> 8);
        for (int m = 0; m < 16; ++m) t[160 + 16 * n + m] = (uint8_t)(((uint8_t)(blk.qs[32 + m] * kPow3[n]) * 3) >> 8);
    }
    for (int n = 0; n < 4; ++n)
        for (int m = 0; m < 4; ++m) t[240 + 4 * n + m] = (uint8_t)(((uint8_t)(blk.qh[m] * kPow3[n]) * 3) >> 8);
}
inline void tq2_unpack(const BlockTQ2& blk, uint8_t* t) {
    for (int i = 0; i < kQKK; ++i) t[i] = (uint8_t)((blk.qs[32 * (i / 128) + i % 32] >> (2 * (i / 32 % 4))) & 3);
}
// Ternary quantizers: d = max |x|, code = round(x / d) + 1.
inline void ternary_codes(const float* x, uint16_t* d_out, uint8_t* codes) {
    float amax = 0;
    for (int i = 0; i < kQKK; ++i) amax = std::max(amax, std::fabs(x[i]));
    *d_out = f32_to_fp16(amax);
    const float id = amax > 0 ? 1 / amax : 0;
    for (int i = 0; i < kQKK; ++i) codes[i] = (uint8_t)(std::max(-1, std::min(1, nearest_int(x[i] * id))) + 1);
}
inline uint8_t tq1_pack_byte(const uint8_t* trits, int count, int stride) {
    int v = 0;
    for (int n = 0; n < 5; ++n) v = v * 3 + (n < count ? trits[n * stride] : 0);
    return (uint8_t)((v * 256 + 242) / 243);
}
inline void quantize_row_tq1_ref(BlockTQ1* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        uint8_t t[kQKK];
        ternary_codes(x, &y[b].d, t);
        for (int m = 0; m < 32; ++m) y[b].qs[m] = tq1_pack_byte(t + m, 5, 32);
        for (int m = 0; m < 16; ++m) y[b].qs[32 + m] = tq1_pack_byte(t + 160 + m, 5, 16);
        for (int m = 0; m < 4; ++m) y[b].qh[m] = tq1_pack_byte(t + 240 + m, 4, 4);
    }
}
inline void quantize_row_tq2_ref(BlockTQ2* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        uint8_t t[kQKK];
        ternary_codes(x, &y[b].d, t);
        q23k_pack(t, y[b].qs, nullptr);
    }
}
template <typename Block, void (*Unpack)(const Block&, uint8_t*)>
inline void dequantize_row_ternary(const Block* x, float* y, int64_t n) {
    uint8_t t[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        Unpack(x[b], t);
        const float d = fp16_to_f32(x[b].d);
        for (int i = 0; i < kQKK; ++i) y[b * kQKK + i] = d * (float)((int)t[i] - 1);
    }
}
// Σ (t - 1) * y over the unpacked codes.
template <typename Block, void (*Unpack)(const Block&, uint8_t*)>
inline float vec_dot_ternary_q8k_ref(const Block* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    uint8_t t[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        Unpack(w[b], t);
        int isum = 0;
        for (int i = 0; i < kQKK; ++i) isum += ((int)t[i] - 1) * x[b].qs[i];
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
}
inline void dequantize_row_tq1(const BlockTQ1* x, float* y, int64_t n) { dequantize_row_ternary<BlockTQ1, tq1_unpack>(x, y, n); }
inline void dequantize_row_tq2(const BlockTQ2* x, float* y, int64_t n) { dequantize_row_ternary<BlockTQ2, tq2_unpack>(x, y, n); }
inline float vec_dot_tq1_q8k_ref(const BlockTQ1* w, const BlockQ8K* x, int64_t n) { return vec_dot_ternary_q8k_ref<BlockTQ1, tq1_unpack>(w, x, n); }
inline float vec_dot_tq2_q8k_ref(const BlockTQ2* w, const BlockQ8K* x, int64_t n) { return vec_dot_ternary_q8k_ref<BlockTQ2, tq2_unpack>(w, x, n); }

// ---- IQ grid types, IQ1, Q1_0, Q2_0 (reference) ----
// The scale products are formed as ggml's dequantizers form them (d * ls, then the power-of-two
// divisor, then the grid value), so dequantization matches ggml bit for bit.
template <typename Block>
inline void dequantize_row_iqgrid(const Block* x, float* y, int64_t n) {
    constexpr float inv = 1.f / (float)iq_divisor<Block>();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const float d = iq_d(x[b]);
        for (int g = 0; g < 8; ++g, y += 32) {
            const IqGroup q = iq_group(x[b], g);
            for (int j = 0; j < 32; ++j) {
                const float dl = d * (float)q.ls[j / 16] * inv;
                const float m = dl * (float)((q.mag[j / 8] >> (8 * (j % 8))) & 255);
                y[j] = (q.signs >> j) & 1 ? -m : m;
            }
        }
    }
}
// Σ per half ls * Σ ±|grid| * y in integers (|total| < 8 * 31 * 32 * 62 * 127 < 2^31), divided at the end.
template <typename Block>
inline float vec_dot_iqgrid_q8k_ref(const Block* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int total = 0;
        for (int g = 0; g < 8; ++g) {
            const IqGroup q = iq_group(w[b], g);
            const int8_t* y = x[b].qs + 32 * g;
            for (int h = 0; h < 2; ++h) {
                int s = 0;
                for (int j = 16 * h; j < 16 * h + 16; ++j) {
                    const int m = (int)((q.mag[j / 8] >> (8 * (j % 8))) & 255);
                    s += ((q.signs >> j) & 1 ? -m : m) * y[j];
                }
                total += q.ls[h] * s;
            }
        }
        sum += iq_d(w[b]) * x[b].d * (float)total;
    }
    return sum / (float)iq_divisor<Block>();
}
template <typename Block>
inline void dequantize_row_iq1(const Block* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const float d = iq_d(x[b]);
        for (int g = 0; g < 8; ++g, y += 32) {
            const Iq1Group q = iq1_group(x[b], g);
            for (int j = 0; j < 32; ++j) {
                const float dl = d * (float)q.ls[j / 16];
                y[j] = dl * ((float)(int8_t)(q.grid[j / 8] >> (8 * (j % 8))) + 0.125f * (float)q.delta[j / 8]);
            }
        }
    }
}
// In eighths: Σ ls * Σ (8 * grid + delta) * y (|total| < 8 * 15 * 32 * 9 * 127 < 2^22).
template <typename Block>
inline float vec_dot_iq1_q8k_ref(const Block* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int total = 0;
        for (int g = 0; g < 8; ++g) {
            const Iq1Group q = iq1_group(w[b], g);
            const int8_t* y = x[b].qs + 32 * g;
            for (int h = 0; h < 2; ++h) {
                int s = 0;
                for (int j = 16 * h; j < 16 * h + 16; ++j) s += (8 * (int)(int8_t)(q.grid[j / 8] >> (8 * (j % 8))) + q.delta[j / 8]) * y[j];
                total += q.ls[h] * s;
            }
        }
        sum += iq_d(w[b]) * x[b].d * (float)total;
    }
    return sum * 0.125f;
}

// Q1_0 as ggml: d = mean |x| of the block, the sign bit of each weight (x >= 0 sets it).
inline void quantize_row_q1_0_ref(BlockQ1_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK1; ++b, x += kQK1) {
        float sum = 0;
        for (int j = 0; j < kQK1; ++j) sum += std::fabs(x[j]);
        y[b].d = f32_to_fp16(sum / kQK1);
        std::memset(y[b].qs, 0, sizeof y[b].qs);
        for (int j = 0; j < kQK1; ++j)
            if (x[j] >= 0) y[b].qs[j / 8] |= (uint8_t)(1 << (j % 8));
    }
}
// Q2_0 as ggml: d = max |x|, q = clamp(round(x / d) + 1, 0, 3).
inline void quantize_row_q2_0_ref(BlockQ2_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK2; ++b, x += kQK2) {
        float amax = 0;
        for (int j = 0; j < kQK2; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float id = amax > 0 ? 1 / amax : 0;
        y[b].d = f32_to_fp16(amax);
        std::memset(y[b].qs, 0, sizeof y[b].qs);
        for (int j = 0; j < kQK2; ++j) {
            const int q = std::min(3, std::max(0, (int)std::round(x[j] * id) + 1));
            y[b].qs[j / 4] |= (uint8_t)(q << (2 * (j % 4)));
        }
    }
}
inline int q1_0_value(const uint8_t* qs, int j) { return (qs[j / 8] >> (j % 8)) & 1 ? 1 : -1; }
inline int q2_0_value(const uint8_t* qs, int j) { return ((qs[j / 4] >> (2 * (j % 4))) & 3) - 1; }
inline void dequantize_row_q1_0(const BlockQ1_0* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK1; ++b) {
        const float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK1; ++j) *y++ = q1_0_value(x[b].qs, j) > 0 ? d : -d;
    }
}
inline void dequantize_row_q2_0(const BlockQ2_0* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK2; ++b) {
        const float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK2; ++j) *y++ = (float)q2_0_value(x[b].qs, j) * d;
    }
}
// One weight block over kElems / 32 Q8_0 blocks: Σ_k d_y[k] * Σ q * y, then times d.
template <typename Block, int kElems, int (*Value)(const uint8_t*, int)>
inline float vec_dot_wide_q8_0_ref(const Block* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kElems; ++b) {
        float part = 0;
        for (int k = 0; k < kElems / kQK; ++k) {
            const BlockQ8_0& y = x[b * (kElems / kQK) + k];
            int s = 0;
            for (int j = 0; j < kQK; ++j) s += Value(w[b].qs, kQK * k + j) * y.qs[j];
            part += fp16_to_f32(y.d) * (float)s;
        }
        sum += fp16_to_f32(w[b].d) * part;
    }
    return sum;
}
inline float vec_dot_q1_0_q8_0_ref(const BlockQ1_0* w, const BlockQ8_0* x, int64_t n) { return vec_dot_wide_q8_0_ref<BlockQ1_0, kQK1, q1_0_value>(w, x, n); }
inline float vec_dot_q2_0_q8_0_ref(const BlockQ2_0* w, const BlockQ8_0* x, int64_t n) { return vec_dot_wide_q8_0_ref<BlockQ2_0, kQK2, q2_0_value>(w, x, n); }

inline void dequantize_row_q2k(const BlockQ2K* x, float* y, int64_t n) {
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        q2k_unpack(x[b], q);
        const float d = fp16_to_f32(x[b].d), dmin = fp16_to_f32(x[b].dmin);
        for (int i = 0; i < kQKK; ++i)
            y[b * kQKK + i] = d * (float)(x[b].scales[i / 16] & 15) * (float)q[i] - dmin * (float)(x[b].scales[i / 16] >> 4);
    }
}
inline void dequantize_row_q3k(const BlockQ3K* x, float* y, int64_t n) {
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        q3k_unpack(x[b], q);
        const float d = fp16_to_f32(x[b].d);
        for (int i = 0; i < kQKK; ++i) y[b * kQKK + i] = d * (float)q3k_scale(x[b].scales, i / 16) * (float)q[i];
    }
}

inline void quantize_row_q6k_ref(BlockQ6K* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float scales[16], max_abs_scale = 0, max_scale = 0;
        for (int s = 0; s < 16; ++s) {
            float amax = 0, vmax = 0;
            for (int i = 0; i < 16; ++i)
                if (std::fabs(x[16 * s + i]) > amax) { amax = std::fabs(x[16 * s + i]); vmax = x[16 * s + i]; }
            scales[s] = vmax / -32.f;  // symmetric: q in [-32, 31]
            if (std::fabs(scales[s]) > max_abs_scale) { max_abs_scale = std::fabs(scales[s]); max_scale = scales[s]; }
        }
        BlockQ6K& blk = y[b];
        std::memset(&blk, 0, sizeof blk);
        if (max_abs_scale == 0) continue;
        float iscale = -128.f / max_scale;
        blk.d = f32_to_fp16(1 / iscale);
        float d = fp16_to_f32(blk.d);
        int8_t L[kQKK];
        for (int s = 0; s < 16; ++s) {
            blk.scales[s] = (int8_t)std::min(127, nearest_int(iscale * scales[s]));
            float ds = d * blk.scales[s];
            for (int i = 0; i < 16; ++i) {
                int l = ds ? nearest_int(x[16 * s + i] / ds) : 0;
                L[16 * s + i] = (int8_t)(std::max(-32, std::min(31, l)) + 32);
            }
        }
        for (int h = 0; h < 2; ++h)
            for (int l = 0; l < 32; ++l) {
                const int8_t* q = L + 128 * h;
                int q1 = q[l], q2 = q[l + 32], q3 = q[l + 64], q4 = q[l + 96];
                blk.ql[64 * h + l] = (uint8_t)((q1 & 15) | ((q3 & 15) << 4));
                blk.ql[64 * h + l + 32] = (uint8_t)((q2 & 15) | ((q4 & 15) << 4));
                blk.qh[32 * h + l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
    }
}

inline void quantize_row_q8k_ref(BlockQ8K* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float amax = 0, vmax = 0;
        for (int j = 0; j < kQKK; ++j)
            if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); vmax = x[j]; }
        if (amax == 0) { std::memset(&y[b], 0, sizeof y[b]); continue; }
        float iscale = -127.f / vmax;
        for (int j = 0; j < kQKK; ++j) y[b].qs[j] = (int8_t)std::min(127, nearest_int(iscale * x[j]));
        for (int j = 0; j < kQKK / 16; ++j) {
            int sum = 0;
            for (int i = 0; i < 16; ++i) sum += y[b].qs[16 * j + i];
            y[b].bsums[j] = (int16_t)sum;
        }
        y[b].d = 1 / iscale;
    }
}

// ---- dequantize (reference) ----

inline void dequantize_row_f32(const float* x, float* y, int64_t n) { std::memcpy(y, x, (size_t)n * 4); }
inline void dequantize_row_f16(const uint16_t* x, float* y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_f32(x[i]); }
inline void dequantize_row_bf16(const uint16_t* x, float* y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_f32(x[i]); }

inline void dequantize_row_q8_0(const BlockQ8_0* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK; ++j) y[b * kQK + j] = d * x[b].qs[j];
    }
}
inline void dequantize_row_q4_0(const BlockQ4_0* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        float d = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK / 2; ++j) {
            y[b * kQK + j] = d * ((x[b].qs[j] & 15) - 8);
            y[b * kQK + j + 16] = d * ((x[b].qs[j] >> 4) - 8);
        }
    }
}
template <typename Block>
inline void dequantize_row_q45k(const Block* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b) {
        float d = fp16_to_f32(x[b].d), dmin = fp16_to_f32(x[b].dmin);
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, x[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, x[b].scales, &s1, &m1);
            for (int l = 0; l < 32; ++l) {
                const uint8_t q = x[b].qs[32 * c + l];
                y[64 * c + l] = d * s0 * ((q & 15) | qk_fifth_bit(x[b], c, 0, l)) - dmin * m0;
                y[64 * c + 32 + l] = d * s1 * ((q >> 4) | qk_fifth_bit(x[b], c, 1, l)) - dmin * m1;
            }
        }
        y += kQKK;
    }
}
// Unpacks the 256 signed 6-bit values of a Q6_K block (shared by dequant and the dot product).
inline void q6k_unpack(const BlockQ6K& blk, int8_t* q) {
    for (int h = 0; h < 2; ++h) {
        const uint8_t* L = blk.ql + 64 * h;
        const uint8_t* H = blk.qh + 32 * h;
        for (int l = 0; l < 32; ++l) {
            q[128 * h + l] = (int8_t)(((L[l] & 15) | ((H[l] & 3) << 4)) - 32);
            q[128 * h + 32 + l] = (int8_t)(((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32);
            q[128 * h + 64 + l] = (int8_t)(((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32);
            q[128 * h + 96 + l] = (int8_t)(((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32);
        }
    }
}
inline void dequantize_row_q6k(const BlockQ6K* x, float* y, int64_t n) {
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        q6k_unpack(x[b], q);
        float d = fp16_to_f32(x[b].d);
        for (int i = 0; i < kQKK; ++i) y[b * kQKK + i] = d * x[b].scales[i / 16] * q[i];
    }
}

// Nibble j of a 32-element block (elements 0-15 in the low nibbles, 16-31 in the high ones).
inline int q4_nibble(const uint8_t* qs, int j) { return j < 16 ? qs[j] & 15 : qs[j - 16] >> 4; }

// ---- FP4 (MXFP4, NVFP4), affine (MLX) and rotated-codebook (TQ3, TQ4) formats ----
// Layouts and decode rules: ../shared/formats.md sections 2.5, 2.6, 4 and 5.

// E2M1 values doubled, as ggml keeps them (an integer table): code c (bit 3 the sign) is
// kFp4Values[c] / 2, so the block scales below are taken at half their value.
alignas(16) constexpr int8_t kFp4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// MXFP4 (ggml type 39): 32 elements, x = kFp4Values[code] * 2^(e - 128) (E8M0 scale e, halved),
// codes in Q4_0's nibble order. 4.25 bpw.
struct BlockMXFP4 { uint8_t e; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockMXFP4) == 17, "wrong mxfp4 block size");
// NVFP4 (ggml type 40): 64 elements in four sub-blocks of 16, x = kFp4Values[code] * ue4m3(d[s]) / 2;
// sub-block s's codes are qs[8s..8s+7], element 16s + j in the low nibble of byte j, 16s + 8 + j in
// the high one. A tensor may come with an F32 `<name>.scale` ({1} or one per expert) that
// multiplies its matmul outputs. 4.5 bpw.
constexpr int kQNV = 64;
struct BlockNVFP4 { uint8_t d[4]; uint8_t qs[kQNV / 2]; };
static_assert(sizeof(BlockNVFP4) == 36, "wrong nvfp4 block size");

// 2^(e - 128) built from bits (e = 0 and 1 are the subnormals 2^-128 and 2^-127).
inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
// Unsigned E4M3 (bias 7, subnormal step 2^-9) at half its value; 0x00 and 0x7F read as 0, and bit 7
// is ignored otherwise (as ggml decodes it).
struct Ue4m3HalfTable {
    float v[256];
    constexpr Ue4m3HalfTable() : v() {
        for (int x = 0; x < 256; ++x) {
            const int e = (x >> 3) & 15, m = x & 7;
            float f = e == 0 ? (float)m / 1024.f : (1.f + (float)m / 8.f) / 256.f;  // exact: powers of two
            for (int i = 0; i < e; ++i) f *= 2.f;
            v[x] = x == 0x7F ? 0.f : f;
        }
    }
};
constexpr Ue4m3HalfTable kUe4m3Half{};  // a table: the kernels read two scales per 32 elements
inline float ue4m3_half(uint8_t x) { return kUe4m3Half.v[x]; }
// ggml's encoder: mantissa rounded half up (bit 19 of the float), subnormals as round-half-up of
// x * 512 capped at 7, anything at or above 2^8 * 1.875 to 0x7E (448); x <= 0 (and NaN) to 0.
inline uint8_t f32_to_ue4m3(float x) {
    if (!(x > 0.f)) return 0;
    x = std::min(x, 448.f);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    int e = (int)((bits >> 23) & 0xFF) - 127 + 7;
    if (e <= 0) {
        const int m = (int)(x * 512.f + 0.5f);
        return m < 1 ? 0 : (uint8_t)std::min(m, 7);
    }
    int m = (int)((bits >> 20) & 7) + (int)((bits >> 19) & 1);
    if (m > 7) { m = 0; ++e; }
    if (e >= 15) return 0x7E;
    return (uint8_t)((e << 3) | m);
}
// The E2M1 code nearest to x / d: table order, strict '<' (ties keep the earlier, smaller
// magnitude), errors in float exactly as ggml computes them.
inline uint8_t fp4_nearest(float x, float d) {
    uint8_t best = 0;
    float best_err = std::fabs((float)kFp4Values[0] * d - x);
    for (int i = 1; i < 16; ++i) {
        const float err = std::fabs((float)kFp4Values[i] * d - x);
        if (err < best_err) { best = (uint8_t)i; best_err = err; }
    }
    return best;
}
// Importance-weighted error of coding x (n values) with half-scale d.
inline double fp4_weighted_err(const float* x, const float* w, int n, float d) {
    double err = 0;
    for (int j = 0; j < n; ++j) {
        const double e = (double)x[j] - (double)kFp4Values[fp4_nearest(x[j], d)] * d;
        err += (w ? w[j] : 1.0) * e * e;
    }
    return err;
}
// MXFP4: e = floor(log2 amax) - 2 + 127 (ggml's and the OCP rule; clamped to the E8M0 range). With
// an importance vector `w` the exponents e - 1 and e + 1 are tried too, keeping the least weighted error.
inline void quantize_row_mxfp4_weighted(BlockMXFP4* y, const float* x, int64_t n, const float* w) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
        int e = 0;
        if (amax > 0) {
            int k;
            std::frexp(amax, &k);  // amax = m * 2^k, m in [0.5, 1): floor(log2 amax) = k - 1
            e = std::max(0, std::min(254, k - 1 - 2 + 127));
        }
        if (w && amax > 0) {
            int best = e;
            double best_err = fp4_weighted_err(x, w + b * kQK, kQK, e8m0_half((uint8_t)e));
            for (int c : {e - 1, e + 1}) {
                if (c < 0 || c > 254) continue;
                const double err = fp4_weighted_err(x, w + b * kQK, kQK, e8m0_half((uint8_t)c));
                if (err < best_err) { best_err = err; best = c; }
            }
            e = best;
        }
        y[b].e = (uint8_t)e;
        const float d = e8m0_half(y[b].e);
        for (int j = 0; j < kQK / 2; ++j) y[b].qs[j] = (uint8_t)(fp4_nearest(x[j], d) | (fp4_nearest(x[j + kQK / 2], d) << 4));
    }
}
inline void quantize_row_mxfp4_ref(BlockMXFP4* y, const float* x, int64_t n) { quantize_row_mxfp4_weighted(y, x, n, nullptr); }
// NVFP4: per 16, d = ue4m3(amax / 6) as ggml (no tensor scale: a writer that wants NVIDIA's two-level
// rule divides the row by its tensor scale first and stores `.scale`). Weighted: the four UE4M3 codes
// around that one are tried.
inline void quantize_row_nvfp4_weighted(BlockNVFP4* y, const float* x, int64_t n, const float* w) {
    for (int64_t b = 0; b < n / kQNV; ++b) {
        for (int s = 0; s < 4; ++s) {
            const float* xs = x + b * kQNV + 16 * s;
            float amax = 0;
            for (int j = 0; j < 16; ++j) amax = std::max(amax, std::fabs(xs[j]));
            uint8_t ue = f32_to_ue4m3(amax / 6.0f);
            if (w && amax > 0) {
                const float* ws = w + b * kQNV + 16 * s;
                double best_err = fp4_weighted_err(xs, ws, 16, ue4m3_half(ue));
                const int base = ue;
                for (int c = std::max(1, base - 2); c <= std::min(0x7E, base + 2); ++c) {
                    const double err = fp4_weighted_err(xs, ws, 16, ue4m3_half((uint8_t)c));
                    if (err < best_err) { best_err = err; ue = (uint8_t)c; }
                }
            }
            y[b].d[s] = ue;
            const float d = ue4m3_half(ue);
            for (int j = 0; j < 8; ++j) y[b].qs[8 * s + j] = (uint8_t)(fp4_nearest(xs[j], d) | (fp4_nearest(xs[j + 8], d) << 4));
        }
    }
}
inline void quantize_row_nvfp4_ref(BlockNVFP4* y, const float* x, int64_t n) { quantize_row_nvfp4_weighted(y, x, n, nullptr); }
inline void dequantize_row_mxfp4(const BlockMXFP4* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, y += kQK) {
        const float d = e8m0_half(x[b].e);
        for (int j = 0; j < kQK; ++j) y[j] = (float)kFp4Values[q4_nibble(x[b].qs, j)] * d;
    }
}
inline int nvfp4_code(const BlockNVFP4& blk, int i) {  // element i (0..63)
    const uint8_t q = blk.qs[8 * (i / 16) + (i % 8)];
    return (i % 16) < 8 ? q & 15 : q >> 4;
}
inline void dequantize_row_nvfp4(const BlockNVFP4* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQNV; ++b, y += kQNV)
        for (int i = 0; i < kQNV; ++i) y[i] = (float)kFp4Values[nvfp4_code(x[b], i)] * ue4m3_half(x[b].d[i / 16]);
}

// Affine, MLX semantics: groups of G (32, 64, 128) with x = scale * q + bias, q in [0, 2^Bits - 1],
// scale and bias fp16 (ours: type ids above ggml's, see kCustomTypeBase). Codes per 32 elements:
// 4-bit as Q4_0's nibbles (16 bytes); 3-bit as 8 bytes of 2-bit fields (element 8k + j at bits
// 2k..2k+1 of byte j) then the third bits as a little-endian u32 (bit j: element j). 4-bit:
// 5.0 / 4.5 / 4.25 bpw, 3-bit: 4.0 / 3.5 / 3.25 bpw at G = 32 / 64 / 128.
template <int Bits, int G>
struct BlockAffine {
    static constexpr int kBits = Bits, kGroup = G, kChunkBytes = 32 * Bits / 8;
    uint16_t scale, bias;
    uint8_t qs[G * Bits / 8];
};
typedef BlockAffine<3, 32> BlockAffine3G32;
typedef BlockAffine<3, 64> BlockAffine3G64;
typedef BlockAffine<3, 128> BlockAffine3G128;
typedef BlockAffine<4, 32> BlockAffine4G32;
typedef BlockAffine<4, 64> BlockAffine4G64;
typedef BlockAffine<4, 128> BlockAffine4G128;
static_assert(sizeof(BlockAffine3G64) == 28 && sizeof(BlockAffine4G128) == 68, "wrong affine block size");
template <typename Block>
inline int affine_code(const Block& blk, int i) {  // element i of the group
    const uint8_t* c = blk.qs + (i / 32) * Block::kChunkBytes;
    const int j = i % 32;
    if constexpr (Block::kBits == 4) {
        return q4_nibble(c, j);
    } else {
        uint32_t hi;
        std::memcpy(&hi, c + 8, 4);
        return ((c[j % 8] >> (2 * (j / 8))) & 3) | (int)(((hi >> j) & 1) << 2);
    }
}
template <typename Block>
inline void affine_store_codes(Block* blk, const uint8_t* q) {
    std::memset(blk->qs, 0, sizeof blk->qs);
    for (int c = 0; c < Block::kGroup / 32; ++c) {
        uint8_t* p = blk->qs + c * Block::kChunkBytes;
        const uint8_t* qc = q + 32 * c;
        if constexpr (Block::kBits == 4) {
            for (int j = 0; j < 16; ++j) p[j] = (uint8_t)(qc[j] | (qc[j + 16] << 4));
        } else {
            uint32_t hi = 0;
            for (int j = 0; j < 32; ++j) {
                p[j % 8] = (uint8_t)(p[j % 8] | ((qc[j] & 3) << (2 * (j / 8))));
                hi |= (uint32_t)(qc[j] >> 2) << j;
            }
            std::memcpy(p + 8, &hi, 4);
        }
    }
}
// Codes for given (scale, bias) and the importance-weighted squared error they leave.
inline double affine_codes(const float* x, const float* w, int g, int nmax, float s, float bias, uint8_t* q) {
    double err = 0;
    for (int j = 0; j < g; ++j) {
        const float t = s != 0 ? (x[j] - bias) / s : 0.f;
        q[j] = (uint8_t)std::max(0, std::min(nmax, nearest_int(t)));
        const double e = (double)x[j] - ((double)s * q[j] + bias);
        err += (w ? w[j] : 1.0) * e * e;
    }
    return err;
}
// MLX's rule: the larger-magnitude extreme is exact and 0 falls on a grid point (formats.md 4),
// codes computed with the fp16-rounded scale and bias. With an importance vector `w`, a few
// shrunken ranges and weighted least-squares refits of (scale, bias) are tried as well.
template <typename Block>
inline void quantize_row_affine_mlx_weighted(Block* y, const float* x, int64_t n, const float* w) {
    constexpr int G = Block::kGroup, nmax = (1 << Block::kBits) - 1;
    uint8_t q[G], best_q[G];
    for (int64_t b = 0; b < n / G; ++b, x += G) {
        const float* wg = w ? w + b * G : nullptr;
        float mn = x[0], mx = x[0];
        for (int j = 1; j < G; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
        auto mlx_params = [&](float lo, float hi, float* s_out, float* b_out) {
            float s = std::max((hi - lo) / (float)nmax, 1e-7f), edge = lo;
            if (!(std::fabs(lo) > std::fabs(hi))) { edge = hi; s = -s; }
            const float q0 = std::nearbyint(edge / s);
            float bias = 0;
            if (q0 != 0) { s = edge / q0; bias = edge; }
            *s_out = fp16_to_f32(f32_to_fp16(s));
            *b_out = fp16_to_f32(f32_to_fp16(bias));
        };
        float s, bias;
        mlx_params(mn, mx, &s, &bias);
        double best = affine_codes(x, wg, G, nmax, s, bias, best_q);
        float best_s = s, best_b = bias;
        if (wg) {
            for (int t = 0; t < 6; ++t) {
                const float shrink = 0.03f * (float)t, mid = 0.5f * (mn + mx), half = 0.5f * (mx - mn) * (1.f - shrink);
                mlx_params(mid - half, mid + half, &s, &bias);
                for (int it = 0; it < 3; ++it) {
                    const double err = affine_codes(x, wg, G, nmax, s, bias, q);
                    if (err < best) { best = err; best_s = s; best_b = bias; std::memcpy(best_q, q, G); }
                    double sw = 0, swq = 0, swqq = 0, swx = 0, swqx = 0;  // weighted LSQ of x ~ s*q + b
                    for (int j = 0; j < G; ++j) {
                        sw += wg[j]; swq += wg[j] * q[j]; swqq += wg[j] * q[j] * q[j]; swx += wg[j] * x[j]; swqx += wg[j] * q[j] * x[j];
                    }
                    const double det = sw * swqq - swq * swq;
                    if (!(det > 0)) break;
                    s = fp16_to_f32(f32_to_fp16((float)((sw * swqx - swq * swx) / det)));
                    bias = fp16_to_f32(f32_to_fp16((float)((swqq * swx - swq * swqx) / det)));
                }
            }
        }
        y[b].scale = f32_to_fp16(best_s);
        y[b].bias = f32_to_fp16(best_b);
        affine_store_codes(&y[b], best_q);
    }
}
template <typename Block>
inline void quantize_row_affine_mlx_ref(Block* y, const float* x, int64_t n) { quantize_row_affine_mlx_weighted(y, x, n, nullptr); }
template <typename Block>
inline void dequantize_row_affine_mlx(const Block* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / Block::kGroup; ++b, y += Block::kGroup) {
        const float s = fp16_to_f32(x[b].scale), bias = fp16_to_f32(x[b].bias);
        for (int i = 0; i < Block::kGroup; ++i) y[i] = s * (float)affine_code(x[b], i) + bias;
    }
}

// TQ3 / TQ4: groups of 128 coded in a rotated basis. R = D2 H D1 / sqrt(128) (H the Sylvester
// Walsh-Hadamard matrix, D1, D2 fixed random signs) spreads each group over all coordinates, which
// then look Gaussian, so one scalar Lloyd-Max codebook fits every group: x = d * R^T c[code] with
// c the int8 codebook below and d (fp16) = ||x|| / ||c[codes]|| (norm-preserving, the TurboQuant
// "shape-gain" correction). The dot product rotates the activation instead (c . R y, once per
// input vector, shared by every matrix reading it: ActFormat::q8_0_rot).
// The signs are those of turboquant-vllm (MT19937 seeded 42, outputs 0..127 for D1 and 128..255 for
// D2, +1 when odd; bit i of a mask is element i). The codebooks are its Lloyd-Max levels for N(0,1)
// (100 iterations, formats.md 5.2) scaled to int8 so the kernels stay integer: +-{0.245, 0.756,
// 1.344, 2.152} * 127 / 2.152 for TQ3, the 16 TQ4 levels * 127 / 2.717.
// Layout: TQ3 per group: d, 2-bit fields qs[32] (element 32k + j at bits 2k of byte j), third bits
// qh[16] (element 32k + j at bit k + 4 * (j / 16) of byte j % 16): 3.125 bpw. TQ4: d, four 16-byte
// Q4_0-ordered nibble runs (elements 32k..32k+31): 4.125 bpw.
constexpr int kQTQ = 128;
constexpr uint64_t kTqSigns1[2] = {0x01ab7c173fd74222ull, 0x656b5fe7ff4abaf6ull};  // {bits 0-63, 64-127}
constexpr uint64_t kTqSigns2[2] = {0x2440e65ca821d007ull, 0x1425bfcbc501d238ull};
alignas(16) constexpr int8_t kTq3Values[16] = {-127, -79, -45, -14, 14, 45, 79, 127, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(16) constexpr int8_t kTq4Values[16] = {-127, -96, -75, -58, -43, -30, -18, -6, 6, 18, 30, 43, 58, 75, 96, 127};
struct BlockTQ3 { uint16_t d; uint8_t qs[32]; uint8_t qh[16]; };
static_assert(sizeof(BlockTQ3) == 50, "wrong tq3 block size");
struct BlockTQ4 { uint16_t d; uint8_t qs[64]; };
static_assert(sizeof(BlockTQ4) == 66, "wrong tq4 block size");
template <typename Block> struct TqTraits;
template <> struct TqTraits<BlockTQ3> { static constexpr int kLevels = 8; static constexpr float kMaxSigma = 2.151945f; static constexpr const int8_t* values = kTq3Values; };
template <> struct TqTraits<BlockTQ4> { static constexpr int kLevels = 16; static constexpr float kMaxSigma = 2.717137f; static constexpr const int8_t* values = kTq4Values; };

inline float tq_sign(const uint64_t* mask, int i) { return (mask[i / 64] >> (i % 64)) & 1 ? 1.f : -1.f; }
// In-place unnormalised Walsh-Hadamard transform of 128 values (butterflies at distance 1, 2, 4...).
template <typename T>
inline void fwht128(T* v) {
    for (int h = 1; h < kQTQ; h *= 2)
        for (int i = 0; i < kQTQ; i += 2 * h)
            for (int j = i; j < i + h; ++j) {
                const T a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}
// y = R x for one group (forward rotation: activations, and weights before coding).
inline void tq_rotate(const float* x, float* y) {
    for (int i = 0; i < kQTQ; ++i) y[i] = x[i] * tq_sign(kTqSigns1, i);
    fwht128(y);
    const float inv_sqrt = 0.08838834764831845f;  // 1/sqrt(128)
    for (int i = 0; i < kQTQ; ++i) y[i] *= tq_sign(kTqSigns2, i) * inv_sqrt;
}
// y = R^T c (inverse rotation: dequantization).
inline void tq_unrotate(const float* c, float* y) {
    for (int i = 0; i < kQTQ; ++i) y[i] = c[i] * tq_sign(kTqSigns2, i);
    fwht128(y);
    const float inv_sqrt = 0.08838834764831845f;
    for (int i = 0; i < kQTQ; ++i) y[i] *= tq_sign(kTqSigns1, i) * inv_sqrt;
}
inline int tq3_code(const BlockTQ3& blk, int i) {
    const int k = i / 32, j = i % 32;
    return ((blk.qs[j] >> (2 * k)) & 3) | (((blk.qh[j % 16] >> (k + 4 * (j / 16))) & 1) << 2);
}
inline int tq4_code(const BlockTQ4& blk, int i) { return q4_nibble(blk.qs + 16 * (i / 32), i % 32); }
inline int tq_code(const BlockTQ3& blk, int i) { return tq3_code(blk, i); }
inline int tq_code(const BlockTQ4& blk, int i) { return tq4_code(blk, i); }
inline void tq_store_codes(BlockTQ3* blk, const uint8_t* q) {
    std::memset(blk->qs, 0, sizeof blk->qs);
    std::memset(blk->qh, 0, sizeof blk->qh);
    for (int i = 0; i < kQTQ; ++i) {
        const int k = i / 32, j = i % 32;
        blk->qs[j] = (uint8_t)(blk->qs[j] | ((q[i] & 3) << (2 * k)));
        blk->qh[j % 16] = (uint8_t)(blk->qh[j % 16] | ((q[i] >> 2) << (k + 4 * (j / 16))));
    }
}
inline void tq_store_codes(BlockTQ4* blk, const uint8_t* q) {
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 16; ++j) blk->qs[16 * k + j] = (uint8_t)(q[32 * k + j] | (q[32 * k + j + 16] << 4));
}
// Rotate, pick the nearest level (ties to the lower), store the norm-preserving d. With an
// importance vector `w`, d is the weighted least-squares gain of the chosen codes instead.
template <typename Block>
inline void quantize_row_tq_weighted(Block* y, const float* x, int64_t n, const float* w) {
    constexpr int L = TqTraits<Block>::kLevels;
    const int8_t* c = TqTraits<Block>::values;
    float mid[L - 1];
    for (int k = 0; k + 1 < L; ++k) mid[k] = 0.5f * ((float)c[k] + (float)c[k + 1]);
    const float c_max = (float)c[L - 1];
    float r[kQTQ], cf[kQTQ], v[kQTQ];
    uint8_t q[kQTQ];
    for (int64_t b = 0; b < n / kQTQ; ++b, x += kQTQ) {
        double norm2 = 0;
        for (int i = 0; i < kQTQ; ++i) norm2 += (double)x[i] * x[i];
        const float norm = (float)std::sqrt(norm2);
        tq_rotate(x, r);
        // Unit-variance coordinates (x / ||x|| * sqrt(128)) in codebook units (level L-1 = c_max).
        const float to_levels = norm > 0 ? 11.313708498984761f / norm * c_max / TqTraits<Block>::kMaxSigma : 0.f;
        double cc = 0;
        for (int i = 0; i < kQTQ; ++i) {
            const float t = r[i] * to_levels;
            int k = 0;
            while (k < L - 1 && mid[k] < t) ++k;
            q[i] = (uint8_t)k;
            cf[i] = (float)c[k];
            cc += (double)cf[i] * cf[i];
        }
        float d = norm > 0 && cc > 0 ? (float)(norm / std::sqrt(cc)) : 0.f;
        if (w && d > 0) {
            tq_unrotate(cf, v);
            double wxv = 0, wvv = 0;
            for (int i = 0; i < kQTQ; ++i) { wxv += (double)w[b * kQTQ + i] * x[i] * v[i]; wvv += (double)w[b * kQTQ + i] * v[i] * v[i]; }
            if (wvv > 0 && wxv > 0) d = (float)(wxv / wvv);
        }
        y[b].d = f32_to_fp16(d);
        tq_store_codes(&y[b], q);
    }
}
template <typename Block>
inline void quantize_row_tq_ref(Block* y, const float* x, int64_t n) { quantize_row_tq_weighted(y, x, n, nullptr); }
template <typename Block>
inline void dequantize_row_tq(const Block* x, float* y, int64_t n) {
    float cf[kQTQ];
    for (int64_t b = 0; b < n / kQTQ; ++b, y += kQTQ) {
        const float d = fp16_to_f32(x[b].d);
        for (int i = 0; i < kQTQ; ++i) cf[i] = (float)TqTraits<Block>::values[tq_code(x[b], i)];
        tq_unrotate(cf, y);
        for (int i = 0; i < kQTQ; ++i) y[i] *= d;
    }
}
// ActFormat::q8_0_rot (activations of TQ3/TQ4): each 128 elements rotated by R, then four Q8_0 blocks.
// The quants of chunk k (32 elements) are qs[32k..32k+31], quantized as Q8_0 (d rounded to fp16);
// d[8k..8k+7] all hold that chunk's d as a float, so that SIMD kernels load a chunk's scale across
// its eight int32 lanes instead of converting and broadcasting it. s = Σ_k d_k Σ_j qs[32k + j] lets
// a kernel feed codebook bytes offset by 128 to an unsigned x signed product (VNNI) and take
// 128 * s off once per group.
struct BlockQ8Rot { int8_t qs[128]; float d[32]; float s; };
static_assert(sizeof(BlockQ8Rot) == 260, "wrong q8_0_rot block size");

}  // namespace detail

//-----------------------------------------------------------------------------
// [SECTION] KERNELS: REFERENCE
//-----------------------------------------------------------------------------
// >>kernels-ref  vec_dot_<weight>_<activation>_ref: one weight row against one quantized
// activation row of n elements. Integer sums are exact in int32; block scales are applied after,
// in the same order as ggml's reference so results match it closely.

namespace detail {

inline float vec_dot_f32_f32_ref(const float* w, const float* x, int64_t n) {
    float sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += w[i] * x[i];
    return sum;
}
inline float vec_dot_f16_f32_ref(const uint16_t* w, const float* x, int64_t n) {
    float sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += fp16_to_f32(w[i]) * x[i];
    return sum;
}
inline float vec_dot_bf16_f32_ref(const uint16_t* w, const float* x, int64_t n) {
    float sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += bf16_to_f32(w[i]) * x[i];
    return sum;
}
// 32-element blocks whose element j is d * Value(block, j) (an integer), against Q8_0:
// d * d8 * Σ Value * y per block.
template <typename Block, int (*Value)(const Block&, int)>
inline float vec_dot_sym32_q8_0_ref(const Block* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += Value(w[b], j) * x[b].qs[j];
        sum += fp16_to_f32(w[b].d) * fp16_to_f32(x[b].d) * (float)isum;
    }
    return sum;
}
inline int q8_0_value(const BlockQ8_0& blk, int j) { return blk.qs[j]; }
inline int q4_0_value(const BlockQ4_0& blk, int j) { return q4_nibble(blk.qs, j) - 8; }
inline float vec_dot_q8_0_q8_0_ref(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) {
    return vec_dot_sym32_q8_0_ref<BlockQ8_0, q8_0_value>(w, x, n);
}
inline float vec_dot_q4_0_q8_0_ref(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    return vec_dot_sym32_q8_0_ref<BlockQ4_0, q4_0_value>(w, x, n);
}
// 4-bit blocks in Q4_0's nibble order (Q4_0, IQ4_NL, MXFP4) against q8_0_split activations (n a
// multiple of 128): the block sums and scale products of their q8_0 kernels. The code u of nibble c
// is value(c) + kOffset, unsigned as vpdpbusd wants it; the offset comes off through the stored sums.
template <typename Block, int kOffset, int (*Value)(int), float (*Scale)(const Block&)>
inline float vec_dot_nib4_q8_split_ref(const Block* w, const BlockQ8Split* x, int64_t n) {
    float sum = 0;
    for (int64_t g = 0; g < n / 128; ++g)
        for (int k = 0; k < 4; ++k) {
            const Block& b = w[4 * g + k];
            int isum = 0;
            for (int i = 0; i < 4; ++i) isum += kOffset * x[g].neg_sum[4 * k + i];
            for (int j = 0; j < 16; ++j)
                isum += (Value(b.qs[j] & 15) + kOffset) * x[g].lo[16 * k + j] + (Value(b.qs[j] >> 4) + kOffset) * x[g].hi[16 * k + j];
            sum += Scale(b) * x[g].d[4 * k] * (float)isum;
        }
    return sum;
}
inline int q4_0_code_value(int c) { return c - 8; }
inline int iq4nl_code_value(int c) { return kIq4Values[c]; }
inline int mxfp4_code_value(int c) { return kFp4Values[c]; }
template <typename Block> inline float fp16_block_scale(const Block& b) { return fp16_to_f32(b.d); }
inline float mxfp4_block_scale(const BlockMXFP4& b) { return e8m0_half(b.e); }
inline float vec_dot_q4_0_q8_split_ref(const BlockQ4_0* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_ref<BlockQ4_0, 8, q4_0_code_value, fp16_block_scale<BlockQ4_0>>(w, x, n);
}
inline float vec_dot_iq4nl_q8_split_ref(const BlockIQ4NL* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_ref<BlockIQ4NL, 128, iq4nl_code_value, fp16_block_scale<BlockIQ4NL>>(w, x, n);
}
inline float vec_dot_mxfp4_q8_split_ref(const BlockMXFP4* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_ref<BlockMXFP4, 128, mxfp4_code_value, mxfp4_block_scale>(w, x, n);
}
template <typename Block>
inline float vec_dot_q45k_q8k_ref(const Block* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int scaled = 0, mins = 0;
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, w[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, w[b].scales, &s1, &m1);
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                const uint8_t q = w[b].qs[32 * c + l];
                lo += ((q & 15) | qk_fifth_bit(w[b], c, 0, l)) * x[b].qs[64 * c + l];
                hi += ((q >> 4) | qk_fifth_bit(w[b], c, 1, l)) * x[b].qs[64 * c + 32 + l];
            }
            scaled += s0 * lo + s1 * hi;
            mins += m0 * (x[b].bsums[4 * c] + x[b].bsums[4 * c + 1]) + m1 * (x[b].bsums[4 * c + 2] + x[b].bsums[4 * c + 3]);
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)scaled - fp16_to_f32(w[b].dmin) * x[b].d * (float)mins;
    }
    return sum;
}
// Q4_1/Q5_1 against Q8_1: Σ (d*q + m) * d8*y = d*d8 * Σ q*y + m * s (s = d8 * Σ y, stored).
template <typename Block>
inline float vec_dot_affine_q8_1_ref(const Block* w, const BlockQ8_1* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int qy = 0;
        for (int j = 0; j < kQK; ++j) {
            int q;
            if constexpr (std::is_same<Block, BlockQ4_1>::value) q = j < 16 ? w[b].qs[j] & 15 : w[b].qs[j - 16] >> 4;
            else q = q5_code(w[b].qs, w[b].qh, j);
            qy += q * x[b].qs[j];
        }
        sum += fp16_to_f32(w[b].d) * fp16_to_f32(x[b].d) * (float)qy + fp16_to_f32(w[b].m) * x[b].s;
    }
    return sum;
}
inline int q5_0_value(const BlockQ5_0& blk, int j) { return q5_code(blk.qs, blk.qh, j) - 16; }
inline int iq4nl_value(const BlockIQ4NL& blk, int j) { return kIq4Values[q4_nibble(blk.qs, j)]; }
inline float vec_dot_q5_0_q8_0_ref(const BlockQ5_0* w, const BlockQ8_0* x, int64_t n) {
    return vec_dot_sym32_q8_0_ref<BlockQ5_0, q5_0_value>(w, x, n);
}
inline float vec_dot_iq4nl_q8_0_ref(const BlockIQ4NL* w, const BlockQ8_0* x, int64_t n) {
    return vec_dot_sym32_q8_0_ref<BlockIQ4NL, iq4nl_value>(w, x, n);
}
inline float vec_dot_iq4xs_q8k_ref(const BlockIQ4XS* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int isum = 0;
        for (int i = 0; i < 8; ++i) {
            const uint8_t* qs = w[b].qs + 16 * i;
            const int8_t* y = x[b].qs + 32 * i;
            int sub = 0;
            for (int j = 0; j < 16; ++j) sub += kIq4Values[qs[j] & 15] * y[j] + kIq4Values[qs[j] >> 4] * y[j + 16];
            isum += iq4xs_scale(w[b], i) * sub;
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
}
inline float vec_dot_q2k_q8k_ref(const BlockQ2K* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        q2k_unpack(w[b], q);
        int scaled = 0, mins = 0;
        for (int s = 0; s < 16; ++s) {
            int sub = 0;
            for (int i = 0; i < 16; ++i) sub += q[16 * s + i] * x[b].qs[16 * s + i];
            scaled += (w[b].scales[s] & 15) * sub;
            mins += (w[b].scales[s] >> 4) * x[b].bsums[s];
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)scaled - fp16_to_f32(w[b].dmin) * x[b].d * (float)mins;
    }
    return sum;
}
// Q3_K and Q6_K: 16 sub-blocks of 16 with one signed scale each, d * d8 * Σ_s scale_s Σ q*y.
template <typename Block, void (*Unpack)(const Block&, int8_t*), int (*Scale)(const Block&, int)>
inline float vec_dot_sub16_q8k_ref(const Block* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        Unpack(w[b], q);
        int isum = 0;
        for (int s = 0; s < 16; ++s) {
            int sub = 0;
            for (int i = 0; i < 16; ++i) sub += q[16 * s + i] * x[b].qs[16 * s + i];
            isum += Scale(w[b], s) * sub;
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
}
inline int q3k_block_scale(const BlockQ3K& blk, int s) { return q3k_scale(blk.scales, s); }
inline int q6k_block_scale(const BlockQ6K& blk, int s) { return blk.scales[s]; }
inline float vec_dot_q3k_q8k_ref(const BlockQ3K* w, const BlockQ8K* x, int64_t n) {
    return vec_dot_sub16_q8k_ref<BlockQ3K, q3k_unpack, q3k_block_scale>(w, x, n);
}
inline float vec_dot_q6k_q8k_ref(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    return vec_dot_sub16_q8k_ref<BlockQ6K, q6k_unpack, q6k_block_scale>(w, x, n);
}

// MXFP4 against Q8_0: e8m0_half(e) * d8 * Σ kFp4Values[code] * y per block.
inline float vec_dot_mxfp4_q8_0_ref(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += kFp4Values[q4_nibble(w[b].qs, j)] * x[b].qs[j];
        sum += e8m0_half(w[b].e) * fp16_to_f32(x[b].d) * (float)isum;
    }
    return sum;
}
// NVFP4 against Q8_0 (a block spans two Q8_0 blocks): ue4m3_half(d[s]) * d8 * Σ over each 16.
inline float vec_dot_nvfp4_q8_0_ref(const BlockNVFP4* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQNV; ++b)
        for (int s = 0; s < 4; ++s) {
            const BlockQ8_0& a = x[2 * b + s / 2];
            int isum = 0;
            for (int i = 0; i < 16; ++i) isum += kFp4Values[nvfp4_code(w[b], 16 * s + i)] * a.qs[16 * (s % 2) + i];
            sum += ue4m3_half(w[b].d[s]) * fp16_to_f32(a.d) * (float)isum;
        }
    return sum;
}
// MLX affine against Q8_1, per 32: scale * d8 * Σ q * y + bias * s (s = d8 * Σ y, stored).
template <typename Block>
inline float vec_dot_affine_mlx_q8_1_ref(const Block* w, const BlockQ8_1* x, int64_t n) {
    constexpr int kChunks = Block::kGroup / 32;
    float sum = 0;
    for (int64_t b = 0; b < n / Block::kGroup; ++b) {
        const float s = fp16_to_f32(w[b].scale), bias = fp16_to_f32(w[b].bias);
        for (int c = 0; c < kChunks; ++c) {
            const BlockQ8_1& a = x[b * kChunks + c];
            int isum = 0;
            for (int j = 0; j < 32; ++j) isum += affine_code(w[b], 32 * c + j) * a.qs[j];
            sum += s * fp16_to_f32(a.d) * (float)isum + bias * a.s;
        }
    }
    return sum;
}
// TQ3/TQ4 against the rotated activation: d * Σ_k d8_k * Σ c[code] * y over the four Q8_0 blocks.
template <typename Block>
inline float vec_dot_tq_q8_0_rot_ref(const Block* w, const BlockQ8Rot* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQTQ; ++b) {
        float part = 0;
        for (int k = 0; k < 4; ++k) {
            int isum = 0;
            for (int j = 0; j < 32; ++j) isum += TqTraits<Block>::values[tq_code(w[b], 32 * k + j)] * x[b].qs[32 * k + j];
            part += x[b].d[8 * k] * (float)isum;
        }
        sum += fp16_to_f32(w[b].d) * part;
    }
    return sum;
}

// Attention on a float KV cache (prefill units and decode alike, so a token's result does not
// depend on how the prompt was cut into chunks). Scores: out[i * os + j] = scale * (q_i . k_j) for
// nq query rows q_i = q + i * qs (hk floats) and n key rows k_j (hk floats, `ks` bytes apart).
inline void att_scores_ref(const float* q, int64_t qs, int nq, const uint8_t* k, size_t ks, int n, int hk, float scale, float* out, int os) {
    for (int i = 0; i < nq; ++i)
        for (int j = 0; j < n; ++j) {
            const float* kj = reinterpret_cast<const float*>(k + (size_t)j * ks);
            float sum = 0;
            for (int d = 0; d < hk; ++d) sum = std::fma(q[i * qs + d], kj[d], sum);
            out[(size_t)i * (size_t)os + (size_t)j] = sum * scale;
        }
}
// Values: acc[i * hv + d] += p[i * ps + j] * v_j[d], j = 0 .. n-1 in order, for nq accumulator rows
// and n value rows v_j (hv floats, `vs` bytes apart).
inline void att_values_ref(const float* p, int ps, int nq, const uint8_t* v, size_t vs, int n, int hv, float* acc) {
    for (int i = 0; i < nq; ++i)
        for (int j = 0; j < n; ++j) {
            const float* vj = reinterpret_cast<const float*>(v + (size_t)j * vs);
            const float pij = p[(size_t)i * (size_t)ps + (size_t)j];
            for (int d = 0; d < hv; ++d) acc[(size_t)i * (size_t)hv + (size_t)d] = std::fma(pij, vj[d], acc[(size_t)i * (size_t)hv + (size_t)d]);
        }
}
// x[j] = exp(x[j]) for the softmax (x <= 0 there; the result is clamped to exp(-87.3) below):
// x = n ln2 + r with n = nearest(x / ln2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial, times 2^n.
// Within 2 ulp of std::exp; the SIMD versions take the same steps, so they match this bit for bit.
inline void att_exp_ref(float* x, int n) {
    for (int j = 0; j < n; ++j) {
        const float v = std::min(88.f, std::max(-87.3f, x[j]));
        const float m = std::nearbyint(v * 1.44269504088896341f);
        float r = std::fma(m, -0.693145751953125f, v);
        r = std::fma(m, -1.428606765330187045e-06f, r);
        float e = 1.f / 5040;
        e = std::fma(e, r, 1.f / 720);
        e = std::fma(e, r, 1.f / 120);
        e = std::fma(e, r, 1.f / 24);
        e = std::fma(e, r, 1.f / 6);
        e = std::fma(e, r, 0.5f);
        e = std::fma(e, r, 1.f);
        e = std::fma(e, r, 1.f);
        const uint32_t bits = (uint32_t)((int32_t)m + 127) << 23;
        float scale;
        std::memcpy(&scale, &bits, 4);
        x[j] = e * scale;
    }
}

//-----------------------------------------------------------------------------
// [SECTION] ACTIVATION FORMATS
//-----------------------------------------------------------------------------
// >>act  What the table rows are made of besides the kernels: the activation quantizers, the
// float-activation dot (dequantize a block, dot it) and adapters that erase the block types.

// Activation rows to Q8_0 the way llama.cpp's x86 backend does it (scale 127/amax, round half to
// even), not with the file quantizer's 1/d and ties away from zero: the same rounding on both
// sides keeps greedy parity with llama.cpp, and it maps to one SIMD multiply + round.
inline void quantize_act_q8_0_ref(BlockQ8_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
        float id = amax != 0 ? 127.f / amax : 0.f;
        y[b].d = f32_to_fp16(amax / 127.f);
        for (int j = 0; j < kQK; ++j) y[b].qs[j] = (int8_t)std::nearbyint(x[j] * id);
    }
}

inline void quantize_act_q8_1_ref(BlockQ8_1* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f, id = amax != 0 ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < kQK; ++j) {
            y[b].qs[j] = (int8_t)std::nearbyint(x[j] * id);
            sum += y[b].qs[j];
        }
        y[b].d = f32_to_fp16(d);
        const float s = d * (float)sum;
        y[b].s = std::fabs(s) <= 65504.f ? fp16_to_f32(f32_to_fp16(s)) : s;
        y[b].pad[0] = y[b].pad[1] = 0;
    }
}
// ActFormat::q8_0_split from a Q8_0 quantizer's blocks (the _ref's or a bit-exact SIMD one), re-laid.
// Lane 4k + i of neg_sum is minus the codes that lane's vpdpbusd pair multiplies (lo and hi bytes
// 4i..4i+3 of block k), so each 32-bit lane of a kernel holds a true partial sum of its block.
template <void (*QuantizeQ8_0)(BlockQ8_0*, const float*, int64_t)>
inline void quantize_act_q8_split(BlockQ8Split* y, const float* x, int64_t n) {
    for (int64_t g = 0; g < n / 128; ++g, x += 128) {
        BlockQ8_0 q[4];
        QuantizeQ8_0(q, x, 128);
        for (int k = 0; k < 4; ++k) {
            for (int j = 0; j < 16; ++j) {
                y[g].lo[16 * k + j] = q[k].qs[j];
                y[g].hi[16 * k + j] = q[k].qs[j + 16];
            }
            for (int i = 0; i < 4; ++i) {
                int sum = 0;
                for (int j = 4 * i; j < 4 * i + 4; ++j) sum += q[k].qs[j] + q[k].qs[j + 16];
                y[g].neg_sum[4 * k + i] = -sum;
                y[g].d[4 * k + i] = fp16_to_f32(q[k].d);
            }
        }
    }
}
inline void quantize_act_q8_split_ref(BlockQ8Split* y, const float* x, int64_t n) { quantize_act_q8_split<quantize_act_q8_0_ref>(y, x, n); }

// TQ3/TQ4's activations: R x per 128 (the weights' rotation), then Q8_0.
inline void quantize_act_q8_0_rot_ref(BlockQ8Rot* y, const float* x, int64_t n) {
    float r[kQTQ];
    for (int64_t b = 0; b < n / kQTQ; ++b, x += kQTQ) {
        tq_rotate(x, r);
        BlockQ8_0 q[4];
        quantize_act_q8_0_ref(q, r, kQTQ);
        float sum = 0;
        for (int k = 0; k < 4; ++k) {
            const float d = fp16_to_f32(q[k].d);
            int qsum = 0;
            for (int j = 0; j < 32; ++j) qsum += q[k].qs[j];
            std::memcpy(y[b].qs + 32 * k, q[k].qs, 32);
            for (int i = 0; i < 8; ++i) y[b].d[8 * k + i] = d;
            sum += d * (float)qsum;
        }
        y[b].s = sum;
    }
}

// Quantized weights against float activations: dequantize one block at a time into register-
// sized scratch and dot it. The specification of SessionOptions::float_activations.
template <typename Block, int kBlockElems, void (*Dequantize)(const Block*, float*, int64_t)>
float vec_dot_dequant_f32_ref(const Block* w, const float* x, int64_t n) {
    float block[kBlockElems];
    float sum = 0;
    for (int64_t b = 0; b < n / kBlockElems; ++b) {
        Dequantize(w + b, block, kBlockElems);
        float partial = 0;
        for (int i = 0; i < kBlockElems; ++i) partial += block[i] * x[b * kBlockElems + i];
        sum += partial;
    }
    return sum;
}

// Adapters from typed kernels (const BlockQ4_0*, ...) to the table's untyped signatures.
template <typename F> struct KernelArgs;
template <typename W, typename X> struct KernelArgs<float (*)(const W*, const X*, int64_t)> { typedef W w; typedef X x; };
template <typename B> struct KernelArgs<void (*)(B*, const float*, int64_t)> { typedef B out; };
template <typename B> struct KernelArgs<void (*)(const B*, float*, int64_t)> { typedef B in; };
template <typename B> struct KernelArgs<void (*)(B*, const float*, int64_t, const float*)> { typedef B out; };

template <auto F> float erase_dot(const void* w, const void* x, int64_t n) {
    typedef KernelArgs<decltype(F)> A;
    return F(static_cast<const typename A::w*>(w), static_cast<const typename A::x*>(x), n);
}
template <auto F> void erase_quantize(const float* x, void* y, int64_t n) { F(static_cast<typename KernelArgs<decltype(F)>::out*>(y), x, n); }
template <auto F> void erase_quantize_weighted(const float* x, void* y, int64_t n, const float* w) {
    F(static_cast<typename KernelArgs<decltype(F)>::out*>(y), x, n, w);
}
template <auto F> void erase_dequantize(const void* x, float* y, int64_t n) { F(static_cast<const typename KernelArgs<decltype(F)>::in*>(x), y, n); }

//-----------------------------------------------------------------------------
// [SECTION] GEMM PANELS (PREFILL)
//-----------------------------------------------------------------------------
// >>gemm  Prefill and big chunks multiply each weight row by many tokens. The row kernels would
// decode a row's blocks again for every token and reduce every (row, token) sum horizontally; here
// a tile of kGemmRows rows is decoded once into a panel of int8 codes, 4-column groups of the 16
// rows interleaved so one 64-byte vector holds the same 4 columns of every row, and multiplied by up
// to kGemmTokens tokens at a time: each int32 lane is one (row, token) sum (vpdpbusd), scaled per
// 32-column block in float. It serves every type whose values are int8 codes times a scale per 32
// columns, plus an optional offset per 32 (`min`, taken through the activation block sums).
// Activations come as BlockQ8G: codes stored +128 for vpdpbusd's unsigned operand; the panel's
// per-block `bias` (-128 x the block's code sum) takes that offset back exactly.
constexpr int kGemmRows = 16, kGemmTokens = 8;

// A panel activation block: scale d, s = d x (sum of the codes) for offsets, codes stored + 128.
// The codes and scales are those of the row kernels' format (q8_0/q8_1, or q8_k with its scale
// repeated in each block of 32), so panels and row kernels compute the same products and differ
// only in the order of the float additions (and keep llama.cpp's rounding).
struct BlockQ8G { float d, s; uint8_t qs[kQK]; };
static_assert(sizeof(BlockQ8G) == 40, "wrong q8_gemm block size");

// ActFormat::q8_gemm: quantize_act_q8_1_ref's block (Q8_0's codes and fp16 scale, and s), re-laid.
inline void quantize_act_q8g_ref(BlockQ8G* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        BlockQ8_1 q;
        quantize_act_q8_1_ref(&q, x, kQK);
        y[b].d = fp16_to_f32(q.d);
        y[b].s = q.s;
        for (int j = 0; j < kQK; ++j) y[b].qs[j] = (uint8_t)(q.qs[j] + 128);
    }
}
// ActFormat::q8_gemm_k: quantize_row_q8k_ref's codes and scale, 8 blocks per 256.
inline void quantize_act_q8gk_ref(BlockQ8G* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK, y += kQKK / kQK) {
        float amax = 0, vmax = 0;
        for (int j = 0; j < kQKK; ++j)
            if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); vmax = x[j]; }
        const float iscale = amax != 0 ? -127.f / vmax : 0.f, d = amax != 0 ? 1 / iscale : 0.f;
        for (int c = 0; c < kQKK / kQK; ++c) {
            int sum = 0;
            for (int j = 0; j < kQK; ++j) {
                const int q = std::min(127, nearest_int(iscale * x[kQK * c + j]));
                sum += q;
                y[c].qs[j] = (uint8_t)(q + 128);
            }
            y[c].d = d;
            y[c].s = d * (float)sum;
        }
    }
}

// A weight row as int8 codes q[K], scale[K / 32] and (types with offsets) min[K / 32]:
// element j = scale[j / 32] * q[j] + min[j / 32], exactly as the type's dequantizer computes it.
typedef void (*GemmDecodeFn)(const void* row, int64_t n, int8_t* q, float* scale, float* min);
struct GemmPanel;
// Writes a weight row straight into panel row r (the common types: no row buffer, no per-element loop).
typedef void (*GemmPackRowFn)(const void* row, int64_t n, int r, GemmPanel* p);
struct GemmType {
    GemmDecodeFn decode = nullptr;  // nullptr: the type has no panel form (row kernels only)
    bool has_min = false;
    GemmPackRowFn pack_row = nullptr;  // optional, the same result as decode + gemm_pack's scatter
    // A routed expert's matrices run as panels only with at least this many tokens (and
    // gemm_min_tokens). MXFP4: its row kernels look 16 codes up at once while a panel decodes them
    // one by one, so at the ~8 tokens an expert gets in a 64-token chunk rows are faster
    // (gpt-oss-20b, 16 threads: prefill 92 tok/s on rows, 33 with expert panels).
    int32_t expert_min_tokens = 0;
};

inline void gemm_decode_q4_0(const BlockQ4_0* x, int64_t n, int8_t* q, float* scale, float*) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK; ++j) q[j] = (int8_t)(q4_nibble(x[b].qs, j) - 8);
    }
}
inline void gemm_decode_q4_1(const BlockQ4_1* x, int64_t n, int8_t* q, float* scale, float* min) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        min[b] = fp16_to_f32(x[b].m);
        for (int j = 0; j < kQK; ++j) q[j] = (int8_t)q4_nibble(x[b].qs, j);
    }
}
inline void gemm_decode_q5_0(const BlockQ5_0* x, int64_t n, int8_t* q, float* scale, float*) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK; ++j) q[j] = (int8_t)(q5_code(x[b].qs, x[b].qh, j) - 16);
    }
}
inline void gemm_decode_q5_1(const BlockQ5_1* x, int64_t n, int8_t* q, float* scale, float* min) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        min[b] = fp16_to_f32(x[b].m);
        for (int j = 0; j < kQK; ++j) q[j] = (int8_t)q5_code(x[b].qs, x[b].qh, j);
    }
}
inline void gemm_decode_q8_0(const BlockQ8_0* x, int64_t n, int8_t* q, float* scale, float*) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        std::memcpy(q, x[b].qs, kQK);
    }
}
inline void gemm_decode_iq4nl(const BlockIQ4NL* x, int64_t n, int8_t* q, float* scale, float*) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = fp16_to_f32(x[b].d);
        for (int j = 0; j < kQK; ++j) q[j] = kIq4Values[q4_nibble(x[b].qs, j)];
    }
}
inline void gemm_decode_mxfp4(const BlockMXFP4* x, int64_t n, int8_t* q, float* scale, float*) {
    for (int64_t b = 0; b < n / kQK; ++b, q += kQK) {
        scale[b] = e8m0_half(x[b].e);
        for (int j = 0; j < kQK; ++j) q[j] = kFp4Values[q4_nibble(x[b].qs, j)];
    }
}
// Q4_K / Q5_K: sub-block i of 32 is d * sc_i * q - dmin * m_i.
template <typename Block>
inline void gemm_decode_q45k(const Block* x, int64_t n, int8_t* q, float* scale, float* min) {
    for (int64_t b = 0; b < n / kQKK; ++b, q += kQKK, scale += 8, min += 8) {
        const float d = fp16_to_f32(x[b].d), dmin = fp16_to_f32(x[b].dmin);
        for (int c = 0; c < 4; ++c) {
            for (int h = 0; h < 2; ++h) {
                uint8_t sc, m;
                q4k_get_scale_min(2 * c + h, x[b].scales, &sc, &m);
                scale[2 * c + h] = d * sc;
                min[2 * c + h] = -(dmin * m);
            }
            for (int l = 0; l < 32; ++l) {
                const uint8_t v = x[b].qs[32 * c + l];
                q[64 * c + l] = (int8_t)((v & 15) | qk_fifth_bit(x[b], c, 0, l));
                q[64 * c + 32 + l] = (int8_t)((v >> 4) | qk_fifth_bit(x[b], c, 1, l));
            }
        }
    }
}
template <typename Block>
inline void gemm_decode_affine(const Block* x, int64_t n, int8_t* q, float* scale, float* min) {
    for (int64_t b = 0; b < n / Block::kGroup; ++b) {
        const float s = fp16_to_f32(x[b].scale), bias = fp16_to_f32(x[b].bias);
        for (int i = 0; i < Block::kGroup; ++i) q[i] = (int8_t)affine_code(x[b], i);
        for (int c = 0; c < Block::kGroup / kQK; ++c) { scale[c] = s; min[c] = bias; }
        q += Block::kGroup; scale += Block::kGroup / kQK; min += Block::kGroup / kQK;
    }
}

template <typename B> struct KernelArgs<void (*)(const B*, int64_t, int8_t*, float*, float*)> { typedef B w; };
template <auto F> void erase_gemm_decode(const void* row, int64_t n, int8_t* q, float* scale, float* min) {
    F(static_cast<const typename KernelArgs<decltype(F)>::w*>(row), n, q, scale, min);
}


// Up to kGemmRows rows of K columns in panel form (rows past `rows` are zero):
// q[((b * 8 + g) * 16 + r) * 4 + k] = code of row r, column 32 b + 4 g + k.
struct GemmPanel {
    int8_t* q = nullptr;      // (K / 32, 8, 16, 4)
    int32_t* bias = nullptr;  // (K / 32, 16): -128 x the block's code sum
    float* scale = nullptr;   // (K / 32, 16)
    float* min = nullptr;     // (K / 32, 16); unused unless has_min
    bool has_min = false;
    int64_t nb = 0;           // blocks of 32 columns
};

// Q4_0 and Q8_0 rows 4 codes at a time (SWAR). Q4_0: a code is nibble - 8, made bytewise as
// ((nibble | 0x80) - 8) ^ 0x80 (no borrow crosses a byte); code sums from byte sums by multiply.
inline void store_u32(void* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline void gemm_pack_row_q4_0(const BlockQ4_0* x, int64_t n, int r, GemmPanel* p) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        int8_t* q = p->q + (b * 8 * kGemmRows + r) * 4;
        uint32_t nibble_sum = 0;
        for (int g = 0; g < 4; ++g) {
            const uint32_t v = load_u32(x[b].qs + 4 * g), lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
            nibble_sum += ((lo + hi) * 0x01010101u) >> 24;  // 4 bytes of at most 30
            store_u32(q + g * kGemmRows * 4, ((lo | 0x80808080u) - 0x08080808u) ^ 0x80808080u);
            store_u32(q + (g + 4) * kGemmRows * 4, ((hi | 0x80808080u) - 0x08080808u) ^ 0x80808080u);
        }
        p->bias[b * kGemmRows + r] = -128 * ((int32_t)nibble_sum - 8 * kQK);
        p->scale[b * kGemmRows + r] = fp16_to_f32(x[b].d);
        p->min[b * kGemmRows + r] = 0.f;
    }
}
inline void gemm_pack_row_q8_0(const BlockQ8_0* x, int64_t n, int r, GemmPanel* p) {
    for (int64_t b = 0; b < n / kQK; ++b) {
        int8_t* q = p->q + (b * 8 * kGemmRows + r) * 4;
        int32_t biased_sum = 0;  // codes + 128
        for (int g = 0; g < 8; ++g) {
            const uint32_t v = load_u32(x[b].qs + 4 * g), u = v ^ 0x80808080u;
            const uint32_t pairs = (u & 0x00FF00FFu) + ((u >> 8) & 0x00FF00FFu);
            biased_sum += (int32_t)((pairs + (pairs >> 16)) & 0xFFFFu);
            store_u32(q + g * kGemmRows * 4, v);
        }
        p->bias[b * kGemmRows + r] = -128 * (biased_sum - 128 * kQK);
        p->scale[b * kGemmRows + r] = fp16_to_f32(x[b].d);
        p->min[b * kGemmRows + r] = 0.f;
    }
}
template <typename B> struct PackArgs;
template <typename B> struct PackArgs<void (*)(const B*, int64_t, int, GemmPanel*)> { typedef B w; };
template <auto F> void erase_gemm_pack_row(const void* row, int64_t n, int r, GemmPanel* p) {
    F(static_cast<const typename PackArgs<decltype(F)>::w*>(row), n, r, p);
}

inline GemmType gemm_type(TensorType t) {
    switch (t) {
        case TensorType::q4_0: return {erase_gemm_decode<gemm_decode_q4_0>, false, erase_gemm_pack_row<gemm_pack_row_q4_0>};
        case TensorType::q4_1: return {erase_gemm_decode<gemm_decode_q4_1>, true};
        case TensorType::q5_0: return {erase_gemm_decode<gemm_decode_q5_0>, false};
        case TensorType::q5_1: return {erase_gemm_decode<gemm_decode_q5_1>, true};
        case TensorType::q8_0: return {erase_gemm_decode<gemm_decode_q8_0>, false, erase_gemm_pack_row<gemm_pack_row_q8_0>};
        case TensorType::iq4_nl: return {erase_gemm_decode<gemm_decode_iq4nl>, false};
        case TensorType::mxfp4: return {erase_gemm_decode<gemm_decode_mxfp4>, false, nullptr, 64};
        case TensorType::q4_k: return {erase_gemm_decode<gemm_decode_q45k<BlockQ4K>>, true};
        case TensorType::q5_k: return {erase_gemm_decode<gemm_decode_q45k<BlockQ5K>>, true};
        case TensorType::affine3_g32: return {erase_gemm_decode<gemm_decode_affine<BlockAffine3G32>>, true};
        case TensorType::affine3_g64: return {erase_gemm_decode<gemm_decode_affine<BlockAffine3G64>>, true};
        case TensorType::affine3_g128: return {erase_gemm_decode<gemm_decode_affine<BlockAffine3G128>>, true};
        case TensorType::affine4_g32: return {erase_gemm_decode<gemm_decode_affine<BlockAffine4G32>>, true};
        case TensorType::affine4_g64: return {erase_gemm_decode<gemm_decode_affine<BlockAffine4G64>>, true};
        case TensorType::affine4_g128: return {erase_gemm_decode<gemm_decode_affine<BlockAffine4G128>>, true};
        default: return {};
    }
}

// A panel and the decode buffers of one thread, for rows of up to `max_k` columns.
struct GemmScratch {
    GemmPanel panel;
    int8_t* row_q = nullptr;
    float *row_scale = nullptr, *row_min = nullptr;
    static size_t bytes(int64_t max_k) {
        const size_t nb = (size_t)(max_k / kQK);
        return nb * kQK * kGemmRows + nb * kGemmRows * 12 + (size_t)max_k + nb * 8 + 256;
    }
    // Carves a panel and its decode buffers out of `base` (64-byte aligned, bytes(max_k) long).
    void carve(uint8_t* base, int64_t max_k) {
        const size_t nb = (size_t)(max_k / kQK);
        panel.q = reinterpret_cast<int8_t*>(base);
        panel.bias = reinterpret_cast<int32_t*>(base + nb * kQK * kGemmRows);
        panel.scale = reinterpret_cast<float*>(panel.bias + nb * kGemmRows);
        panel.min = panel.scale + nb * kGemmRows;
        row_scale = panel.min + nb * kGemmRows;
        row_min = row_scale + nb;
        row_q = reinterpret_cast<int8_t*>(row_min + nb);
    }
};

// Decodes `rows` (<= kGemmRows) rows, `row_bytes` apart, into s's panel.
inline void gemm_pack(const GemmType& gt, const uint8_t* w, size_t row_bytes, int rows, int64_t k, GemmScratch* s) {
    GemmPanel& p = s->panel;
    p.nb = k / kQK;
    p.has_min = gt.has_min;
    for (int r = 0; r < kGemmRows; ++r) {
        if (r < rows && gt.pack_row) {
            gt.pack_row(w + (size_t)r * row_bytes, k, r, &p);
            continue;
        }
        if (r < rows) {
            gt.decode(w + (size_t)r * row_bytes, k, s->row_q, s->row_scale, s->row_min);
        } else {
            std::memset(s->row_q, 0, (size_t)k);
            for (int64_t b = 0; b < p.nb; ++b) s->row_scale[b] = s->row_min[b] = 0;
        }
        for (int64_t b = 0; b < p.nb; ++b) {
            const int8_t* src = s->row_q + b * kQK;
            int32_t sum = 0;
            for (int j = 0; j < kQK; ++j) sum += src[j];
            for (int g = 0; g < kQK / 4; ++g) std::memcpy(p.q + ((b * 8 + g) * kGemmRows + r) * 4, src + 4 * g, 4);
            p.bias[b * kGemmRows + r] = -128 * sum;
            p.scale[b * kGemmRows + r] = s->row_scale[b];
            p.min[b * kGemmRows + r] = gt.has_min ? s->row_min[b] : 0.f;
        }
    }
}

// out[t * 16 + r] = row r of the panel . token t (x[t]: K / 32 blocks), t < nt <= kGemmTokens. The
// order of the float operations is the specification: per block, the int32 sum converted, times
// (scale x d) fused into the accumulator; with offsets, that product fused onto min x s and the
// block's total added (the two terms largely cancel: adding their sum loses less).
inline void gemm_tile_ref(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out) {
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r < kGemmRows; ++r) {
            float acc = 0;
            for (int64_t b = 0; b < p.nb; ++b) {
                const BlockQ8G& xb = x[t][b];
                int32_t sum = p.bias[b * kGemmRows + r];
                for (int j = 0; j < kQK; ++j) sum += (int32_t)xb.qs[j] * p.q[((b * 8 + j / 4) * kGemmRows + r) * 4 + j % 4];
                if (p.has_min) acc += std::fma(p.scale[b * kGemmRows + r] * xb.d, (float)sum, p.min[b * kGemmRows + r] * xb.s);
                else acc = std::fma(p.scale[b * kGemmRows + r] * xb.d, (float)sum, acc);
            }
            out[t * kGemmRows + r] = acc;
        }
}
typedef void (*GemmTileFn)(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out);

}  // namespace detail
}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] KERNELS: X86 (AVX2, AVX-512, VNNI)
//-----------------------------------------------------------------------------
// >>kernels-x86
// >>kernels-x86  AVX2 and AVX-512 (+VNNI) versions of the row kernels in KERNELS: REFERENCE. Each
// one computes exactly the same integer block sums as its _ref twin (so results differ only in the
// order of the float additions) and reads weights with unaligned loads (GGUF data is only 32-byte
// aligned and block sizes are odd). Functions carry target attributes, so no -mavx2 is needed; the
// dispatcher below hands them out only after x86_detect_level() has seen the CPU and OS support.
// The integer tricks (formats.md 2.7): maddubs multiplies unsigned by signed bytes into int16 pairs,
// so unsigned nibbles go in directly and a constant offset (Q4_0's -8, Q6_K's -32) is removed
// through the activation sums; vpdpbusd (VNNI) does the same into int32 in one instruction. No int16
// partial can saturate: the largest is 2*63*127 = 16002 (Q6_K), with activations in [-127, 127].
#if MOE_DETAIL_HAS_X86
#include <cpuid.h>
#include <immintrin.h>

#define MOE_DETAIL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOE_DETAIL_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define MOE_DETAIL_AVX512VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// GCC 12's AVX-512 intrinsics use a self-initialised "undefined" vector that -Wuninitialized flags
// wherever they are inlined (GCC bug 105593); the warning is about the intrinsic header, not us.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moe {
namespace detail {

// 0 = no usable SIMD, 1 = AVX2 + FMA + F16C, 2 = AVX-512 F/BW/VL/DQ, 3 = level 2 + AVX512_VNNI.
// MOE_NO_AVX512 caps the level at 1; MOE_NO_AVX2 turns an AVX2-only CPU into level 0.
inline int x86_detect_level() {
    static const int level = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return 0;
        if (!(c & (1u << 27))) return 0;  // OSXSAVE: the OS enabled XSAVE, so XGETBV may be executed
        if (!(c & (1u << 28))) return 0;  // AVX
        if (!(c & (1u << 12))) return 0;  // FMA3
        if (!(c & (1u << 29))) return 0;  // F16C (fp16 <-> fp32 conversions)
        unsigned xcr0_lo = 0, xcr0_hi = 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
        if ((xcr0_lo & 0x6) != 0x6) return 0;  // XCR0 bits 1-2: the OS saves XMM and YMM state
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
        if (!(b & (1u << 5))) return 0;  // AVX2
        int lvl = 1;
#if MOE_DETAIL_HAS_AVX512
        const bool zmm_state = (xcr0_lo & 0xe0) == 0xe0;  // XCR0 bits 5-7: opmask, ZMM0-15 upper halves, ZMM16-31
        const bool f = b & (1u << 16);    // AVX512F
        const bool dq = b & (1u << 17);   // AVX512DQ
        const bool bw = b & (1u << 30);   // AVX512BW (byte/word ops: maddubs, abs_epi8)
        const bool vl = b & (1u << 31);   // AVX512VL (EVEX forms of 128/256-bit ops)
        const bool vnni = c & (1u << 11); // AVX512_VNNI (vpdpbusd, vpdpwssd)
        if (zmm_state && f && dq && bw && vl) lvl = vnni ? 3 : 2;
#endif
#if !MOE_DETAIL_HAS_AVX2
        if (lvl == 1) lvl = 0;
#endif
        (void)xcr0_hi;
        return lvl;
    }();
    return level;
}

#if MOE_DETAIL_HAS_AMX
// AMX-TILE + AMX-INT8 on a level-3 CPU, the OS managing the tile state (XCR0 bits 17-18), and
// Linux's permission for this process (asked once; it lasts for the process).
inline bool x86_amx_usable() {
    static const bool usable = [] {
        if (x86_detect_level() < 3) return false;
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
        unsigned xcr0_lo = 0, xcr0_hi = 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
        (void)xcr0_hi;
        if ((xcr0_lo & 0x60000u) != 0x60000u) return false;  // XTILECFG, XTILEDATA
        const long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return usable;
}
#endif

//---- shared helpers (AVX2; inlined into the AVX-512 kernels too, whose targets include AVX2) ----

MOE_DETAIL_AVX2 inline float hsum_f32x8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

MOE_DETAIL_AVX2 inline int hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x55));
    return _mm_cvtsi128_si32(s);
}

MOE_DETAIL_AVX2 inline float hmax_f32x8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

MOE_DETAIL_AVX2 inline __m256i loadu_256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
MOE_DETAIL_AVX2 inline __m128i loadu_128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// Product of two fp16 block scales (F16C converts exactly, like fp16_to_f32).
MOE_DETAIL_AVX2 inline float fp16_mul(uint16_t a, uint16_t b) { return _cvtsh_ss(a) * _cvtsh_ss(b); }

// One Q4_0 block's 16 bytes as 32 unsigned nibbles in element order (low nibbles are elements
// 0-15, high nibbles 16-31): broadcast to both lanes (a pure load), shift the upper lane by 4.
MOE_DETAIL_AVX2 inline __m256i q4_0_nibbles_avx2(const uint8_t* qs) {
    const __m256i q = _mm256_broadcastsi128_si256(loadu_128(qs));
    return _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0F));
}

// Q4_K/Q5_K's 12 packed bytes as eight 6-bit scales (bytes 0-7) and eight mins (bytes 8-15),
// the same values q4k_get_scale_min() decodes, four at a time in 32-bit words.
MOE_DETAIL_AVX2 inline __m128i q4k_scales_mins(const uint8_t* s) {
    uint32_t a, b, c;  // s[0..3], s[4..7], s[8..11]
    std::memcpy(&a, s, 4);
    std::memcpy(&b, s + 4, 4);
    std::memcpy(&c, s + 8, 4);
    const uint64_t sc = (a & 0x3f3f3f3fu) | (uint64_t)((c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u)) << 32;
    const uint64_t mn = (b & 0x3f3f3f3fu) | (uint64_t)(((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u)) << 32;
    return _mm_set_epi64x((long long)mn, (long long)sc);
}

// pshufb control that repeats 16-bit element `lo` in the low 128-bit lane and `hi` in the high one.
MOE_DETAIL_AVX2 inline __m256i splat16_ctrl(int lo, int hi) {
    return _mm256_setr_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * lo)), _mm_set1_epi16((short)(0x0100 + 0x0202 * hi)));
}

// The 8 sub-block scales of a Q4_K/Q5_K super-block, each in both 16-bit halves of an int32, stored
// so that broadcast_i32 can splat them: a broadcast from memory is a plain load, while a shuffle
// per sub-block would queue on the one shuffle port that already carries the nibble unpacking.
MOE_DETAIL_AVX2 inline void q4k_store_scale_pairs(__m128i scales_mins, int32_t* out) {
    const __m256i sc32 = _mm256_cvtepu8_epi32(scales_mins);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_or_si256(sc32, _mm256_slli_epi32(sc32, 16)));
}
MOE_DETAIL_AVX2 inline __m256i broadcast_i32(const int32_t* p) {
    return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// Q4_K/Q5_K mins term for one super-block: 8 int32 lanes, lane j = m_j * (bsums[2j] + bsums[2j+1]).
MOE_DETAIL_AVX2 inline __m256i q4k_mins_dot(__m128i scales_mins, const int16_t* bsums) {
    const __m128i dup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scales_mins, dup));  // m0 m0 m1 m1 ...
    return _mm256_madd_epi16(loadu_256(bsums), mins);
}

//-----------------------------------------------------------------------------
// AVX2 (+FMA, F16C): 256-bit. Four independent float accumulators hide the 4-cycle FMA latency.
//-----------------------------------------------------------------------------

MOE_DETAIL_AVX2 inline float vec_dot_f32_f32_avx2(const float* w, const float* x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {  // 4 independent FMA chains
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
    float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; ++i) sum += w[i] * x[i];
    return sum;
}

MOE_DETAIL_AVX2 inline float vec_dot_f16_f32_avx2(const uint16_t* w, const float* x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(loadu_128(w + i)), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(loadu_128(w + i + 8)), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_cvtph_ps(loadu_128(w + i + 16)), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_cvtph_ps(loadu_128(w + i + 24)), _mm256_loadu_ps(x + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(loadu_128(w + i)), _mm256_loadu_ps(x + i), acc0);
    float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; ++i) sum += _cvtsh_ss(w[i]) * x[i];
    return sum;
}

// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
MOE_DETAIL_AVX2 inline __m256 bf16x8_to_f32(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(loadu_128(p)), 16));
}

MOE_DETAIL_AVX2 inline float vec_dot_bf16_f32_avx2(const uint16_t* w, const float* x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(bf16x8_to_f32(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8_to_f32(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(bf16x8_to_f32(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(bf16x8_to_f32(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(bf16x8_to_f32(w + i), _mm256_loadu_ps(x + i), acc0);
    float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; ++i) sum += bf16_to_f32(w[i]) * x[i];
    return sum;
}

// Σ (nib - 8) * y over one Q4_0 block as 8 int32 partial sums: maddubs(nib, y) - maddubs(8, y),
// both exact in int16 (|.| <= 2*15*127 and 2*8*127).
MOE_DETAIL_AVX2 inline __m256i block_dot_avx2(const BlockQ4_0& w, const BlockQ8_0& x) {
    const __m256i y = loadu_256(x.qs);
    const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q4_0_nibbles_avx2(w.qs), y), _mm256_maddubs_epi16(_mm256_set1_epi8(8), y));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// Σ w * y over one Q8_0 block: maddubs needs an unsigned operand, so move w's sign onto y
// (|w| <= 128 and |y| <= 127 keep the int16 pairs below 32767, even for a stored -128).
MOE_DETAIL_AVX2 inline __m256i block_dot_avx2(const BlockQ8_0& w, const BlockQ8_0& x) {
    const __m256i a = loadu_256(w.qs), y = loadu_256(x.qs);
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(y, a));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// d_w * d_x of four consecutive blocks. The scales sit 18 or 34 bytes apart, so converting them
// one by one costs more shuffle-port work than the integer dot itself; here eight fp16 values go
// through a single conversion.
template <typename W>
MOE_DETAIL_AVX2 inline __m128 scales4_avx2(const W* w, const BlockQ8_0* x) {
    __m128i h = _mm_cvtsi32_si128(w[0].d);
    h = _mm_insert_epi16(h, w[1].d, 1);
    h = _mm_insert_epi16(h, w[2].d, 2);
    h = _mm_insert_epi16(h, w[3].d, 3);
    h = _mm_insert_epi16(h, x[0].d, 4);
    h = _mm_insert_epi16(h, x[1].d, 5);
    h = _mm_insert_epi16(h, x[2].d, 6);
    h = _mm_insert_epi16(h, x[3].d, 7);
    const __m256 f = _mm256_cvtph_ps(h);
    return _mm_mul_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
}

// Q4_0 and Q8_0 weights against Q8_0 activations: four blocks per step, one accumulator each
// (hides the 4-cycle FMA latency), block scales applied once per block after the integer sums.
// A macro rather than a template because the VNNI variant below must be compiled for its own
// target (and a template carries one target attribute for all its instantiations).
#define MOE_DETAIL_Q8_0_BLOCKS_LOOP(BLOCK_DOT)                                                        \
    const int64_t nb = n / kQK;                                                                        \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                     \
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();                                     \
    alignas(16) float sc[4]; /* broadcast from memory is a plain load, not a shuffle */                \
    int64_t b = 0;                                                                                     \
    for (; b + 4 <= nb; b += 4) {                                                                      \
        _mm_store_ps(sc, scales4_avx2(w + b, x + b));                                                  \
        acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 0), _mm256_cvtepi32_ps(BLOCK_DOT(w[b + 0], x[b + 0])), acc0); \
        acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 1), _mm256_cvtepi32_ps(BLOCK_DOT(w[b + 1], x[b + 1])), acc1); \
        acc2 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 2), _mm256_cvtepi32_ps(BLOCK_DOT(w[b + 2], x[b + 2])), acc2); \
        acc3 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 3), _mm256_cvtepi32_ps(BLOCK_DOT(w[b + 3], x[b + 3])), acc3); \
    }                                                                                                  \
    for (; b < nb; ++b)                                                                                \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16_mul(w[b].d, x[b].d)), _mm256_cvtepi32_ps(BLOCK_DOT(w[b], x[b])), acc0); \
    return hsum_f32x8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)))

MOE_DETAIL_AVX2 inline float vec_dot_q4_0_q8_0_avx2(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_BLOCKS_LOOP(block_dot_avx2);
}
MOE_DETAIL_AVX2 inline float vec_dot_q8_0_q8_0_avx2(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_BLOCKS_LOOP(block_dot_avx2);
}

// A Q5_0/Q5_1 block's 32 codes in element order: the Q4_0 nibbles plus 0x10 where bit j of qh is
// set (byte j gets qh byte j / 8, tested against bit j % 8).
MOE_DETAIL_AVX2 inline __m256i q5_codes_avx2(const uint8_t* qs, const uint8_t* qh) {
    uint32_t bits;
    std::memcpy(&bits, qh, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(q4_0_nibbles_avx2(qs), high);
}
// An IQ4_NL block's codes through the codebook: 32 signed weights in element order.
MOE_DETAIL_AVX2 inline __m256i iq4_weights_avx2(const uint8_t* qs) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(loadu_128(kIq4Values)), q4_0_nibbles_avx2(qs));
}
// Σ a*y for signed a (|a| <= 127) as 8 int32 sums: a's sign moved onto y, as for Q8_0.
MOE_DETAIL_AVX2 inline __m256i signed_dot_avx2(__m256i a, __m256i y) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(y, a)), _mm256_set1_epi16(1));
}
MOE_DETAIL_AVX2 inline __m256i block_dot_avx2(const BlockQ5_0& w, const BlockQ8_0& x) {
    const __m256i y = loadu_256(x.qs);
    const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q5_codes_avx2(w.qs, w.qh), y), _mm256_maddubs_epi16(_mm256_set1_epi8(16), y));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
MOE_DETAIL_AVX2 inline __m256i block_dot_avx2(const BlockIQ4NL& w, const BlockQ8_0& x) { return signed_dot_avx2(iq4_weights_avx2(w.qs), loadu_256(x.qs)); }
MOE_DETAIL_AVX2 inline float vec_dot_q5_0_q8_0_avx2(const BlockQ5_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_BLOCKS_LOOP(block_dot_avx2);
}
MOE_DETAIL_AVX2 inline float vec_dot_iq4nl_q8_0_avx2(const BlockIQ4NL* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_BLOCKS_LOOP(block_dot_avx2);
}
// Q4_1/Q5_1 against Q8_1: d*d8 * Σ q*y + m * s (codes unsigned, so maddubs takes them directly).
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_affine_q8_1_avx2(const Block* w, const BlockQ8_1* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        __m256i q;
        if constexpr (std::is_same<Block, BlockQ4_1>::value) q = q4_0_nibbles_avx2(w[b].qs);
        else q = q5_codes_avx2(w[b].qs, w[b].qh);
        const __m256i qy = _mm256_madd_epi16(_mm256_maddubs_epi16(q, loadu_256(x[b].qs)), _mm256_set1_epi16(1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * _cvtsh_ss(x[b].d)), _mm256_cvtepi32_ps(qy), acc);
        offsets += _cvtsh_ss(w[b].m) * x[b].s;
    }
    return hsum_f32x8(acc) + offsets;
}
// MXFP4: IQ4_NL's kernel with the FP4 table and the E8M0 scale; two blocks per step.
MOE_DETAIL_AVX2 inline float vec_dot_mxfp4_q8_0_avx2(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n) {
    const __m256i table = _mm256_broadcastsi128_si256(loadu_128(kFp4Values));
    const int64_t nb = n / kQK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256i s0 = signed_dot_avx2(_mm256_shuffle_epi8(table, q4_0_nibbles_avx2(w[b].qs)), loadu_256(x[b].qs));
        const __m256i s1 = signed_dot_avx2(_mm256_shuffle_epi8(table, q4_0_nibbles_avx2(w[b + 1].qs)), loadu_256(x[b + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(e8m0_half(w[b].e) * _cvtsh_ss(x[b].d)), _mm256_cvtepi32_ps(s0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(e8m0_half(w[b + 1].e) * _cvtsh_ss(x[b + 1].d)), _mm256_cvtepi32_ps(s1), acc1);
    }
    for (; b < nb; ++b) {
        const __m256i s0 = signed_dot_avx2(_mm256_shuffle_epi8(table, q4_0_nibbles_avx2(w[b].qs)), loadu_256(x[b].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(e8m0_half(w[b].e) * _cvtsh_ss(x[b].d)), _mm256_cvtepi32_ps(s0), acc0);
    }
    return hsum_f32x8(_mm256_add_ps(acc0, acc1));
}
// NVFP4: each Q8_0 block meets two 16-element sub-blocks (8 code bytes each). Their nibbles are
// put in element order per 128-bit lane, the eight int32 sums split 4 + 4 between the two
// sub-blocks, and each half takes its own scale.
MOE_DETAIL_AVX2 inline float vec_dot_nvfp4_q8_0_avx2(const BlockNVFP4* w, const BlockQ8_0* x, int64_t n) {
    const __m256i table = _mm256_broadcastsi128_si256(loadu_128(kFp4Values));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQNV; ++b) {
        for (int t = 0; t < 2; ++t) {
            const __m128i q = loadu_128(w[b].qs + 16 * t);
            const __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
            const BlockQ8_0& a = x[2 * b + t];
            const __m256i s = signed_dot_avx2(_mm256_shuffle_epi8(table, codes), loadu_256(a.qs));
            const float d8 = _cvtsh_ss(a.d);
            const __m256 sc = _mm256_set_m128(_mm_set1_ps(ue4m3_half(w[b].d[2 * t + 1]) * d8), _mm_set1_ps(ue4m3_half(w[b].d[2 * t]) * d8));
            if (t == 0) acc0 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc0);
            else acc1 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc1);
        }
    }
    return hsum_f32x8(_mm256_add_ps(acc0, acc1));
}
// 32 three-bit codes (affine 3-bit chunk: 8 bytes of 2-bit fields, then a u32 of third bits).
MOE_DETAIL_AVX2 inline __m256i affine3_codes_avx2(const uint8_t* c) {
    uint64_t lo;
    uint32_t hi;
    std::memcpy(&lo, c, 8);
    std::memcpy(&hi, c + 8, 4);
    const __m256i low = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x((long long)lo), _mm256_set_epi64x(6, 4, 2, 0)), _mm256_set1_epi8(3));
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)hi),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_or_si256(low, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(4)));
}
// MLX affine against Q8_1: unsigned codes straight into maddubs; the bias term as bias * s.
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_affine_mlx_q8_1_avx2(const Block* w, const BlockQ8_1* x, int64_t n) {
    constexpr int kChunks = Block::kGroup / 32;
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0;
    for (int64_t b = 0; b < n / Block::kGroup; ++b) {
        const float s = _cvtsh_ss(w[b].scale), bias = _cvtsh_ss(w[b].bias);
        for (int c = 0; c < kChunks; ++c) {
            const uint8_t* p = w[b].qs + c * Block::kChunkBytes;
            const BlockQ8_1& a = x[b * kChunks + c];
            __m256i q;
            if constexpr (Block::kBits == 4) q = q4_0_nibbles_avx2(p);
            else q = affine3_codes_avx2(p);
            const __m256i qy = _mm256_madd_epi16(_mm256_maddubs_epi16(q, loadu_256(a.qs)), _mm256_set1_epi16(1));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s * _cvtsh_ss(a.d)), _mm256_cvtepi32_ps(qy), acc);
            offsets += bias * a.s;
        }
    }
    return hsum_f32x8(acc) + offsets;
}
// TQ3/TQ4 against the rotated Q8_0 row: codes through the int8 codebook (pshufb), signed dot per
// 32, the activation scales inside the group, the group's d once.
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_tq_q8_0_rot_avx2(const Block* w, const BlockQ8Rot* x, int64_t n) {
    const __m256i table = _mm256_broadcastsi128_si256(loadu_128(TqTraits<Block>::values));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQTQ; ++b) {
        __m256 part0 = _mm256_setzero_ps(), part1 = _mm256_setzero_ps();
        __m256i codes[4];
        if constexpr (std::is_same<Block, BlockTQ4>::value) {
            for (int k = 0; k < 4; ++k) codes[k] = q4_0_nibbles_avx2(w[b].qs + 16 * k);
        } else {
            const __m256i q = loadu_256(w[b].qs), m3 = _mm256_set1_epi8(3);
            const __m256i qh = _mm256_broadcastsi128_si256(loadu_128(w[b].qh));
            for (int k = 0; k < 4; ++k) {
                const __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, 2 * k), m3);
                const __m256i bit = _mm256_set_m128i(_mm_set1_epi8((char)(1 << (k + 4))), _mm_set1_epi8((char)(1 << k)));
                codes[k] = _mm256_or_si256(low, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(4)));
            }
        }
        for (int k = 0; k < 4; k += 2) {
            const __m256i s0 = signed_dot_avx2(_mm256_shuffle_epi8(table, codes[k]), loadu_256(x[b].qs + 32 * k));
            const __m256i s1 = signed_dot_avx2(_mm256_shuffle_epi8(table, codes[k + 1]), loadu_256(x[b].qs + 32 * k + 32));
            part0 = _mm256_fmadd_ps(_mm256_loadu_ps(x[b].d + 8 * k), _mm256_cvtepi32_ps(s0), part0);
            part1 = _mm256_fmadd_ps(_mm256_loadu_ps(x[b].d + 8 * k + 8), _mm256_cvtepi32_ps(s1), part1);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d)), _mm256_add_ps(part0, part1), acc);
    }
    return hsum_f32x8(acc);
}
// IQ4_XS: per 32-element sub-block the codebook lookup and a signed dot; maddubs' int16 pairs
// (<= 2*127*127) times the sub-block scale through madd (int32, < 2^22 per sub-block).
MOE_DETAIL_AVX2 inline float vec_dot_iq4xs_q8k_avx2(const BlockIQ4XS* w, const BlockQ8K* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        __m256i sum = _mm256_setzero_si256();
        for (int i = 0; i < 8; ++i) {
            const __m256i a = iq4_weights_avx2(w[b].qs + 16 * i), y = loadu_256(x[b].qs + 32 * i);
            const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(y, a));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_set1_epi16((short)iq4xs_scale(w[b], i))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum_f32x8(acc);
}

// IQ grid types: per group the four grid entries form 32 magnitude bytes, the 32 sign bits become
// +-1 bytes applied to y (|y| <= 127, so sign_epi8 cannot overflow), maddubs pairs (<= 2*62*127)
// and madd with the halves' scales give int32 sums, exact as in _ref.
MOE_DETAIL_AVX2 inline __m256i iq_sign_bytes_avx2(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i s = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(s, bit), bit), _mm256_set1_epi8(1));
}
MOE_DETAIL_AVX2 inline __m256i half_scales_avx2(const int* ls) { return _mm256_set_m128i(_mm_set1_epi16((short)ls[1]), _mm_set1_epi16((short)ls[0])); }
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_iqgrid_q8k_avx2(const Block* w, const BlockQ8K* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
            const IqGroup q = iq_group(w[b], g);
            const __m256i mag = _mm256_set_epi64x((long long)q.mag[3], (long long)q.mag[2], (long long)q.mag[1], (long long)q.mag[0]);
            const __m256i y = _mm256_sign_epi8(loadu_256(x[b].qs + 32 * g), iq_sign_bytes_avx2(q.signs));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(mag, y), half_scales_avx2(q.ls)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(iq_d(w[b]) * x[b].d), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum_f32x8(acc) / (float)iq_divisor<Block>();
}
// IQ1: grid * y through sign_epi8 (grid in -1..1), the +-1/8 shifts as sign_epi8(y, delta); the two
// pair sums combined as 8 * grid_pairs + delta_pairs (|.| <= 8*254 + 254, int16) before the scales.
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_iq1_q8k_avx2(const Block* w, const BlockQ8K* x, int64_t n) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
            const Iq1Group q = iq1_group(w[b], g);
            const __m256i grid = _mm256_set_epi64x((long long)q.grid[3], (long long)q.grid[2], (long long)q.grid[1], (long long)q.grid[0]);
            const __m256i delta = _mm256_set_epi64x((long long)repeat_byte(q.delta[3]), (long long)repeat_byte(q.delta[2]),
                                                    (long long)repeat_byte(q.delta[1]), (long long)repeat_byte(q.delta[0]));
            const __m256i y = loadu_256(x[b].qs + 32 * g);
            const __m256i gy = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, grid));
            const __m256i dy = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, delta));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(_mm256_slli_epi16(gy, 3), dy), half_scales_avx2(q.ls)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(iq_d(w[b]) * x[b].d), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum_f32x8(acc) * 0.125f;
}
// Q1_0: each 32 sign bits as +-1 bytes on y; Q2_0: the 2-bit codes q spread to bytes (each byte
// of a 32-bit lane shifted by 6 more than the one before), then Σ q * y - Σ y.
MOE_DETAIL_AVX2 inline float vec_dot_q1_0_q8_0_avx2(const BlockQ1_0* w, const BlockQ8_0* x, int64_t n) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQK1; ++b) {
        const float d = _cvtsh_ss(w[b].d);
        for (int k = 0; k < kQK1 / kQK; ++k) {
            const BlockQ8_0& y = x[b * (kQK1 / kQK) + k];
            const __m256i s = _mm256_sign_epi8(loadu_256(y.qs), iq_sign_bytes_avx2(~load_u32(w[b].qs + 4 * k)));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ones, s), _mm256_set1_epi16(1));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * _cvtsh_ss(y.d)), _mm256_cvtepi32_ps(p), acc);
        }
    }
    return hsum_f32x8(acc);
}
MOE_DETAIL_AVX2 inline float vec_dot_q2_0_q8_0_avx2(const BlockQ2_0* w, const BlockQ8_0* x, int64_t n) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQK2; ++b) {
        const float d = _cvtsh_ss(w[b].d);
        for (int k = 0; k < kQK2 / kQK; ++k) {
            const BlockQ8_0& y = x[b * (kQK2 / kQK) + k];
            uint64_t bits;
            std::memcpy(&bits, w[b].qs + 8 * k, 8);
            const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bits));
            const __m256i spread = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)), _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
            const __m256i q = _mm256_and_si256(spread, _mm256_set1_epi8(3));
            const __m256i yv = loadu_256(y.qs);
            const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, yv), _mm256_maddubs_epi16(ones, yv));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * _cvtsh_ss(y.d)), _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1))), acc);
        }
    }
    return hsum_f32x8(acc);
}

// Q4_K: per 32-byte chunk c the low nibbles are sub-block 2c, the high nibbles sub-block 2c+1.
// maddubs(q, y) gives int16 pairs (<= 2*31*127); madd with the sub-block scale sums them into int32
// (a super-block total stays below 256*31*127*63 < 2^26). The mins go through the bsums.
// Q5_K adds a 5th bit: element 64c+l takes bit 2c of qh[l], element 64c+32+l bit 2c+1; qh is
// shifted right by 2 per chunk so that the two bits needed are always bits 0 and 1.
template <typename Block>
MOE_DETAIL_AVX2 inline float vec_dot_q45k_q8k_avx2(const Block* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    alignas(32) int32_t sc2[8];
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sm = q4k_scales_mins(w[b].scales);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].dmin) * x[b].d), _mm256_cvtepi32_ps(q4k_mins_dot(sm, x[b].bsums)), acc_m);
        q4k_store_scale_pairs(sm, sc2);
        const uint8_t* q = w[b].qs;
        const int8_t* y = x[b].qs;
        __m256i qh = _mm256_setzero_si256();
        if constexpr (kHasFifthBit<Block>) qh = loadu_256(w[b].qh);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
            const __m256i q4 = loadu_256(q + 32 * c);
            __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            if constexpr (kHasFifthBit<Block>) {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
                qh = _mm256_srli_epi16(qh, 2);
            }
            const __m256i plo = _mm256_maddubs_epi16(lo, loadu_256(y + 64 * c));
            const __m256i phi = _mm256_maddubs_epi16(hi, loadu_256(y + 64 * c + 32));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(plo, broadcast_i32(sc2 + 2 * c)));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(phi, broadcast_i32(sc2 + 2 * c + 1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return hsum_f32x8(acc) - hsum_f32x8(acc_m);
}

// Q6_K: q = 6 unsigned bits (0..63) and the value is q - 32, so Σ s*(q-32)*y = Σ s*q*y - 32*Σ s*bsum
// (bsums of Q8_K are the 16-element sums). A register of 32 elements spans two 16-element
// sub-blocks: the low 128-bit lane gets one scale, the high lane the next.
MOE_DETAIL_AVX2 inline float vec_dot_q6k_q8k_avx2(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sc8 = loadu_128(w[b].scales);
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepi8_epi16(sc8));
        const int8_t* y = x[b].qs;
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            const __m128i s8 = h ? _mm_srli_si128(sc8, 8) : sc8;
            const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(s8));  // the half's 8 scales, both lanes
            const __m256i l0 = loadu_256(w[b].ql + 64 * h), l1 = loadu_256(w[b].ql + 64 * h + 32);
            const __m256i hb = loadu_256(w[b].qh + 32 * h);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
            const __m256i p0 = _mm256_maddubs_epi16(q0, loadu_256(y + 128 * h));
            const __m256i p1 = _mm256_maddubs_epi16(q1, loadu_256(y + 128 * h + 32));
            const __m256i p2 = _mm256_maddubs_epi16(q2, loadu_256(y + 128 * h + 64));
            const __m256i p3 = _mm256_maddubs_epi16(q3, loadu_256(y + 128 * h + 96));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(p0, _mm256_shuffle_epi8(scales, splat16_ctrl(0, 1))));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(p1, _mm256_shuffle_epi8(scales, splat16_ctrl(2, 3))));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(p2, _mm256_shuffle_epi8(scales, splat16_ctrl(4, 5))));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(p3, _mm256_shuffle_epi8(scales, splat16_ctrl(6, 7))));
        }
        const __m256i isum = _mm256_sub_epi32(_mm256_add_epi32(sum0, sum1), _mm256_slli_epi32(corr, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum_f32x8(acc);
}

// Q2_K / Q3_K: register j of half h holds elements 128h + 32j + 0..31 = sub-blocks 8h + 2j (low
// lane) and 8h + 2j + 1 (high lane), as in Q6_K. The codes are unsigned (Q3_K: q + 4 in 0..7, so
// Σ sc*q*y = Σ sc*(q+4)*y - 4 Σ sc*bsum), which is what maddubs wants.
MOE_DETAIL_AVX2 inline __m256i q23k_scaled_sums(const uint8_t* qs, const __m256i* high, const int8_t* y, __m128i sc16lo, __m128i sc16hi) {
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256i sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
        const __m256i bits = loadu_256(qs + 32 * h);
        const __m256i scales = _mm256_broadcastsi128_si256(h ? sc16hi : sc16lo);  // the half's 8 scales, both lanes
        for (int j = 0; j < 4; ++j) {
            __m256i q = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * j), m3);
            if (high) {  // bit 4h + j of each hmask byte to bit 2 of the code (one shift, one and)
                const int shift = 4 * h + j - 2;
                const __m256i moved = shift >= 0 ? _mm256_srli_epi16(*high, shift) : _mm256_slli_epi16(*high, -shift);
                q = _mm256_or_si256(q, _mm256_and_si256(moved, _mm256_set1_epi8(4)));
            }
            const __m256i p = _mm256_maddubs_epi16(q, loadu_256(y + 128 * h + 32 * j));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_shuffle_epi8(scales, splat16_ctrl(2 * j, 2 * j + 1))));
        }
    }
    return sum;
}
MOE_DETAIL_AVX2 inline float vec_dot_q2k_q8k_avx2(const BlockQ2K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    __m256 acc = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[b].scales));
        const __m128i scales = _mm_and_si128(sc8, _mm_set1_epi8(15));
        const __m128i mins = _mm_and_si128(_mm_srli_epi16(sc8, 4), _mm_set1_epi8(15));
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepu8_epi16(mins));
        const __m256i isum = q23k_scaled_sums(w[b].qs, nullptr, x[b].qs, _mm_cvtepu8_epi16(scales), _mm_cvtepu8_epi16(_mm_srli_si128(scales, 8)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(isum), acc);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].dmin) * x[b].d), _mm256_cvtepi32_ps(corr), acc_m);
    }
    return hsum_f32x8(acc) - hsum_f32x8(acc_m);
}
// q3k_scales16 in registers: 32-bit lanes (w0, w1, w0, w1) >> (0, 0, 4, 4) give the low nibbles,
// the high word >> (0, 2, 4, 6) the top bits (a scalar unpack stored and reloaded stalls on
// store forwarding: it made the Q3_K kernels 3x slower per block than Q2_K's).
MOE_DETAIL_AVX2 inline __m128i q3k_scales16_avx2(const uint8_t* packed) {
    uint64_t lo;
    uint32_t hi;
    std::memcpy(&lo, packed, 8);
    std::memcpy(&hi, packed + 8, 4);
    const __m128i l = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi64x((long long)lo), _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(15));
    const __m128i h = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)hi), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(l, _mm_slli_epi32(h, 4)), _mm_set1_epi8(32));
}
MOE_DETAIL_AVX2 inline float vec_dot_q3k_q8k_avx2(const BlockQ3K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sc8 = q3k_scales16_avx2(w[b].scales);
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepi8_epi16(sc8));
        const __m256i high = loadu_256(w[b].hmask);
        const __m256i sums = q23k_scaled_sums(w[b].qs, &high, x[b].qs, _mm_cvtepi8_epi16(sc8), _mm_cvtepi8_epi16(_mm_srli_si128(sc8, 8)));
        const __m256i isum = _mm256_sub_epi32(sums, _mm256_slli_epi32(corr, 2));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum_f32x8(acc);
}
// TQ2_0: Σ (t - 1) * y = Σ t*y - Σ bsums, Q2_K's layout with every scale 1.
MOE_DETAIL_AVX2 inline float vec_dot_tq2_q8k_avx2(const BlockTQ2* w, const BlockQ8K* x, int64_t n) {
    const __m128i ones = _mm_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const __m256i ysum = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_set1_epi16(1));
        const __m256i isum = _mm256_sub_epi32(q23k_scaled_sums(w[b].qs, nullptr, x[b].qs, ones, ones), ysum);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum_f32x8(acc);
}
// TQ1_0: trit n of byte q is ((q * 3^n mod 256) * 3) >> 8, computed in 16-bit lanes with a
// multiplier per lane (mul_lo for the bytes unpacklo takes, mul_hi for unpackhi), packed back.
MOE_DETAIL_AVX2 inline __m256i tq1_trits_avx2(__m256i bytes, __m256i mul_lo, __m256i mul_hi) {
    const __m256i zero = _mm256_setzero_si256(), low8 = _mm256_set1_epi16(0xFF), three = _mm256_set1_epi16(3);
    const __m256i lo = _mm256_and_si256(_mm256_mullo_epi16(_mm256_unpacklo_epi8(bytes, zero), mul_lo), low8);
    const __m256i hi = _mm256_and_si256(_mm256_mullo_epi16(_mm256_unpackhi_epi8(bytes, zero), mul_hi), low8);
    return _mm256_packus_epi16(_mm256_srli_epi16(_mm256_mullo_epi16(lo, three), 8), _mm256_srli_epi16(_mm256_mullo_epi16(hi, three), 8));
}
MOE_DETAIL_AVX2 inline float vec_dot_tq1_q8k_avx2(const BlockTQ1* w, const BlockQ8K* x, int64_t n) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const int8_t* y = x[b].qs;
        __m256i sum = _mm256_setzero_si256();
        const __m256i a = loadu_256(w[b].qs);
        short pow3 = 1;
        for (int k = 0; k < 5; ++k, pow3 = (short)(pow3 * 3)) {  // elements 32k + m
            const __m256i mul = _mm256_set1_epi16(pow3);
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(tq1_trits_avx2(a, mul, mul), loadu_256(y + 32 * k)), ones));
        }
        const __m256i bq = _mm256_broadcastsi128_si256(loadu_128(w[b].qs + 32));
        for (int k = 0; k < 4; k += 2) {  // elements 160 + 16k + m (low lane) and 160 + 16(k+1) + m
            const short p0 = k == 0 ? 1 : 9, p1 = k == 0 ? 3 : 27;
            const __m256i mul = _mm256_setr_epi16(p0, p0, p0, p0, p0, p0, p0, p0, p1, p1, p1, p1, p1, p1, p1, p1);
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(tq1_trits_avx2(bq, mul, mul), loadu_256(y + 160 + 16 * k)), ones));
        }
        // Elements 224..239 (qs[32..47], trit 4) and 240..255 (qh[m], trit n at 240 + 4n + m).
        uint32_t qh;
        std::memcpy(&qh, w[b].qh, 4);
        const __m128i spread = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)qh), _mm_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3));
        const __m256i last = _mm256_inserti128_si256(_mm256_castsi128_si256(loadu_128(w[b].qs + 32)), spread, 1);
        const __m256i mul_lo = _mm256_setr_epi16(81, 81, 81, 81, 81, 81, 81, 81, 1, 1, 1, 1, 3, 3, 3, 3);
        const __m256i mul_hi = _mm256_setr_epi16(81, 81, 81, 81, 81, 81, 81, 81, 9, 9, 9, 9, 27, 27, 27, 27);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(tq1_trits_avx2(last, mul_lo, mul_hi), loadu_256(y + 224)), ones));
        const __m256i isum = _mm256_sub_epi32(sum, _mm256_madd_epi16(loadu_256(x[b].bsums), ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum_f32x8(acc);
}

//---- activation quantizers (bit-identical to quantize_act_ref: quantize_act_q8_0_ref, quantize_row_q8k_ref) ----

// Four vectors of 8 int32 (each in [-128, 127]) to 32 int8 in order.
MOE_DETAIL_AVX2 inline __m256i pack_i32x32_to_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);  // in-lane packs interleave
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Q8_0 activations: id = 127/amax, q = nearbyint(x * id); cvtps rounds in the MXCSR mode, which is
// the mode nearbyint uses (ties to even by default). |x * id| <= 127 up to one rounding, so no clamp.
MOE_DETAIL_AVX2 inline void quantize_act_q8_0_avx2(BlockQ8_0* y, const float* x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        // maxps returns its second operand when either is NaN: with the running max second, a NaN
        // input is skipped as std::max skips it in the _ref. (Max is exact, so order is free.)
        __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_setzero_ps());
        m = _mm256_max_ps(_mm256_andnot_ps(sign, v1), m);
        m = _mm256_max_ps(_mm256_andnot_ps(sign, v2), m);
        m = _mm256_max_ps(_mm256_andnot_ps(sign, v3), m);
        const float amax = hmax_f32x8(m);
        const float id = amax != 0 ? 127.f / amax : 0.f;  // same expressions as the _ref
        y[b].d = f32_to_fp16(amax / 127.f);
        const __m256 idv = _mm256_set1_ps(id);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs), pack_i32x32_to_i8(i0, i1, i2, i3));
    }
}

// Q8_K: vmax is the signed value of the first element with the largest |x| (as the _ref scans),
// q = min(127, nearbyint(iscale * x)) with cvtps (MXCSR rounding = nearbyint's current mode).
MOE_DETAIL_AVX2 inline void quantize_row_q8k_avx2(BlockQ8K* y, const float* x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i k127 = _mm256_set1_epi32(127);
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < kQKK; j += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), m);  // NaN skipped, as in the _ref
        const float amax = hmax_f32x8(m);
        if (amax == 0) { std::memset(&y[b], 0, sizeof y[b]); continue; }
        const __m256 amaxv = _mm256_set1_ps(amax);
        int first = 0;
        for (int j = 0; j < kQKK; j += 8) {
            const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), amaxv, _CMP_EQ_OQ));
            if (mask) { first = j + __builtin_ctz((unsigned)mask); break; }
        }
        const float iscale = -127.f / x[first];
        const __m256 isv = _mm256_set1_ps(iscale);
        for (int j = 0; j < kQKK; j += 64) {  // 64 elements = 4 bsums per step
            __m256i v[8];
            for (int k = 0; k < 8; ++k) v[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(isv, _mm256_loadu_ps(x + j + 8 * k))), k127);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + j), pack_i32x32_to_i8(v[0], v[1], v[2], v[3]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + j + 32), pack_i32x32_to_i8(v[4], v[5], v[6], v[7]));
            // Two rounds of hadd leave, per 128-bit lane, half of each 16-element sum; add the lanes.
            const __m256i h0 = _mm256_hadd_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
            const __m256i h1 = _mm256_hadd_epi32(_mm256_add_epi32(v[4], v[5]), _mm256_add_epi32(v[6], v[7]));
            const __m256i h = _mm256_hadd_epi32(h0, h1);
            const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(y[b].bsums + j / 16), _mm_packs_epi32(s, s));
        }
        y[b].d = 1 / iscale;
    }
}

//-----------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ): 512-bit registers hold two Q8_0 blocks or one 64-element Q8_K chunk.
// With VNNI, vpdpbusd replaces maddubs + madd, and vpdpwssd folds the scale multiply into the add.
//-----------------------------------------------------------------------------

MOE_DETAIL_AVX512 inline __m512i loadu_512(const void* p) { return _mm512_loadu_si512(p); }

// [lo, hi] from two 256-bit halves. (A masked broadcast rather than _mm512_inserti64x4, whose
// undefined pass-through operand trips GCC 12's -Wmaybe-uninitialized.)
MOE_DETAIL_AVX512 inline __m512i concat_256(__m256i lo, __m256i hi) {
    return _mm512_mask_broadcast_i64x4(_mm512_castsi256_si512(lo), 0xF0, hi);
}

// Two consecutive Q8_0 blocks' quants (34-byte stride) as one register.
MOE_DETAIL_AVX512 inline __m512i q8_0_load2(const BlockQ8_0* x) {
    return concat_256(loadu_256(x[0].qs), loadu_256(x[1].qs));
}

// Two consecutive Q4_0 blocks as 64 unsigned nibbles in element order: each block's 16 bytes go to
// two 128-bit lanes; the second lane of each pair is shifted right by 4 (64-bit shifts leak bits
// across bytes only above bit 3, which the mask clears).
MOE_DETAIL_AVX512 inline __m512i q4_0_nibbles2_avx512(const BlockQ4_0* w) {
    const __m256i a = _mm256_broadcastsi128_si256(loadu_128(w[0].qs)), b = _mm256_broadcastsi128_si256(loadu_128(w[1].qs));
    const __m512i ab = concat_256(a, b);
    return _mm512_and_si512(_mm512_srlv_epi64(ab, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)), _mm512_set1_epi8(0x0F));
}

// d_w * d_x of blocks b..b+3 (Q4_0 or Q8_0 weights, Q8_0 activations). Block sizes of 18 and 34
// bytes put the four fp16 scales of a row within 64 or 128 bytes: word permutes pick them out of
// those loads and one conversion handles all eight (cheaper than eight scalar inserts).
template <typename W>
MOE_DETAIL_AVX512 inline __m128 scales4_avx512(const W* w, const BlockQ8_0* x) {
    constexpr short ws = (short)(sizeof(W) / 2), xs = (short)(sizeof(BlockQ8_0) / 2);  // strides in words
    const __m512i xi = _mm512_zextsi128_si512(_mm_setr_epi16(0, xs, 2 * xs, 3 * xs, 0, 0, 0, 0));
    const __m512i wi = _mm512_zextsi128_si512(_mm_setr_epi16(0, 0, 0, 0, 0, ws, 2 * ws, 3 * ws));
    const char* xp = reinterpret_cast<const char*>(x);
    const char* wp = reinterpret_cast<const char*>(w);
    const __m512i xv = _mm512_permutex2var_epi16(loadu_512(xp), xi, loadu_512(xp + 64));
    __m512i wv;
    if constexpr (3 * sizeof(W) + 2 <= 64) wv = _mm512_permutexvar_epi16(wi, loadu_512(wp));  // never reads past block b+3
    else wv = _mm512_permutex2var_epi16(loadu_512(wp), wi, loadu_512(wp + 64));
    const __m256 f = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_mask_blend_epi16(0xF0, xv, wv)));  // x0..x3, w0..w3
    return _mm_mul_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
}

// Lanes 0-7 = s[k], lanes 8-15 = s[k+1].
MOE_DETAIL_AVX512 inline __m512 scale_pair_avx512(__m128 s, int k) {
    return _mm512_permutexvar_ps(_mm512_set_epi32(k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k, k, k, k, k, k, k, k),
                                 _mm512_castps128_ps512(s));
}

// The AVX-512 and VNNI kernels are written out separately (not as one template) because each must
// be compiled for exactly its own target: a compiler may fuse madd + add into vpdpwssd by itself
// when VNNI is enabled, which would fault on an AVX-512 CPU without VNNI.

// Blocks b, b+1 of Q4_0 x Q8_0 as 16 int32 lanes: Σ nib*y - Σ 8*y.
MOE_DETAIL_AVX512 inline __m512i q4_0_pair_dot_avx512(const BlockQ4_0* w, const BlockQ8_0* x) {
    const __m512i y = q8_0_load2(x);
    const __m512i p = _mm512_sub_epi16(_mm512_maddubs_epi16(q4_0_nibbles2_avx512(w), y), _mm512_maddubs_epi16(_mm512_set1_epi8(8), y));
    return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
}
MOE_DETAIL_AVX512VNNI inline __m512i q4_0_pair_dot_avx512vnni(const BlockQ4_0* w, const BlockQ8_0* x) {
    const __m512i y = q8_0_load2(x), zero = _mm512_setzero_si512();
    return _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, q4_0_nibbles2_avx512(w), y), _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), y));
}

// Q8_0 x Q8_0 with VNNI stays 256-bit: vpdpbusd replaces maddubs + madd, and vpsignb (which
// has no 512-bit form) moves w's sign onto y. Measured on Sapphire Rapids this beats a 512-bit
// version, whose block-pair loads and masked negate cost more shuffle-port work than they save.
MOE_DETAIL_AVX512VNNI inline __m256i block_dot_avx512vnni(const BlockQ8_0& w, const BlockQ8_0& x) {
    const __m256i a = loadu_256(w.qs), y = loadu_256(x.qs);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(a), _mm256_sign_epi8(y, a));
}
MOE_DETAIL_AVX512VNNI inline float vec_dot_q8_0_q8_0_avx512vnni(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_BLOCKS_LOOP(block_dot_avx512vnni);
}
#undef MOE_DETAIL_Q8_0_BLOCKS_LOOP

// Loop shape shared by the two Q4_0 kernels below: two block pairs per step into two accumulators,
// then the last blocks one by one through the AVX2 block dot.
#define MOE_DETAIL_Q8_0_PAIRS_LOOP(PAIR_DOT)                                                      \
    const int64_t nb = n / kQK;                                                                    \
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();                                 \
    int64_t b = 0;                                                                                 \
    for (; b + 4 <= nb; b += 4) {                                                                  \
        const __m128 s = scales4_avx512(w + b, x + b);                                             \
        acc0 = _mm512_fmadd_ps(scale_pair_avx512(s, 0), _mm512_cvtepi32_ps(PAIR_DOT(w + b, x + b)), acc0); \
        acc1 = _mm512_fmadd_ps(scale_pair_avx512(s, 2), _mm512_cvtepi32_ps(PAIR_DOT(w + b + 2, x + b + 2)), acc1); \
    }                                                                                              \
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));                                   \
    for (; b < nb; ++b) sum += fp16_mul(w[b].d, x[b].d) * (float)hsum_i32x8(block_dot_avx2(w[b], x[b])); \
    return sum

MOE_DETAIL_AVX512 inline float vec_dot_q4_0_q8_0_avx512(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_PAIRS_LOOP(q4_0_pair_dot_avx512);
}
MOE_DETAIL_AVX512VNNI inline float vec_dot_q4_0_q8_0_avx512vnni(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_PAIRS_LOOP(q4_0_pair_dot_avx512vnni);
}
#undef MOE_DETAIL_Q8_0_PAIRS_LOOP


// Q4_K with 512-bit registers: chunk c (32 bytes) is broadcast to both halves and the upper half
// shifted right by 4, so one register holds sub-blocks 2c and 2c+1 in the activation's order.
MOE_DETAIL_AVX512 inline __m512i q4k_chunk_avx512(const uint8_t* qs) {
    const __m512i q = _mm512_broadcast_i64x4(loadu_256(qs));
    return _mm512_and_si512(_mm512_srlv_epi64(q, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
}
// Scales of sub-blocks 2c (lanes 0-7) and 2c+1 (lanes 8-15) from the 8 scales in int32 lanes 0-7.
MOE_DETAIL_AVX512 inline __m512i q4k_chunk_scales(__m512i scales, int c) {
    const int a = 2 * c, b = 2 * c + 1;
    return _mm512_permutexvar_epi32(_mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a), scales);
}

// maddubs gives int16 pairs, madd multiplies by the scale (held in both 16-bit halves of a lane).
MOE_DETAIL_AVX512 inline float vec_dot_q4k_q8k_avx512(const BlockQ4K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sm = q4k_scales_mins(w[b].scales);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].dmin) * x[b].d), _mm256_cvtepi32_ps(q4k_mins_dot(sm, x[b].bsums)), acc_m);
        const __m256i sc32 = _mm256_cvtepu8_epi32(sm);
        const __m512i scales = _mm512_castsi256_si512(_mm256_or_si256(sc32, _mm256_slli_epi32(sc32, 16)));
        __m512i sum0 = _mm512_setzero_si512(), sum1 = _mm512_setzero_si512();
        for (int c = 0; c < 4; c += 2) {
            const __m512i p0 = _mm512_maddubs_epi16(q4k_chunk_avx512(w[b].qs + 32 * c), loadu_512(x[b].qs + 64 * c));
            const __m512i p1 = _mm512_maddubs_epi16(q4k_chunk_avx512(w[b].qs + 32 * c + 32), loadu_512(x[b].qs + 64 * c + 64));
            sum0 = _mm512_add_epi32(sum0, _mm512_madd_epi16(p0, q4k_chunk_scales(scales, c)));
            sum1 = _mm512_add_epi32(sum1, _mm512_madd_epi16(p1, q4k_chunk_scales(scales, c + 1)));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(_mm512_add_epi32(sum0, sum1)), acc);
    }
    return _mm512_reduce_add_ps(acc) - hsum_f32x8(acc_m);
}

// VNNI: vpdpbusd gives 16 int32 lanes (each <= 4*15*127, so it fits int16) and vpdpwssd multiplies
// them by the scale held in the low 16 bits of each lane (high bits 0) and accumulates.
MOE_DETAIL_AVX512VNNI inline float vec_dot_q4k_q8k_avx512vnni(const BlockQ4K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sm = q4k_scales_mins(w[b].scales);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].dmin) * x[b].d), _mm256_cvtepi32_ps(q4k_mins_dot(sm, x[b].bsums)), acc_m);
        const __m512i scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi32(sm));
        __m512i sum0 = zero, sum1 = zero;
        for (int c = 0; c < 4; c += 2) {
            const __m512i d0 = _mm512_dpbusd_epi32(zero, q4k_chunk_avx512(w[b].qs + 32 * c), loadu_512(x[b].qs + 64 * c));
            const __m512i d1 = _mm512_dpbusd_epi32(zero, q4k_chunk_avx512(w[b].qs + 32 * c + 32), loadu_512(x[b].qs + 64 * c + 64));
            sum0 = _mm512_dpwssd_epi32(sum0, d0, q4k_chunk_scales(scales, c));
            sum1 = _mm512_dpwssd_epi32(sum1, d1, q4k_chunk_scales(scales, c + 1));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(_mm512_add_epi32(sum0, sum1)), acc);
    }
    return _mm512_reduce_add_ps(acc) - hsum_f32x8(acc_m);
}

// Q6_K with 512-bit registers: ql[64h..64h+63] holds the low nibbles of elements 128h+0..63 (low
// halves of the bytes) and 128h+64..127 (high halves); qh[32h..] is broadcast and shifted per
// 256-bit half so that bits 4-5 of each byte are the element's two high bits (64-bit shifts leak
// across bytes only into bits the 0x30 mask clears).
MOE_DETAIL_AVX512 inline void q6k_unpack_half_avx512(const BlockQ6K& w, int h, __m512i* q01, __m512i* q23) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i l = loadu_512(w.ql + 64 * h);
    const __m512i hb = _mm512_broadcast_i64x4(loadu_256(w.qh + 32 * h));
    *q01 = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_and_si512(_mm512_sllv_epi64(hb, _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4)), m30));
    *q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(l, 4), m4), _mm512_and_si512(_mm512_srlv_epi64(hb, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)), m30));
}
// A 64-element register spans four 16-element sub-blocks s..s+3: int32 lanes 4i..4i+3 get scale s+i.
MOE_DETAIL_AVX512 inline __m512i q6k_quad_scales(__m512i scales, int s) {
    return _mm512_permutexvar_epi32(_mm512_set_epi32(s + 3, s + 3, s + 3, s + 3, s + 2, s + 2, s + 2, s + 2,
                                                     s + 1, s + 1, s + 1, s + 1, s, s, s, s), scales);
}

MOE_DETAIL_AVX512 inline float vec_dot_q6k_q8k_avx512(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sc8 = loadu_128(w[b].scales);
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepi8_epi16(sc8));
        const __m512i s32 = _mm512_cvtepi8_epi32(sc8);  // scale in both 16-bit halves of each lane
        const __m512i scales = _mm512_or_si512(_mm512_and_si512(s32, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s32, 16));
        __m512i sum0 = _mm512_setzero_si512(), sum1 = _mm512_setzero_si512();
        for (int h = 0; h < 2; ++h) {
            __m512i q01, q23;
            q6k_unpack_half_avx512(w[b], h, &q01, &q23);
            const __m512i p01 = _mm512_maddubs_epi16(q01, loadu_512(x[b].qs + 128 * h));
            const __m512i p23 = _mm512_maddubs_epi16(q23, loadu_512(x[b].qs + 128 * h + 64));
            sum0 = _mm512_add_epi32(sum0, _mm512_madd_epi16(p01, q6k_quad_scales(scales, 8 * h)));
            sum1 = _mm512_add_epi32(sum1, _mm512_madd_epi16(p23, q6k_quad_scales(scales, 8 * h + 4)));
        }
        const __m512i isum = _mm512_sub_epi32(_mm512_add_epi32(sum0, sum1), _mm512_zextsi256_si512(_mm256_slli_epi32(corr, 5)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(isum), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// Q2_K / Q3_K: one register holds elements 128h + 64p + 0..63 (j = 2p in the low 256 bits, 2p + 1
// in the high), i.e. sub-blocks 8h + 4p + lane; per-lane scales as for Q6_K. A 64-bit variable
// shift moves bits 2j..2j+1 down; what it drags in from the next byte is masked off.
template <bool kHigh>
MOE_DETAIL_AVX512 inline __m512i q23k_scaled_sums_avx512(const uint8_t* qs, const uint8_t* hmask, const int8_t* y, __m512i scales) {
    const __m512i m3 = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
    __m512i sum = _mm512_setzero_si512();
    const __m512i high = kHigh ? _mm512_broadcast_i64x4(loadu_256(hmask)) : _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
        const __m512i bits = _mm512_broadcast_i64x4(loadu_256(qs + 32 * h));
        for (int p = 0; p < 2; ++p) {
            const long long lo = 4 * p, hi = 4 * p + 2;
            __m512i q = _mm512_and_si512(_mm512_srlv_epi64(bits, _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo)), m3);
            if (kHigh) {  // bit 4h + j of hmask[l] becomes bit 2 of the code
                const long long hl = 4 * h + 2 * p, hh = 4 * h + 2 * p + 1;
                const __m512i hb = _mm512_and_si512(_mm512_srlv_epi64(high, _mm512_set_epi64(hh, hh, hh, hh, hl, hl, hl, hl)), one);
                q = _mm512_or_si512(q, _mm512_slli_epi64(hb, 2));
            }
            const __m512i prod = _mm512_maddubs_epi16(q, loadu_512(y + 128 * h + 64 * p));
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(prod, q6k_quad_scales(scales, 8 * h + 4 * p)));
        }
    }
    return sum;
}
// Sixteen 8-bit scales as int16 pairs per 32-bit lane (the layout q6k_quad_scales permutes).
MOE_DETAIL_AVX512 inline __m512i scale_pairs_avx512(__m512i s32) {
    return _mm512_or_si512(_mm512_and_si512(s32, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s32, 16));
}
MOE_DETAIL_AVX512 inline float vec_dot_q2k_q8k_avx512(const BlockQ2K* w, const BlockQ8K* x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const __m128i sc8 = loadu_128(w[b].scales);
        const __m128i scales = _mm_and_si128(sc8, _mm_set1_epi8(15));
        const __m128i mins = _mm_and_si128(_mm_srli_epi16(sc8, 4), _mm_set1_epi8(15));
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepu8_epi16(mins));
        const __m512i isum = q23k_scaled_sums_avx512<false>(w[b].qs, nullptr, x[b].qs, scale_pairs_avx512(_mm512_cvtepu8_epi32(scales)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(isum), acc);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].dmin) * x[b].d), _mm256_cvtepi32_ps(corr), acc_m);
    }
    return _mm512_reduce_add_ps(acc) - hsum_f32x8(acc_m);
}
MOE_DETAIL_AVX512 inline float vec_dot_q3k_q8k_avx512(const BlockQ3K* w, const BlockQ8K* x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / kQKK; ++b) {
        const __m128i sc8 = q3k_scales16_avx2(w[b].scales);
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepi8_epi16(sc8));
        const __m512i sums = q23k_scaled_sums_avx512<true>(w[b].qs, w[b].hmask, x[b].qs, scale_pairs_avx512(_mm512_cvtepi8_epi32(sc8)));
        const __m512i isum = _mm512_sub_epi32(sums, _mm512_zextsi256_si512(_mm256_slli_epi32(corr, 2)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(isum), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// VNNI: dpbusd lanes are sums of 4 products <= 4*63*127 = 32004, so they fit int16 for vpdpwssd.
MOE_DETAIL_AVX512VNNI inline float vec_dot_q6k_q8k_avx512vnni(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    const int64_t nb = n / kQKK;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m128i sc8 = loadu_128(w[b].scales);
        const __m256i corr = _mm256_madd_epi16(loadu_256(x[b].bsums), _mm256_cvtepi8_epi16(sc8));
        const __m512i scales = _mm512_and_si512(_mm512_cvtepi8_epi32(sc8), _mm512_set1_epi32(0xFFFF));  // low 16 bits only
        __m512i sum0 = zero, sum1 = zero;
        for (int h = 0; h < 2; ++h) {
            __m512i q01, q23;
            q6k_unpack_half_avx512(w[b], h, &q01, &q23);
            const __m512i d01 = _mm512_dpbusd_epi32(zero, q01, loadu_512(x[b].qs + 128 * h));
            const __m512i d23 = _mm512_dpbusd_epi32(zero, q23, loadu_512(x[b].qs + 128 * h + 64));
            sum0 = _mm512_dpwssd_epi32(sum0, d01, q6k_quad_scales(scales, 8 * h));
            sum1 = _mm512_dpwssd_epi32(sum1, d23, q6k_quad_scales(scales, 8 * h + 4));
        }
        const __m512i isum = _mm512_sub_epi32(_mm512_add_epi32(sum0, sum1), _mm512_zextsi256_si512(_mm256_slli_epi32(corr, 5)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d) * x[b].d), _mm512_cvtepi32_ps(isum), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// ---- The seed formats with VNNI: 64 codes per register into vpdpbusd ----
// vpdpbusd multiplies unsigned by signed bytes, so a signed codebook goes in offset by 128 (the
// pshufb table holds c + 128) and 128 * Σy comes off again: per lane through one more vpdpbusd
// (FP4), or once per group from the activation's stored sums (TQ). Every lane sum stays exact
// (|Σ| < 4 * 255 * 128). A row's last odd chunk or group runs through the AVX2 kernel.

// Chunks a and b (16 bytes of Q4_0-ordered nibbles each) as 64 codes in element order.
MOE_DETAIL_AVX512 inline __m512i nibbles2_avx512(const uint8_t* a, const uint8_t* b) {
    const __m512i ab = concat_256(_mm256_broadcastsi128_si256(loadu_128(a)), _mm256_broadcastsi128_si256(loadu_128(b)));
    return _mm512_and_si512(_mm512_srlv_epi64(ab, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)), _mm512_set1_epi8(0x0F));
}
// A 16-entry int8 codebook as the unsigned bytes c + 128, in all four lanes.
MOE_DETAIL_AVX512 inline __m512i offset_table_avx512(const int8_t* values) {
    return _mm512_broadcast_i32x4(_mm_xor_si128(loadu_128(values), _mm_set1_epi8((char)0x80)));
}
// Σ c * y per 4 bytes for offset codebook bytes u = c + 128.
MOE_DETAIL_AVX512VNNI inline __m512i offset_dot_avx512vnni(__m512i u, __m512i y) {
    const __m512i zero = _mm512_setzero_si512();
    return _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, u, y), _mm512_dpbusd_epi32(zero, _mm512_set1_epi8((char)0x80), y));
}
// Lanes 0-7 = a, lanes 8-15 = b.
MOE_DETAIL_AVX512 inline __m512 halves_ps_avx512(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

// Four E8M0 scales at half value, as e8m0_half: 2^(e - 128) is the float with exponent field e - 1,
// e = 0 and 1 are the subnormals 2^-128 and 2^-127.
MOE_DETAIL_AVX512 inline __m128 e8m0_half4(__m128i e) {
    const __m128i normal = _mm_slli_epi32(_mm_sub_epi32(e, _mm_set1_epi32(1)), 23);
    const __m128i subnormal = _mm_sllv_epi32(_mm_set1_epi32(0x00200000), e);
    return _mm_castsi128_ps(_mm_blendv_epi8(normal, subnormal, _mm_cmplt_epi32(e, _mm_set1_epi32(2))));
}
// MXFP4: four blocks per step (two registers), the activation scales picked out of the 34-byte
// blocks as in scales4_avx512.
MOE_DETAIL_AVX512VNNI inline float vec_dot_mxfp4_q8_0_avx512vnni(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n) {
    const __m512i table = offset_table_avx512(kFp4Values);
    constexpr short xs = (short)(sizeof(BlockQ8_0) / 2);
    const __m512i pick = _mm512_zextsi128_si512(_mm_setr_epi16(0, xs, 2 * xs, 3 * xs, 0, 0, 0, 0));
    const int64_t nb = n / kQK;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const char* xp = reinterpret_cast<const char*>(x + b);
        const __m128 xd = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(loadu_512(xp), pick, loadu_512(xp + 64))));
        const __m128 s = _mm_mul_ps(xd, e8m0_half4(_mm_setr_epi32(w[b].e, w[b + 1].e, w[b + 2].e, w[b + 3].e)));
        const __m512i u0 = _mm512_shuffle_epi8(table, nibbles2_avx512(w[b].qs, w[b + 1].qs));
        const __m512i u1 = _mm512_shuffle_epi8(table, nibbles2_avx512(w[b + 2].qs, w[b + 3].qs));
        acc0 = _mm512_fmadd_ps(scale_pair_avx512(s, 0), _mm512_cvtepi32_ps(offset_dot_avx512vnni(u0, q8_0_load2(x + b))), acc0);
        acc1 = _mm512_fmadd_ps(scale_pair_avx512(s, 2), _mm512_cvtepi32_ps(offset_dot_avx512vnni(u1, q8_0_load2(x + b + 2))), acc1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if (b < nb) sum += vec_dot_mxfp4_q8_0_avx2(w + b, x + b, (nb - b) * kQK);
    return sum;
}

// 4-bit blocks x q8_0_split, four blocks per step: the blocks' 16-byte code runs side by side in
// one register, low nibbles against lo and high nibbles against hi (one vpdpbusd each, no
// shuffles to element order), the offset as offset x the stored negated code sums (the
// accumulator's start: a shift), the scales per lane. Codebook types look their nibbles up in a
// table of value + 128.
template <typename Block>
MOE_DETAIL_AVX512 inline __m512i nib4_codes4_avx512(const Block* w) {
    __m512i q = _mm512_zextsi128_si512(loadu_128(w[0].qs));
    q = _mm512_inserti32x4(q, loadu_128(w[1].qs), 1);
    q = _mm512_inserti32x4(q, loadu_128(w[2].qs), 2);
    return _mm512_inserti32x4(q, loadu_128(w[3].qs), 3);
}
// The scales of four consecutive blocks, each in four lanes. fp16 d at the block start (Q4_0,
// IQ4_NL: one 64-byte load reaches the fourth at bytes 54-55); MXFP4's E8M0 bytes at 0, 17, 34, 51
// come from the words holding them (8 and 25 in their high bytes).
template <typename Block>
MOE_DETAIL_AVX512 inline __m512 nib4_scales4_avx512(const Block* w) {
    constexpr short s = (short)(sizeof(Block) / 2);
    static_assert(3 * sizeof(Block) + 2 <= 64 && sizeof(Block) % 2 == 0, "fp16 scales of 4 blocks within 64 bytes");
    const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3 * s, 3 * s, 3 * s, 3 * s, 2 * s, 2 * s, 2 * s,
                                         2 * s, s, s, s, s, 0, 0, 0, 0);
    return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx, loadu_512(w))));
}
template <>
MOE_DETAIL_AVX512 inline __m512 nib4_scales4_avx512<BlockMXFP4>(const BlockMXFP4* w) {
    const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 25, 25, 25, 17, 17, 17, 17, 8, 8, 8, 8, 0, 0, 0, 0);
    const __m512i shift = _mm512_set_epi32(8, 8, 8, 8, 0, 0, 0, 0, 8, 8, 8, 8, 0, 0, 0, 0);
    const __m512i words = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx, loadu_512(w))));
    const __m512i e = _mm512_and_si512(_mm512_srlv_epi32(words, shift), _mm512_set1_epi32(0xFF));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __m512i subnormal = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), normal, subnormal));
}
template <typename Block, int kOffsetShift>
MOE_DETAIL_AVX512VNNI inline __m512 nib4_split_group_avx512vnni(const Block* w, const BlockQ8Split& x, __m512i table, __m512 acc) {
    const __m512i q = nib4_codes4_avx512(w), m4 = _mm512_set1_epi8(0x0F);
    __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
    if constexpr (kOffsetShift == 7) {
        lo = _mm512_shuffle_epi8(table, lo);
        hi = _mm512_shuffle_epi8(table, hi);
    }
    __m512i s = _mm512_slli_epi32(loadu_512(x.neg_sum), kOffsetShift);
    s = _mm512_dpbusd_epi32(s, lo, loadu_512(x.lo));
    s = _mm512_dpbusd_epi32(s, hi, loadu_512(x.hi));
    return _mm512_fmadd_ps(_mm512_mul_ps(nib4_scales4_avx512(w), _mm512_loadu_ps(x.d)), _mm512_cvtepi32_ps(s), acc);
}
template <typename Block, int kOffsetShift, const int8_t* kTable>
MOE_DETAIL_AVX512VNNI inline float vec_dot_nib4_q8_split_avx512vnni(const Block* w, const BlockQ8Split* x, int64_t n) {
    __m512i table = _mm512_setzero_si512();
    if constexpr (kOffsetShift == 7) table = offset_table_avx512(kTable);
    const int64_t ng = n / 128;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= ng; g += 2) {
        acc0 = nib4_split_group_avx512vnni<Block, kOffsetShift>(w + 4 * g, x[g], table, acc0);
        acc1 = nib4_split_group_avx512vnni<Block, kOffsetShift>(w + 4 * g + 4, x[g + 1], table, acc1);
    }
    if (g < ng) acc0 = nib4_split_group_avx512vnni<Block, kOffsetShift>(w + 4 * g, x[g], table, acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
MOE_DETAIL_AVX512VNNI inline float vec_dot_q4_0_q8_split_avx512vnni(const BlockQ4_0* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_avx512vnni<BlockQ4_0, 3, nullptr>(w, x, n);
}
MOE_DETAIL_AVX512VNNI inline float vec_dot_iq4nl_q8_split_avx512vnni(const BlockIQ4NL* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_avx512vnni<BlockIQ4NL, 7, kIq4Values>(w, x, n);
}
MOE_DETAIL_AVX512VNNI inline float vec_dot_mxfp4_q8_split_avx512vnni(const BlockMXFP4* w, const BlockQ8Split* x, int64_t n) {
    return vec_dot_nib4_q8_split_avx512vnni<BlockMXFP4, 7, kFp4Values>(w, x, n);
}

// NVFP4: one block (four sub-blocks of 16) per register. Sub-block s's 8 code bytes go to lane s
// twice, the copy shifted by 4 holds elements 8..15; int32 lane i covers elements 4i..4i+3, so it
// takes sub-block scale i / 4 and activation scale i / 8.
MOE_DETAIL_AVX512VNNI inline float vec_dot_nvfp4_q8_0_avx512vnni(const BlockNVFP4* w, const BlockQ8_0* x, int64_t n) {
    const __m512i table = offset_table_avx512(kFp4Values);
    const __m512i spread = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), shifts = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i lane_sub = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / kQNV; ++b) {
        const __m512i q = _mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(loadu_256(w[b].qs)));
        const __m512i codes = _mm512_and_si512(_mm512_srlv_epi64(q, shifts), _mm512_set1_epi8(0x0F));
        const __m512i dot = offset_dot_avx512vnni(_mm512_shuffle_epi8(table, codes), q8_0_load2(x + 2 * b));
        const float d0 = _cvtsh_ss(x[2 * b].d), d1 = _cvtsh_ss(x[2 * b + 1].d);
        const __m128 s = _mm_setr_ps(ue4m3_half(w[b].d[0]) * d0, ue4m3_half(w[b].d[1]) * d0, ue4m3_half(w[b].d[2]) * d1,
                                     ue4m3_half(w[b].d[3]) * d1);
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane_sub, _mm512_castps128_ps512(s)), _mm512_cvtepi32_ps(dot), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// TQ3 codes of chunks k and k + 1 (k even): the 2-bit fields of both chunks from one broadcast of
// qs (shifted by 2k and 2k + 2), the third bits tested in qh (bit k + 4 * (j / 16) of byte j % 16).
MOE_DETAIL_AVX512 inline __m512i tq_codes2_avx512(const BlockTQ3& w, int k) {
    const __m512i q = _mm512_broadcast_i64x4(loadu_256(w.qs));
    const long long s0 = 2 * k, s1 = 2 * k + 2;
    const __m512i low = _mm512_and_si512(_mm512_srlv_epi64(q, _mm512_set_epi64(s1, s1, s1, s1, s0, s0, s0, s0)), _mm512_set1_epi8(3));
    const uint32_t b0 = 0x01010101u << k;
    const int l0 = (int)b0, l1 = (int)(b0 << 4), l2 = (int)(b0 << 1), l3 = (int)(b0 << 5);  // per 16-byte lane
    const __m512i bits = _mm512_set_epi32(l3, l3, l3, l3, l2, l2, l2, l2, l1, l1, l1, l1, l0, l0, l0, l0);
    const __mmask64 third = _mm512_test_epi8_mask(_mm512_broadcast_i32x4(loadu_128(w.qh)), bits);
    return _mm512_mask_add_epi8(low, third, low, _mm512_set1_epi8(4));
}
MOE_DETAIL_AVX512 inline __m512i tq_codes2_avx512(const BlockTQ4& w, int k) { return nibbles2_avx512(w.qs + 16 * k, w.qs + 16 * k + 16); }

// TQ3/TQ4 against the rotated Q8_0 row: per group two registers of 64 codes (offset by 128) and
// the activation's lane-ready scales; d once per group, and the offset off at the end as
// 128 * Σ d * s (the activation's precomputed sums).
template <typename Block>
MOE_DETAIL_AVX512VNNI inline float vec_dot_tq_q8_0_rot_avx512vnni(const Block* w, const BlockQ8Rot* x, int64_t n) {
    const __m512i table = offset_table_avx512(TqTraits<Block>::values), zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    float offset = 0;
    for (int64_t b = 0; b < n / kQTQ; ++b) {
        const float d = _cvtsh_ss(w[b].d);
        const __m512i dot0 = _mm512_dpbusd_epi32(zero, _mm512_shuffle_epi8(table, tq_codes2_avx512(w[b], 0)), loadu_512(x[b].qs));
        const __m512i dot1 = _mm512_dpbusd_epi32(zero, _mm512_shuffle_epi8(table, tq_codes2_avx512(w[b], 2)), loadu_512(x[b].qs + 64));
        const __m512 part = _mm512_fmadd_ps(_mm512_loadu_ps(x[b].d + 16), _mm512_cvtepi32_ps(dot1),
                                            _mm512_mul_ps(_mm512_loadu_ps(x[b].d), _mm512_cvtepi32_ps(dot0)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), part, acc);
        offset += d * x[b].s;
    }
    return _mm512_reduce_add_ps(acc) - 128.f * offset;
}

// MLX affine against Q8_1: unsigned codes go into vpdpbusd as they are; two 32-element chunks
// (of one group, or of two groups at G = 32) per register; the bias term as bias * s.
template <typename Block>
MOE_DETAIL_AVX512 inline __m512i affine_codes2_avx512(const uint8_t* a, const uint8_t* b) {
    if constexpr (Block::kBits == 4) {
        return nibbles2_avx512(a, b);
    } else {  // 8 bytes of 2-bit fields (element j: byte j % 8, bits 2 * (j / 8)), then the third bits
        uint64_t la, lb;
        uint32_t ha, hb;
        std::memcpy(&la, a, 8);
        std::memcpy(&lb, b, 8);
        std::memcpy(&ha, a + 8, 4);
        std::memcpy(&hb, b + 8, 4);
        const __m512i q = _mm512_inserti64x4(_mm512_set1_epi64((long long)la), _mm256_set1_epi64x((long long)lb), 1);
        const __m512i low = _mm512_and_si512(_mm512_srlv_epi64(q, _mm512_set_epi64(6, 4, 2, 0, 6, 4, 2, 0)), _mm512_set1_epi8(3));
        return _mm512_mask_add_epi8(low, (__mmask64)ha | (__mmask64)hb << 32, low, _mm512_set1_epi8(4));
    }
}
template <typename Block>
MOE_DETAIL_AVX512 inline const uint8_t* affine_chunk(const Block* w, int64_t c) {
    constexpr int kChunks = Block::kGroup / 32;
    return w[c / kChunks].qs + (c % kChunks) * Block::kChunkBytes;
}
// Four chunks per step. Their activation scales d (words 2, 22, 42, 62) and sums s (dwords 0, 10,
// 20, 30) lie in the first 128 of their 160 bytes: two permutes pick them out; the groups' scales
// and biases come four at a time (one group at G = 128, two at 64, four at 32).
template <typename Block>
MOE_DETAIL_AVX512VNNI inline float vec_dot_affine_mlx_q8_1_avx512vnni(const Block* w, const BlockQ8_1* x, int64_t n) {
    constexpr int kChunks = Block::kGroup / 32;
    constexpr short xw = (short)(sizeof(BlockQ8_1) / 2);
    const __m512i pick_d = _mm512_zextsi128_si512(_mm_setr_epi16(2, 2 + xw, 2 + 2 * xw, 2 + 3 * xw, 0, 0, 0, 0));
    const __m512i pick_s = _mm512_zextsi128_si512(_mm_setr_epi32(0, xw / 2, xw, 3 * xw / 2));
    const __m512i zero = _mm512_setzero_si512();
    const int64_t nc = n / 32;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m128 offsets = _mm_setzero_ps();
    int64_t c = 0;
    for (; c + 4 <= nc; c += 4) {
        const char* xp = reinterpret_cast<const char*>(x + c);
        const __m512i lo = loadu_512(xp), hi = loadu_512(xp + 64);
        const __m128 xd = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(lo, pick_d, hi)));
        const __m128 xsum = _mm512_castps512_ps128(_mm512_permutex2var_ps(_mm512_castsi512_ps(lo), pick_s, _mm512_castsi512_ps(hi)));
        const Block* g = w + c / kChunks;
        __m128i sb;  // scales in words 0-3, biases in 4-7
        if constexpr (kChunks == 1) sb = _mm_setr_epi16(g[0].scale, g[1].scale, g[2].scale, g[3].scale, g[0].bias, g[1].bias, g[2].bias, g[3].bias);
        else if constexpr (kChunks == 2) sb = _mm_setr_epi16(g[0].scale, g[0].scale, g[1].scale, g[1].scale, g[0].bias, g[0].bias, g[1].bias, g[1].bias);
        else sb = _mm_setr_epi16(g[0].scale, g[0].scale, g[0].scale, g[0].scale, g[0].bias, g[0].bias, g[0].bias, g[0].bias);
        const __m256 sbf = _mm256_cvtph_ps(sb);
        const __m128 s = _mm_mul_ps(_mm256_castps256_ps128(sbf), xd);
        offsets = _mm_fmadd_ps(_mm256_extractf128_ps(sbf, 1), xsum, offsets);
        const __m512i q01 = affine_codes2_avx512<Block>(affine_chunk(w, c), affine_chunk(w, c + 1));
        const __m512i q23 = affine_codes2_avx512<Block>(affine_chunk(w, c + 2), affine_chunk(w, c + 3));
        const __m512i d01 = _mm512_dpbusd_epi32(zero, q01, concat_256(loadu_256(x[c].qs), loadu_256(x[c + 1].qs)));
        const __m512i d23 = _mm512_dpbusd_epi32(zero, q23, concat_256(loadu_256(x[c + 2].qs), loadu_256(x[c + 3].qs)));
        acc0 = _mm512_fmadd_ps(scale_pair_avx512(s, 0), _mm512_cvtepi32_ps(d01), acc0);
        acc1 = _mm512_fmadd_ps(scale_pair_avx512(s, 2), _mm512_cvtepi32_ps(d23), acc1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + hsum_f32x8(_mm256_insertf128_ps(_mm256_setzero_ps(), offsets, 0));
    if (c < nc) sum += vec_dot_affine_mlx_q8_1_avx2(w + c / kChunks, x + c, n - c * 32);  // whole groups: c % kChunks == 0
    return sum;
}

// GEMM panel tile (GEMM PANELS): 16 rows x NT tokens in 2 x NT registers, one vpdpbusd per (4
// columns, token) with the token's 4 codes broadcast; the float steps are gemm_tile_ref's, lane-wise.
template <int NT, bool kMin>
MOE_DETAIL_AVX512VNNI inline void gemm_tile_nt_avx512vnni(const GemmPanel& p, const BlockQ8G* const* x, float* out) {
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < p.nb; ++b) {
        const __m512i bias = _mm512_load_si512(p.bias + b * kGemmRows);
        const int8_t* q = p.q + b * kQK * kGemmRows;
        __m512i s[NT];
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) s[t] = bias;
#pragma GCC unroll 8
        for (int g = 0; g < kQK / 4; ++g) {
            const __m512i w = _mm512_load_si512(q + 64 * g);
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) s[t] = _mm512_dpbusd_epi32(s[t], _mm512_set1_epi32((int)load_u32(x[t][b].qs + 4 * g)), w);
        }
        const __m512 sc = _mm512_load_ps(p.scale + b * kGemmRows);
        if constexpr (kMin) {
            const __m512 mn = _mm512_load_ps(p.min + b * kGemmRows);
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t)
                acc[t] = _mm512_add_ps(acc[t], _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(x[t][b].d)), _mm512_cvtepi32_ps(s[t]),
                                                               _mm512_mul_ps(mn, _mm512_set1_ps(x[t][b].s))));
        } else {
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(x[t][b].d)), _mm512_cvtepi32_ps(s[t]), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * kGemmRows, acc[t]);
}
template <bool kMin>
MOE_DETAIL_AVX512VNNI inline void gemm_tile_min_avx512vnni(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out) {
    switch (nt) {
        case 1: return gemm_tile_nt_avx512vnni<1, kMin>(p, x, out);
        case 2: return gemm_tile_nt_avx512vnni<2, kMin>(p, x, out);
        case 3: return gemm_tile_nt_avx512vnni<3, kMin>(p, x, out);
        case 4: return gemm_tile_nt_avx512vnni<4, kMin>(p, x, out);
        case 5: return gemm_tile_nt_avx512vnni<5, kMin>(p, x, out);
        case 6: return gemm_tile_nt_avx512vnni<6, kMin>(p, x, out);
        case 7: return gemm_tile_nt_avx512vnni<7, kMin>(p, x, out);
        default: return gemm_tile_nt_avx512vnni<8, kMin>(p, x, out);
    }
}
static_assert(kGemmTokens == 8, "gemm_tile_min_avx512vnni dispatches 1..8 tokens");
MOE_DETAIL_AVX512VNNI inline void gemm_tile_avx512vnni(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out) {
    if (p.has_min) gemm_tile_min_avx512vnni<true>(p, x, nt, out);
    else gemm_tile_min_avx512vnni<false>(p, x, nt, out);
}

// Attention kernels (att_*_ref in KERNELS: REFERENCE): scores of 4 query rows per pass over a key
// row (the key loaded once), values into 4 rows x 64 columns of accumulators held in registers over
// all n value rows, exp with the reference's steps lane-wise.
// The sums of a0..a3 into r[0..3], by one fixed tree (so a row's score does not depend on the
// rows it was computed with).
MOE_DETAIL_AVX512 inline void hsum4_avx512(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float scale, float* r) {
    const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
    const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
    const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
    const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    _mm_storeu_ps(r, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale)));
}
MOE_DETAIL_AVX512 inline void att_scores_avx512(const float* q, int64_t qs, int nq, const uint8_t* k, size_t ks, int n, int hk, float scale,
                                                float* out, int os) {
    const int full = hk / 16;
    const __mmask16 tail = (__mmask16)((1u << (hk % 16)) - 1);
    float r[4];
    int i = 0;
    for (; i + 4 <= nq; i += 4) {
        const float *q0 = q + i * qs, *q1 = q0 + qs, *q2 = q1 + qs, *q3 = q2 + qs;
        for (int j = 0; j < n; ++j) {
            const float* kj = reinterpret_cast<const float*>(k + (size_t)j * ks);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < full; ++c) {
                const __m512 kv = _mm512_loadu_ps(kj + 16 * c);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 16 * c), kv, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + 16 * c), kv, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + 16 * c), kv, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + 16 * c), kv, a3);
            }
            if (tail) {
                const __m512 kv = _mm512_maskz_loadu_ps(tail, kj + 16 * full);
                a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q0 + 16 * full), kv, a0);
                a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q1 + 16 * full), kv, a1);
                a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q2 + 16 * full), kv, a2);
                a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q3 + 16 * full), kv, a3);
            }
            hsum4_avx512(a0, a1, a2, a3, scale, r);
            for (int u = 0; u < 4; ++u) out[(size_t)(i + u) * (size_t)os + (size_t)j] = r[u];
        }
    }
    for (; i < nq; ++i) {
        const float* qi = q + i * qs;
        for (int j = 0; j < n; ++j) {
            const float* kj = reinterpret_cast<const float*>(k + (size_t)j * ks);
            __m512 a = _mm512_setzero_ps();
            for (int c = 0; c < full; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16 * c), _mm512_loadu_ps(kj + 16 * c), a);
            if (tail) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, qi + 16 * full), _mm512_maskz_loadu_ps(tail, kj + 16 * full), a);
            hsum4_avx512(a, a, a, a, scale, r);
            out[(size_t)i * (size_t)os + (size_t)j] = r[0];
        }
    }
}

// acc rows [i, i + R) x columns [d, d + 64) (the last columns masked by m[]), over all n values.
template <int R>
MOE_DETAIL_AVX512 inline void att_values_tile_avx512(const float* p, int ps, const uint8_t* v, size_t vs, int n, int hv, int d, const __mmask16* m,
                                                     float* acc) {
    __m512 a[R][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_maskz_loadu_ps(m[c], acc + (size_t)r * (size_t)hv + d + 16 * c);
    for (int j = 0; j < n; ++j) {
        const float* vj = reinterpret_cast<const float*>(v + (size_t)j * vs) + d;
        __m512 vv[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) vv[c] = _mm512_maskz_loadu_ps(m[c], vj + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const __m512 pr = _mm512_set1_ps(p[(size_t)r * (size_t)ps + (size_t)j]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(acc + (size_t)r * (size_t)hv + d + 16 * c, m[c], a[r][c]);
}
MOE_DETAIL_AVX512 inline void att_values_avx512(const float* p, int ps, int nq, const uint8_t* v, size_t vs, int n, int hv, float* acc) {
    for (int d = 0; d < hv; d += 64) {
        __mmask16 m[4];
        for (int c = 0; c < 4; ++c) {
            const int left = std::max(0, std::min(16, hv - d - 16 * c));
            m[c] = (__mmask16)((1u << left) - 1);
        }
        int i = 0;
        for (; i + 4 <= nq; i += 4) att_values_tile_avx512<4>(p + (size_t)i * (size_t)ps, ps, v, vs, n, hv, d, m, acc + (size_t)i * (size_t)hv);
        for (; i < nq; ++i) att_values_tile_avx512<1>(p + (size_t)i * (size_t)ps, ps, v, vs, n, hv, d, m, acc + (size_t)i * (size_t)hv);
    }
}

MOE_DETAIL_AVX512 inline void att_exp_avx512(float* x, int n) {
    for (int j = 0; j < n; j += 16) {
        const __mmask16 m = (__mmask16)(n - j >= 16 ? 0xffffu : (1u << (n - j)) - 1);
        const __m512 v = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_maskz_loadu_ps(m, x + j)));
        const __m512 mm = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fmadd_ps(mm, _mm512_set1_ps(-0.693145751953125f), v);
        r = _mm512_fmadd_ps(mm, _mm512_set1_ps(-1.428606765330187045e-06f), r);
        __m512 e = _mm512_set1_ps(1.f / 5040);
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 720));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(mm), _mm512_set1_epi32(127)), 23));
        _mm512_mask_storeu_ps(x + j, m, _mm512_mul_ps(e, scale));
    }
}

#if MOE_DETAIL_HAS_AMX
#define MOE_DETAIL_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")))
// GCC's tile intrinsics are asm statements without memory operands: fence them so the A buffer is
// written before a tile load reads it and the C buffer read only after a tile store wrote it.
#define MOE_DETAIL_MEMORY_FENCE() __asm__ __volatile__("" ::: "memory")

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) AmxTileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

// One block's C rows (NT tokens x 16 int32 sums) into acc, as gemm_tile_nt_avx512vnni does it.
template <int NT, bool kMin>
MOE_DETAIL_AMX inline void amx_finish_block(const GemmPanel& p, const BlockQ8G* const* x, int64_t b, const int32_t* sums, __m512* acc) {
    const __m512i bias = _mm512_load_si512(p.bias + b * kGemmRows);
    const __m512 sc = _mm512_load_ps(p.scale + b * kGemmRows);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(bias, _mm512_load_si512(sums + t * kGemmRows)));
        if constexpr (kMin)
            acc[t] = _mm512_add_ps(acc[t], _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(x[t][b].d)), s,
                                                           _mm512_mul_ps(_mm512_load_ps(p.min + b * kGemmRows), _mm512_set1_ps(x[t][b].s))));
        else
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(x[t][b].d)), s, acc[t]);
    }
}

// GEMM panel tile on AMX: per 32-column block, C = A . B on the tile unit (tdpbusd) with A the NT
// tokens' codes (unsigned, + 128; gathered 16 blocks at a time into rows of 512 bytes) and B the
// block's panel as it lies (8 rows of 4 columns x 16 weight rows: the panel layout is AMX's B
// layout). Each C row (one token's 16 int32 sums) then takes gemm_tile_nt_avx512vnni's float steps
// in the same order, so the two kernels give bit-identical results. Blocks go in pairs (tmm0-1 C,
// tmm2-3 A, tmm4-5 B) and a pair's float steps run while the tile unit works on the next pair.
// Slower than the VNNI tile on Sapphire Rapids (bench/RESULTS.md): every (token, block) still needs
// its float steps, which cost about as much as VNNI's 8 dot products, plus the tile round trips.
template <int NT, bool kMin>
MOE_DETAIL_AMX inline void gemm_tile_nt_amx(const GemmPanel& p, const BlockQ8G* const* x, float* out) {
    constexpr int kChunk = 16;  // blocks gathered at a time
    AmxTileConfig cfg;
    for (int i = 0; i < 2; ++i) {
        cfg.rows[i] = NT;                cfg.colsb[i] = kGemmRows * 4;
        cfg.rows[2 + i] = NT;            cfg.colsb[2 + i] = kQK;
        cfg.rows[4 + i] = kQK / 4;       cfg.colsb[4 + i] = kGemmRows * 4;
    }
    _tile_loadconfig(&cfg);
    alignas(64) uint8_t a[NT * kChunk * kQK];
    alignas(64) int32_t c[2][2][NT * kGemmRows];  // [pair parity][block of the pair]
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    const int64_t nb = p.nb;
    int64_t pending = -1;  // first block of the pair whose C rows wait for their float steps
    for (int64_t b = 0; b < nb; b += 2) {
        const int64_t in_chunk = b % kChunk;
        if (in_chunk == 0) {
            const int64_t n = std::min<int64_t>(kChunk, nb - b);
            for (int t = 0; t < NT; ++t)
                for (int64_t j = 0; j < n; ++j)
                    _mm256_store_si256(reinterpret_cast<__m256i*>(a + (t * kChunk + j) * kQK), loadu_256(x[t][b + j].qs));
            MOE_DETAIL_MEMORY_FENCE();
        }
        const int parity = (int)((b / 2) & 1);
        _tile_loadd(2, a + in_chunk * kQK, kChunk * kQK);
        _tile_loadd(4, p.q + b * kQK * kGemmRows, kGemmRows * 4);
        _tile_zero(0);
        _tile_dpbusd(0, 2, 4);
        _tile_stored(0, c[parity][0], kGemmRows * 4);
        if (b + 1 < nb) {
            _tile_loadd(3, a + (in_chunk + 1) * kQK, kChunk * kQK);
            _tile_loadd(5, p.q + (b + 1) * kQK * kGemmRows, kGemmRows * 4);
            _tile_zero(1);
            _tile_dpbusd(1, 3, 5);
            _tile_stored(1, c[parity][1], kGemmRows * 4);
        }
        MOE_DETAIL_MEMORY_FENCE();
        if (pending >= 0) {  // the previous pair (whole: a pair follows it)
            amx_finish_block<NT, kMin>(p, x, pending, c[parity ^ 1][0], acc);
            amx_finish_block<NT, kMin>(p, x, pending + 1, c[parity ^ 1][1], acc);
        }
        pending = b;
    }
    if (pending >= 0) {
        const int parity = (int)((pending / 2) & 1);
        amx_finish_block<NT, kMin>(p, x, pending, c[parity][0], acc);
        if (pending + 1 < nb) amx_finish_block<NT, kMin>(p, x, pending + 1, c[parity][1], acc);
    }
    _tile_release();  // back to the init state: no 8 KB of tile data to save on a context switch
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * kGemmRows, acc[t]);
}
template <bool kMin>
MOE_DETAIL_AMX inline void gemm_tile_min_amx(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out) {
    switch (nt) {
        case 1: return gemm_tile_nt_amx<1, kMin>(p, x, out);
        case 2: return gemm_tile_nt_amx<2, kMin>(p, x, out);
        case 3: return gemm_tile_nt_amx<3, kMin>(p, x, out);
        case 4: return gemm_tile_nt_amx<4, kMin>(p, x, out);
        case 5: return gemm_tile_nt_amx<5, kMin>(p, x, out);
        case 6: return gemm_tile_nt_amx<6, kMin>(p, x, out);
        case 7: return gemm_tile_nt_amx<7, kMin>(p, x, out);
        default: return gemm_tile_nt_amx<8, kMin>(p, x, out);
    }
}
MOE_DETAIL_AMX inline void gemm_tile_amx(const GemmPanel& p, const BlockQ8G* const* x, int nt, float* out) {
    if (p.has_min) gemm_tile_min_amx<true>(p, x, nt, out);
    else gemm_tile_min_amx<false>(p, x, nt, out);
}
#undef MOE_DETAIL_MEMORY_FENCE
#undef MOE_DETAIL_AMX
#endif  // MOE_DETAIL_HAS_AMX

}  // namespace detail
}  // namespace moe

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#undef MOE_DETAIL_AVX2
#undef MOE_DETAIL_AVX512
#undef MOE_DETAIL_AVX512VNNI
#endif  // MOE_DETAIL_HAS_X86

//-----------------------------------------------------------------------------
// [SECTION] KERNELS: ARM (NEON, DOTPROD)
//-----------------------------------------------------------------------------
// >>kernels-arm  AArch64 versions of the row kernels in KERNELS: REFERENCE. As on x86, each one
// computes exactly the integer block sums of its _ref twin (results differ only in the order of the
// float additions) and uses unaligned loads. Plain NEON is always there on AArch64; the dotprod
// kernels (SDOT: four int8 products summed into an int32 lane) carry a target attribute, so one
// binary runs everywhere and arm_has_dotprod() decides at run time. No offset tricks are needed:
// NEON multiplies signed by signed bytes, so nibbles are made signed (Q4_0's q - 8, Q6_K's q - 32)
// before the multiply. Without dotprod, vmull/vmlal add two int8 products per int16 lane (at most
// 2*128*127 = 32512, a stored Q8_0 -128 included) before pairwise widening to int32.
#if MOE_DETAIL_HAS_NEON
#include <arm_neon.h>
#if defined(__linux__) && defined(__has_include)
#if __has_include(<sys/auxv.h>)
#include <sys/auxv.h>
#define MOE_DETAIL_HAS_AUXV 1
#endif
#endif

// The dotprod kernels need vdotq_s32 inside functions compiled for dotprod. Already compiled for
// a dotprod CPU: nothing to add (an explicit arch would lower it). GCC takes a target attribute
// but wants a whole arch string (GCC 12 rejects target("+dotprod") for the intrinsics). Clang's
// arm_neon.h hides the intrinsic unless the whole translation unit targets dotprod before
// Clang 19, so older Clang builds get the plain NEON kernels only (Apple's numbering differs,
// and Apple CPUs are covered by __ARM_FEATURE_DOTPROD anyway).
#if defined(__ARM_FEATURE_DOTPROD)
#define MOE_DETAIL_ARM_DOTPROD 1
#define MOE_DETAIL_DOTPROD
#elif defined(__clang__)
#if __clang_major__ >= 19 && !defined(__apple_build_version__)
#define MOE_DETAIL_ARM_DOTPROD 1
#define MOE_DETAIL_DOTPROD __attribute__((target("dotprod")))
#else
#define MOE_DETAIL_ARM_DOTPROD 0
#endif
#else
#define MOE_DETAIL_ARM_DOTPROD 1
#define MOE_DETAIL_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

namespace moe {
namespace detail {

// SDOT usable: the compiler's own -march says so, or Linux reports HWCAP_ASIMDDP. Elsewhere (no
// getauxval), or without dotprod kernels in this build, we stay with plain NEON rather than guess.
inline bool arm_has_dotprod() {
#if defined(__ARM_FEATURE_DOTPROD)
    return true;
#elif MOE_DETAIL_ARM_DOTPROD && defined(MOE_DETAIL_HAS_AUXV)
#if defined(HWCAP_ASIMDDP)
    constexpr unsigned long kAsimdDp = HWCAP_ASIMDDP;
#else
    constexpr unsigned long kAsimdDp = 1ul << 20;  // the kernel's AArch64 hwcap bit for ASIMDDP
#endif
    static const bool has = (getauxval(AT_HWCAP) & kAsimdDp) != 0;
    return has;
#else
    return false;
#endif
}

//---- shared helpers (plain NEON; they inline into the dotprod kernels too) ----

inline float fp16_to_f32_neon(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }
inline float32x4_t fp16x4_to_f32(uint16x4_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }  // exact, like fp16_to_f32
// bf16 is the top half of an f32: widen each to 32 bits, shifted left by 16.
inline float32x4_t bf16x4_to_f32(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

// d_w * d_x of four consecutive blocks (Q4_0 or Q8_0 weights, Q8_0 activations): the eight fp16
// scales go through two conversions instead of eight.
template <typename W>
inline float32x4_t scales4_neon(const W* w, const BlockQ8_0* x) {
    uint16x4_t hw = vdup_n_u16(w[0].d), hx = vdup_n_u16(x[0].d);
    hw = vset_lane_u16(w[1].d, hw, 1); hw = vset_lane_u16(w[2].d, hw, 2); hw = vset_lane_u16(w[3].d, hw, 3);
    hx = vset_lane_u16(x[1].d, hx, 1); hx = vset_lane_u16(x[2].d, hx, 2); hx = vset_lane_u16(x[3].d, hx, 3);
    return vmulq_f32(fp16x4_to_f32(hw), fp16x4_to_f32(hx));
}

// Σ a*b over 32 int8 pairs as 4 int32 partial sums (int16 lanes hold two products, see above).
inline int32x4_t dot32_i8_neon(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
    const int16x8_t p0 = vmlal_high_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(b0)), a0, b0);
    const int16x8_t p1 = vmlal_high_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(b1)), a1, b1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline int32x4_t dot32_i8_dotprod(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), a0, b0), a1, b1);
}
#endif
// Σ a*b over 16 int8 pairs (|a| <= 32 here: Q6_K), as 4 int32 partial sums.
inline int32x4_t dot16_i8_neon(int8x16_t a, int8x16_t b) {
    return vpaddlq_s16(vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b));
}
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline int32x4_t dot16_i8_dotprod(int8x16_t a, int8x16_t b) { return vdotq_s32(vdupq_n_s32(0), a, b); }
#endif

// One Q4_0 block as 32 signed values q - 8 in element order (low nibbles: elements 0-15).
inline void q4_0_unpack_neon(const uint8_t* qs, int8x16_t* lo, int8x16_t* hi) {
    const uint8x16_t q = vld1q_u8(qs);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
}

// Q4_K/Q5_K's 12 packed scale bytes as eight 6-bit scales and eight 6-bit mins, the values
// q4k_get_scale_min() decodes, computed four at a time in 32-bit words (little-endian lanes).
inline void q4k_scales_mins_neon(const uint8_t* s, uint8_t* scales, uint8_t* mins) {
    uint32_t a, b, c;  // s[0..3], s[4..7], s[8..11]
    std::memcpy(&a, s, 4);
    std::memcpy(&b, s + 4, 4);
    std::memcpy(&c, s + 8, 4);
    const uint32_t sc[2] = {a & 0x3f3f3f3fu, (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u)};
    const uint32_t mn[2] = {b & 0x3f3f3f3fu, ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u)};
    std::memcpy(scales, sc, 8);
    std::memcpy(mins, mn, 8);
}

// Q4_K/Q5_K mins term of one super-block: Σ_j m_j * (bsums[2j] + bsums[2j+1]) (pair sums <= 4064).
inline int q4k_mins_dot_neon(const uint8_t* mins, const int16_t* bsums) {
    const int16x8_t pairs = vpaddq_s16(vld1q_s16(bsums), vld1q_s16(bsums + 8));
    const int16x8_t m = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mins)));
    return vaddvq_s32(vmlal_high_s16(vmull_s16(vget_low_s16(pairs), vget_low_s16(m)), pairs, m));
}

//-----------------------------------------------------------------------------
// Float rows: four independent FMA chains (16 lanes) hide the FMA latency; a scalar tail takes
// the n % 4 last elements, so any n works.
//-----------------------------------------------------------------------------

inline float32x4_t load_f32x4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load_f16x4(const uint16_t* p) { return fp16x4_to_f32(vld1_u16(p)); }
inline float identity_f32(float v) { return v; }

template <typename W, float32x4_t (*Load4)(const W*), float (*ToF32)(W)>
inline float float_row_dot_neon(const W* w, const float* x, int64_t n) {
    float32x4_t acc0 = vdupq_n_f32(0), acc1 = vdupq_n_f32(0), acc2 = vdupq_n_f32(0), acc3 = vdupq_n_f32(0);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = vfmaq_f32(acc0, Load4(w + i), vld1q_f32(x + i));
        acc1 = vfmaq_f32(acc1, Load4(w + i + 4), vld1q_f32(x + i + 4));
        acc2 = vfmaq_f32(acc2, Load4(w + i + 8), vld1q_f32(x + i + 8));
        acc3 = vfmaq_f32(acc3, Load4(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, Load4(w + i), vld1q_f32(x + i));
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc0, acc1), vaddq_f32(acc2, acc3)));
    for (; i < n; ++i) sum += ToF32(w[i]) * x[i];
    return sum;
}

inline float vec_dot_f32_f32_neon(const float* w, const float* x, int64_t n) { return float_row_dot_neon<float, load_f32x4, identity_f32>(w, x, n); }
inline float vec_dot_f16_f32_neon(const uint16_t* w, const float* x, int64_t n) { return float_row_dot_neon<uint16_t, load_f16x4, fp16_to_f32_neon>(w, x, n); }
inline float vec_dot_bf16_f32_neon(const uint16_t* w, const float* x, int64_t n) { return float_row_dot_neon<uint16_t, bf16x4_to_f32, bf16_to_f32>(w, x, n); }

//-----------------------------------------------------------------------------
// Q8_0 and Q4_0 weights against Q8_0 activations: four blocks per step, one float accumulator each,
// block scales applied once per block after the integer sums. A macro, not a template, because the
// dotprod variants must be compiled (with the block dot inlined) under their own target attribute.
//-----------------------------------------------------------------------------

#define MOE_DETAIL_Q8_0_ROW_NEON(BLOCK_DOT)                                                            \
    const int64_t nb = n / kQK;                                                                        \
    float32x4_t acc0 = vdupq_n_f32(0), acc1 = vdupq_n_f32(0), acc2 = vdupq_n_f32(0), acc3 = vdupq_n_f32(0); \
    int64_t b = 0;                                                                                     \
    for (; b + 4 <= nb; b += 4) {                                                                      \
        const float32x4_t d = scales4_neon(w + b, x + b);                                              \
        acc0 = vfmaq_laneq_f32(acc0, vcvtq_f32_s32(BLOCK_DOT(w[b + 0], x[b + 0])), d, 0);              \
        acc1 = vfmaq_laneq_f32(acc1, vcvtq_f32_s32(BLOCK_DOT(w[b + 1], x[b + 1])), d, 1);              \
        acc2 = vfmaq_laneq_f32(acc2, vcvtq_f32_s32(BLOCK_DOT(w[b + 2], x[b + 2])), d, 2);              \
        acc3 = vfmaq_laneq_f32(acc3, vcvtq_f32_s32(BLOCK_DOT(w[b + 3], x[b + 3])), d, 3);              \
    }                                                                                                  \
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc0, acc1), vaddq_f32(acc2, acc3)));                   \
    for (; b < nb; ++b)                                                                                \
        sum += fp16_to_f32_neon(w[b].d) * fp16_to_f32_neon(x[b].d) * (float)vaddvq_s32(BLOCK_DOT(w[b], x[b])); \
    return sum

inline int32x4_t block_dot_neon(const BlockQ8_0& w, const BlockQ8_0& x) {
    return dot32_i8_neon(vld1q_s8(w.qs), vld1q_s8(w.qs + 16), vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}
inline int32x4_t block_dot_neon(const BlockQ4_0& w, const BlockQ8_0& x) {
    int8x16_t lo, hi;
    q4_0_unpack_neon(w.qs, &lo, &hi);
    return dot32_i8_neon(lo, hi, vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline int32x4_t block_dot_dotprod(const BlockQ8_0& w, const BlockQ8_0& x) {
    return dot32_i8_dotprod(vld1q_s8(w.qs), vld1q_s8(w.qs + 16), vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}
MOE_DETAIL_DOTPROD inline int32x4_t block_dot_dotprod(const BlockQ4_0& w, const BlockQ8_0& x) {
    int8x16_t lo, hi;
    q4_0_unpack_neon(w.qs, &lo, &hi);
    return dot32_i8_dotprod(lo, hi, vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}

#endif

inline float vec_dot_q8_0_q8_0_neon(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_Q8_0_ROW_NEON(block_dot_neon); }
inline float vec_dot_q4_0_q8_0_neon(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_Q8_0_ROW_NEON(block_dot_neon); }
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline float vec_dot_q8_0_q8_0_dotprod(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_ROW_NEON(block_dot_dotprod);
}
MOE_DETAIL_DOTPROD inline float vec_dot_q4_0_q8_0_dotprod(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    MOE_DETAIL_Q8_0_ROW_NEON(block_dot_dotprod);
}
#endif

// Q5_0/Q5_1 codes (0..31) of one block in element order: nibbles plus 0x10 where bit j of qh is set.
inline void q5_codes_neon(const uint8_t* qs, const uint8_t* qh, int8x16_t* lo, int8x16_t* hi) {
    static const uint8_t kBits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bits = vld1q_u8(kBits), m10 = vdupq_n_u8(0x10);
    const uint8x16_t h0 = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1])), h1 = vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3]));
    const uint8x16_t q = vld1q_u8(qs);
    *lo = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(q, vdupq_n_u8(0x0F)), vandq_u8(vtstq_u8(h0, bits), m10)));
    *hi = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(q, 4), vandq_u8(vtstq_u8(h1, bits), m10)));
}
inline void iq4_weights_neon(const uint8_t* qs, int8x16_t* lo, int8x16_t* hi) {
    const int8x16_t table = vld1q_s8(kIq4Values);
    const uint8x16_t q = vld1q_u8(qs);
    *lo = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0x0F)));
    *hi = vqtbl1q_s8(table, vshrq_n_u8(q, 4));
}
inline int32x4_t block_dot_neon(const BlockQ5_0& w, const BlockQ8_0& x) {
    int8x16_t lo, hi;
    q5_codes_neon(w.qs, w.qh, &lo, &hi);
    const int8x16_t k16 = vdupq_n_s8(16);
    return dot32_i8_neon(vsubq_s8(lo, k16), vsubq_s8(hi, k16), vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}
inline int32x4_t block_dot_neon(const BlockIQ4NL& w, const BlockQ8_0& x) {
    int8x16_t lo, hi;
    iq4_weights_neon(w.qs, &lo, &hi);
    return dot32_i8_neon(lo, hi, vld1q_s8(x.qs), vld1q_s8(x.qs + 16));
}
inline float vec_dot_q5_0_q8_0_neon(const BlockQ5_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_Q8_0_ROW_NEON(block_dot_neon); }
inline float vec_dot_iq4nl_q8_0_neon(const BlockIQ4NL* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_Q8_0_ROW_NEON(block_dot_neon); }
template <typename Block>
inline float vec_dot_affine_q8_1_neon(const Block* w, const BlockQ8_1* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int8x16_t lo, hi;
        if constexpr (std::is_same<Block, BlockQ4_1>::value) {
            const uint8x16_t q = vld1q_u8(w[b].qs);
            lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
            hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
        } else {
            q5_codes_neon(w[b].qs, w[b].qh, &lo, &hi);
        }
        const int qy = vaddvq_s32(dot32_i8_neon(lo, hi, vld1q_s8(x[b].qs), vld1q_s8(x[b].qs + 16)));
        sum += fp16_to_f32_neon(w[b].d) * fp16_to_f32_neon(x[b].d) * (float)qy + fp16_to_f32_neon(w[b].m) * x[b].s;
    }
    return sum;
}
// The seed formats' row loops, written once for the two dot products (DOT32: 32 pairs, DOT16: 16).
#define MOE_DETAIL_MXFP4_ROW_NEON(DOT32)                                                                          \
    const int8x16_t table = vld1q_s8(kFp4Values);                                                                 \
    float sum = 0;                                                                                                \
    for (int64_t b = 0; b < n / kQK; ++b) {                                                                       \
        const uint8x16_t q = vld1q_u8(w[b].qs);                                                                   \
        const int8x16_t lo = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0x0F))), hi = vqtbl1q_s8(table, vshrq_n_u8(q, 4)); \
        sum += e8m0_half(w[b].e) * fp16_to_f32_neon(x[b].d) * (float)vaddvq_s32(DOT32(lo, hi, vld1q_s8(x[b].qs), vld1q_s8(x[b].qs + 16))); \
    }                                                                                                             \
    return sum
inline float vec_dot_mxfp4_q8_0_neon(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_MXFP4_ROW_NEON(dot32_i8_neon); }
#define MOE_DETAIL_NVFP4_ROW_NEON(DOT16)                                                                          \
    const int8x16_t table = vld1q_s8(kFp4Values);                                                                 \
    float sum = 0;                                                                                                \
    for (int64_t b = 0; b < n / kQNV; ++b)                                                                        \
        for (int s = 0; s < 4; ++s) {                                                                             \
            const uint8x8_t q = vld1_u8(w[b].qs + 8 * s);                                                         \
            const int8x16_t v = vqtbl1q_s8(table, vcombine_u8(vand_u8(q, vdup_n_u8(0x0F)), vshr_n_u8(q, 4)));     \
            const BlockQ8_0& a = x[2 * b + s / 2];                                                                \
            const int32x4_t p = DOT16(v, vld1q_s8(a.qs + 16 * (s % 2)));                                          \
            sum += ue4m3_half(w[b].d[s]) * fp16_to_f32_neon(a.d) * (float)vaddvq_s32(p);                          \
        }                                                                                                         \
    return sum
inline float vec_dot_nvfp4_q8_0_neon(const BlockNVFP4* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_NVFP4_ROW_NEON(dot16_i8_neon); }
// 32 codes of an affine chunk as two int8x16 halves (elements 0-15, 16-31).
template <int Bits>
inline void affine_codes_neon(const uint8_t* c, int8x16_t* lo, int8x16_t* hi) {
    if constexpr (Bits == 4) {
        const uint8x16_t q = vld1q_u8(c);
        *lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
        *hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
    } else {
        static const uint8_t kBits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x8_t q = vld1_u8(c), m3 = vdup_n_u8(3);
        const uint8x16_t l0 = vcombine_u8(vand_u8(q, m3), vand_u8(vshr_n_u8(q, 2), m3));
        const uint8x16_t l1 = vcombine_u8(vand_u8(vshr_n_u8(q, 4), m3), vshr_n_u8(q, 6));
        const uint8x16_t bits = vld1q_u8(kBits), m4 = vdupq_n_u8(4);
        const uint8x16_t h0 = vcombine_u8(vdup_n_u8(c[8]), vdup_n_u8(c[9])), h1 = vcombine_u8(vdup_n_u8(c[10]), vdup_n_u8(c[11]));
        *lo = vreinterpretq_s8_u8(vorrq_u8(l0, vandq_u8(vtstq_u8(h0, bits), m4)));
        *hi = vreinterpretq_s8_u8(vorrq_u8(l1, vandq_u8(vtstq_u8(h1, bits), m4)));
    }
}
#define MOE_DETAIL_AFFINE_MLX_ROW_NEON(DOT32)                                                                     \
    constexpr int kChunks = Block::kGroup / 32;                                                                   \
    float sum = 0;                                                                                                \
    for (int64_t b = 0; b < n / Block::kGroup; ++b) {                                                             \
        const float s = fp16_to_f32_neon(w[b].scale), bias = fp16_to_f32_neon(w[b].bias);                        \
        for (int c = 0; c < kChunks; ++c) {                                                                       \
            int8x16_t lo, hi;                                                                                     \
            affine_codes_neon<Block::kBits>(w[b].qs + c * Block::kChunkBytes, &lo, &hi);                          \
            const BlockQ8_1& a = x[b * kChunks + c];                                                              \
            const int qy = vaddvq_s32(DOT32(lo, hi, vld1q_s8(a.qs), vld1q_s8(a.qs + 16)));                        \
            sum += s * fp16_to_f32_neon(a.d) * (float)qy + bias * a.s;                                            \
        }                                                                                                         \
    }                                                                                                             \
    return sum
template <typename Block>
inline float vec_dot_affine_mlx_q8_1_neon(const Block* w, const BlockQ8_1* x, int64_t n) { MOE_DETAIL_AFFINE_MLX_ROW_NEON(dot32_i8_neon); }
#define MOE_DETAIL_TQ_ROW_NEON(DOT32)                                                                                 \
    const int8x16_t table = vld1q_s8(TqTraits<Block>::values);                                                        \
    float sum = 0;                                                                                                    \
    for (int64_t b = 0; b < n / kQTQ; ++b) {                                                                          \
        float part = 0;                                                                                               \
        for (int k = 0; k < 4; ++k) {                                                                                 \
            uint8x16_t c0, c1;                                                                                        \
            if constexpr (std::is_same<Block, BlockTQ4>::value) {                                                     \
                const uint8x16_t q = vld1q_u8(w[b].qs + 16 * k);                                                      \
                c0 = vandq_u8(q, vdupq_n_u8(0x0F));                                                                   \
                c1 = vshrq_n_u8(q, 4);                                                                                \
            } else {                                                                                                  \
                const int8x16_t sh = vdupq_n_s8((int8_t)(-2 * k));                                                    \
                const uint8x16_t m3 = vdupq_n_u8(3), m4 = vdupq_n_u8(4), qh = vld1q_u8(w[b].qh);                      \
                c0 = vorrq_u8(vandq_u8(vshlq_u8(vld1q_u8(w[b].qs), sh), m3), vandq_u8(vtstq_u8(qh, vdupq_n_u8((uint8_t)(1 << k))), m4)); \
                c1 = vorrq_u8(vandq_u8(vshlq_u8(vld1q_u8(w[b].qs + 16), sh), m3), vandq_u8(vtstq_u8(qh, vdupq_n_u8((uint8_t)(1 << (k + 4)))), m4)); \
            }                                                                                                         \
            const int8x16_t lo = vqtbl1q_s8(table, c0), hi = vqtbl1q_s8(table, c1);                                   \
            part += x[b].d[8 * k] * (float)vaddvq_s32(DOT32(lo, hi, vld1q_s8(x[b].qs + 32 * k), vld1q_s8(x[b].qs + 32 * k + 16))); \
        }                                                                                                             \
        sum += fp16_to_f32_neon(w[b].d) * part;                                                                       \
    }                                                                                                                 \
    return sum
template <typename Block>
inline float vec_dot_tq_q8_0_rot_neon(const Block* w, const BlockQ8Rot* x, int64_t n) { MOE_DETAIL_TQ_ROW_NEON(dot32_i8_neon); }
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline float vec_dot_mxfp4_q8_0_dotprod(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_MXFP4_ROW_NEON(dot32_i8_dotprod); }
MOE_DETAIL_DOTPROD inline float vec_dot_nvfp4_q8_0_dotprod(const BlockNVFP4* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_NVFP4_ROW_NEON(dot16_i8_dotprod); }
template <typename Block>
MOE_DETAIL_DOTPROD inline float vec_dot_affine_mlx_q8_1_dotprod(const Block* w, const BlockQ8_1* x, int64_t n) { MOE_DETAIL_AFFINE_MLX_ROW_NEON(dot32_i8_dotprod); }
template <typename Block>
MOE_DETAIL_DOTPROD inline float vec_dot_tq_q8_0_rot_dotprod(const Block* w, const BlockQ8Rot* x, int64_t n) { MOE_DETAIL_TQ_ROW_NEON(dot32_i8_dotprod); }
#endif
#undef MOE_DETAIL_MXFP4_ROW_NEON
#undef MOE_DETAIL_NVFP4_ROW_NEON
#undef MOE_DETAIL_AFFINE_MLX_ROW_NEON
#undef MOE_DETAIL_TQ_ROW_NEON
inline float vec_dot_iq4xs_q8k_neon(const BlockIQ4XS* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int32x4_t acc = vdupq_n_s32(0);
        for (int i = 0; i < 8; ++i) {
            int8x16_t lo, hi;
            iq4_weights_neon(w[b].qs + 16 * i, &lo, &hi);
            const int8_t* y = x[b].qs + 32 * i;
            acc = vmlaq_n_s32(acc, dot32_i8_neon(lo, hi, vld1q_s8(y), vld1q_s8(y + 16)), iq4xs_scale(w[b], i));
        }
        sum += fp16_to_f32_neon(w[b].d) * x[b].d * (float)vaddvq_s32(acc);
    }
    return sum;
}
#undef MOE_DETAIL_Q8_0_ROW_NEON

//-----------------------------------------------------------------------------
// K-quants against Q8_K activations. Per super-block the scaled integer sum (< 2^27 for every
// format) is built in int32 lanes with the sub-block scale multiplied in (vmlaq_n), then scaled
// once by d_w * d_x; the Q4_K/Q5_K mins go through the bsums, as in the _ref. Macros for the same
// reason as above: each dotprod variant must be compiled whole under its target attribute.
//-----------------------------------------------------------------------------

// Q4_K: in chunk c (32 bytes) the low nibbles are sub-block 2c, the high nibbles sub-block 2c+1.
// Q5_K adds a 5th bit: element 64c+l takes bit 2c of qh[l], element 64c+32+l bit 2c+1; qh is
// shifted right by 2 per chunk, so the two bits needed are always bits 0 and 1. Used inside
// templates over the block type, so the Q4_K expansion drops the qh steps (if constexpr).
#define MOE_DETAIL_Q45K_ROW_NEON(DOT32)                                                                \
    const int64_t nb = n / kQKK;                                                                       \
    const uint8x16_t m4 = vdupq_n_u8(0x0F), bit4 = vdupq_n_u8(0x10);                                   \
    float sum = 0;                                                                                     \
    for (int64_t b = 0; b < nb; ++b) {                                                                 \
        uint8_t sc[8], mn[8];                                                                          \
        q4k_scales_mins_neon(w[b].scales, sc, mn);                                                     \
        const int mins = q4k_mins_dot_neon(mn, x[b].bsums);                                            \
        const uint8_t* q = w[b].qs;                                                                    \
        const int8_t* y = x[b].qs;                                                                     \
        uint8x16_t qh0 = vdupq_n_u8(0), qh1 = vdupq_n_u8(0);                                           \
        if constexpr (kHasFifthBit<Block>) { qh0 = vld1q_u8(w[b].qh); qh1 = vld1q_u8(w[b].qh + 16); } \
        int32x4_t acc = vdupq_n_s32(0);                                                                \
        for (int c = 0; c < 4; ++c) {                                                                  \
            const uint8x16_t q0 = vld1q_u8(q + 32 * c), q1 = vld1q_u8(q + 32 * c + 16);                \
            uint8x16_t lo0 = vandq_u8(q0, m4), lo1 = vandq_u8(q1, m4), hi0 = vshrq_n_u8(q0, 4), hi1 = vshrq_n_u8(q1, 4); \
            if constexpr (kHasFifthBit<Block>) {                                                       \
                lo0 = vorrq_u8(lo0, vandq_u8(vshlq_n_u8(qh0, 4), bit4));                               \
                lo1 = vorrq_u8(lo1, vandq_u8(vshlq_n_u8(qh1, 4), bit4));                               \
                hi0 = vorrq_u8(hi0, vandq_u8(vshlq_n_u8(qh0, 3), bit4));                               \
                hi1 = vorrq_u8(hi1, vandq_u8(vshlq_n_u8(qh1, 3), bit4));                               \
                qh0 = vshrq_n_u8(qh0, 2);                                                              \
                qh1 = vshrq_n_u8(qh1, 2);                                                              \
            }                                                                                          \
            const int32x4_t dlo = DOT32(vreinterpretq_s8_u8(lo0), vreinterpretq_s8_u8(lo1), vld1q_s8(y + 64 * c), vld1q_s8(y + 64 * c + 16)); \
            const int32x4_t dhi = DOT32(vreinterpretq_s8_u8(hi0), vreinterpretq_s8_u8(hi1), vld1q_s8(y + 64 * c + 32), vld1q_s8(y + 64 * c + 48)); \
            acc = vmlaq_n_s32(acc, dlo, sc[2 * c]);                                                    \
            acc = vmlaq_n_s32(acc, dhi, sc[2 * c + 1]);                                                \
        }                                                                                              \
        sum += fp16_to_f32_neon(w[b].d) * x[b].d * (float)vaddvq_s32(acc) - fp16_to_f32_neon(w[b].dmin) * x[b].d * (float)mins; \
    }                                                                                                  \
    return sum

template <typename Block>
inline float vec_dot_q45k_q8k_neon(const Block* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_Q45K_ROW_NEON(dot32_i8_neon); }
#if MOE_DETAIL_ARM_DOTPROD
template <typename Block>
MOE_DETAIL_DOTPROD inline float vec_dot_q45k_q8k_dotprod(const Block* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q45K_ROW_NEON(dot32_i8_dotprod);
}
#endif
#undef MOE_DETAIL_Q45K_ROW_NEON

// Q6_K: each 16-byte register of unpacked values is exactly one 16-element sub-block, so it gets
// one scale. In half h, ql[64h..64h+31] holds the low nibbles of elements 128h+0..31 (low halves)
// and 128h+64..95 (high halves), ql[64h+32..] those of 128h+32..63 and 128h+96..127; qh[32h+l]
// carries the two high bits of the four elements 128h+l+32k in bits 2k, 2k+1.
#define MOE_DETAIL_Q6K_ROW_NEON(DOT16)                                                                 \
    const int64_t nb = n / kQKK;                                                                       \
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m30 = vdupq_n_u8(0x30);                                    \
    const int8x16_t k32 = vdupq_n_s8(32);                                                              \
    float sum = 0;                                                                                     \
    for (int64_t b = 0; b < nb; ++b) {                                                                 \
        const int8_t* sc = w[b].scales;                                                                \
        const int8_t* y = x[b].qs;                                                                     \
        int32x4_t acc = vdupq_n_s32(0);                                                                \
        for (int h = 0; h < 2; ++h) {                                                                  \
            for (int g = 0; g < 2; ++g) { /* g: l in 0..15 or 16..31 */                                \
                const uint8x16_t la = vld1q_u8(w[b].ql + 64 * h + 16 * g);                             \
                const uint8x16_t lb = vld1q_u8(w[b].ql + 64 * h + 32 + 16 * g);                        \
                const uint8x16_t hb = vld1q_u8(w[b].qh + 32 * h + 16 * g);                             \
                const int8x16_t q0 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(la, m4), vandq_u8(vshlq_n_u8(hb, 4), m30))), k32); \
                const int8x16_t q1 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(lb, m4), vandq_u8(vshlq_n_u8(hb, 2), m30))), k32); \
                const int8x16_t q2 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(la, 4), vandq_u8(hb, m30))), k32); \
                const int8x16_t q3 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(lb, 4), vandq_u8(vshrq_n_u8(hb, 2), m30))), k32); \
                const int8_t* yh = y + 128 * h + 16 * g;                                               \
                const int s = 8 * h + g; /* sub-block of q0; q1..q3 are 2, 4, 6 further */             \
                acc = vmlaq_n_s32(acc, DOT16(q0, vld1q_s8(yh)), sc[s]);                                \
                acc = vmlaq_n_s32(acc, DOT16(q1, vld1q_s8(yh + 32)), sc[s + 2]);                       \
                acc = vmlaq_n_s32(acc, DOT16(q2, vld1q_s8(yh + 64)), sc[s + 4]);                       \
                acc = vmlaq_n_s32(acc, DOT16(q3, vld1q_s8(yh + 96)), sc[s + 6]);                       \
            }                                                                                          \
        }                                                                                              \
        sum += fp16_to_f32_neon(w[b].d) * x[b].d * (float)vaddvq_s32(acc);                             \
    }                                                                                                  \
    return sum

inline float vec_dot_q6k_q8k_neon(const BlockQ6K* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_Q6K_ROW_NEON(dot16_i8_neon); }
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline float vec_dot_q6k_q8k_dotprod(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q6K_ROW_NEON(dot16_i8_dotprod);
}
#endif
#undef MOE_DETAIL_Q6K_ROW_NEON

// Q2_K / Q3_K: each 16-byte register is one 16-element sub-block (order as Q6_K): in half h,
// qs[32h + 16g ..] holds sub-blocks 8h + 2j + g in bits 2j..2j+1; Q3_K's high bit for sub-block
// (h, j, g) is bit 4h + j of hmask[16g ..].
#define MOE_DETAIL_Q23K_ROW_NEON(DOT16, HMASK, PREP, SCALE, INT_TERM, MIN_TERM)                       \
    const int64_t nb = n / kQKK;                                                                       \
    const uint8x16_t m3 = vdupq_n_u8(3), m1 = vdupq_n_u8(1);                                           \
    float sum = 0;                                                                                     \
    for (int64_t b = 0; b < nb; ++b) {                                                                 \
        const int8_t* y = x[b].qs;                                                                     \
        const uint8_t* hm = HMASK;                                                                     \
        int8_t sc3[16];                                                                                \
        PREP;                                                                                          \
        int32x4_t acc = vdupq_n_s32(0);                                                                \
        for (int h = 0; h < 2; ++h)                                                                    \
            for (int g = 0; g < 2; ++g) {                                                              \
                const uint8x16_t bits = vld1q_u8(w[b].qs + 32 * h + 16 * g);                           \
                for (int j = 0; j < 4; ++j) {                                                          \
                    const uint8x16_t q = vandq_u8(vshlq_u8(bits, vdupq_n_s8((int8_t)(-2 * j))), m3);   \
                    int8x16_t v = vreinterpretq_s8_u8(q);                                              \
                    if (hm) {                                                                          \
                        const uint8x16_t hb = vandq_u8(vshlq_u8(vld1q_u8(hm + 16 * g), vdupq_n_s8((int8_t)(-(4 * h + j)))), m1); \
                        v = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(q, vshlq_n_u8(hb, 2))), vdupq_n_s8(4)); \
                    }                                                                                  \
                    const int s = 8 * h + 2 * j + g;                                                   \
                    (void)s; /* TQ2_0's scale is 1 */                                                  \
                    acc = vmlaq_n_s32(acc, DOT16(v, vld1q_s8(y + 128 * h + 32 * j + 16 * g)), SCALE);  \
                }                                                                                      \
            }                                                                                          \
        sum += fp16_to_f32_neon(w[b].d) * x[b].d * (float)(vaddvq_s32(acc) - (INT_TERM)) - (MIN_TERM); \
    }                                                                                                  \
    return sum

inline int q2k_min_sum(const BlockQ2K& w, const BlockQ8K& x) {
    int mins = 0;
    for (int s = 0; s < 16; ++s) mins += (w.scales[s] >> 4) * x.bsums[s];
    return mins;
}
inline float vec_dot_q2k_q8k_neon(const BlockQ2K* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q23K_ROW_NEON(dot16_i8_neon, (const uint8_t*)nullptr, (void)sc3, (w[b].scales[s] & 15), 0,
                             fp16_to_f32_neon(w[b].dmin) * x[b].d * (float)q2k_min_sum(w[b], x[b]));
}
inline int bsum_total(const BlockQ8K& x) {
    int s = 0;
    for (int i = 0; i < 16; ++i) s += x.bsums[i];
    return s;
}
// TQ1_0: trit n of byte q is ((uint8_t)(q * 3^n) * 3) >> 8 (a widening multiply, the high byte);
// Σ t * y over the 256 trits (0..2), minus Σ y for the offset.
inline int8x16_t tq1_trits_neon(uint8x16_t q, uint8x16_t pow3) {
    const uint8x16_t v = vmulq_u8(q, pow3), three = vdupq_n_u8(3);
    return vreinterpretq_s8_u8(vcombine_u8(vshrn_n_u16(vmull_u8(vget_low_u8(v), vget_low_u8(three)), 8), vshrn_n_u16(vmull_high_u8(v, three), 8)));
}
#define MOE_DETAIL_TQ1_ROW_NEON(DOT16)                                                                    \
    static const uint8_t kLastPow3[16] = {1, 1, 1, 1, 3, 3, 3, 3, 9, 9, 9, 9, 27, 27, 27, 27};           \
    float sum = 0;                                                                                        \
    for (int64_t b = 0; b < n / kQKK; ++b) {                                                              \
        const int8_t* y = x[b].qs;                                                                        \
        const uint8x16_t a0 = vld1q_u8(w[b].qs), a1 = vld1q_u8(w[b].qs + 16), a2 = vld1q_u8(w[b].qs + 32); \
        int32x4_t acc = vdupq_n_s32(0);                                                                   \
        uint8_t pow3 = 1;                                                                                 \
        for (int k = 0; k < 5; ++k, pow3 = (uint8_t)(pow3 * 3)) { /* elements 32k + m, 160 + 16k + m */   \
            const uint8x16_t p = vdupq_n_u8(pow3);                                                        \
            acc = vaddq_s32(acc, DOT16(tq1_trits_neon(a0, p), vld1q_s8(y + 32 * k)));                     \
            acc = vaddq_s32(acc, DOT16(tq1_trits_neon(a1, p), vld1q_s8(y + 32 * k + 16)));                \
            acc = vaddq_s32(acc, DOT16(tq1_trits_neon(a2, p), vld1q_s8(y + 160 + 16 * k)));               \
        }                                                                                                 \
        uint32_t qh;                                                                                      \
        std::memcpy(&qh, w[b].qh, 4);                                                                     \
        const uint8x16_t last = vreinterpretq_u8_u32(vdupq_n_u32(qh)); /* qh[m] at lane 4n + m */         \
        acc = vaddq_s32(acc, DOT16(tq1_trits_neon(last, vld1q_u8(kLastPow3)), vld1q_s8(y + 240)));        \
        sum += fp16_to_f32_neon(w[b].d) * x[b].d * (float)(vaddvq_s32(acc) - bsum_total(x[b]));          \
    }                                                                                                     \
    return sum
inline float vec_dot_tq1_q8k_neon(const BlockTQ1* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_TQ1_ROW_NEON(dot16_i8_neon); }
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline float vec_dot_tq1_q8k_dotprod(const BlockTQ1* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_TQ1_ROW_NEON(dot16_i8_dotprod); }
#endif
#undef MOE_DETAIL_TQ1_ROW_NEON
inline float vec_dot_tq2_q8k_neon(const BlockTQ2* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q23K_ROW_NEON(dot16_i8_neon, (const uint8_t*)nullptr, (void)sc3, 1, bsum_total(x[b]), 0.f);
}
inline float vec_dot_q3k_q8k_neon(const BlockQ3K* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q23K_ROW_NEON(dot16_i8_neon, w[b].hmask, q3k_scales16(w[b].scales, sc3), sc3[s], 0, 0.f);
}
#if MOE_DETAIL_ARM_DOTPROD
MOE_DETAIL_DOTPROD inline float vec_dot_q2k_q8k_dotprod(const BlockQ2K* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q23K_ROW_NEON(dot16_i8_dotprod, (const uint8_t*)nullptr, (void)sc3, (w[b].scales[s] & 15), 0,
                             fp16_to_f32_neon(w[b].dmin) * x[b].d * (float)q2k_min_sum(w[b], x[b]));
}
MOE_DETAIL_DOTPROD inline float vec_dot_q3k_q8k_dotprod(const BlockQ3K* w, const BlockQ8K* x, int64_t n) {
    MOE_DETAIL_Q23K_ROW_NEON(dot16_i8_dotprod, w[b].hmask, q3k_scales16(w[b].scales, sc3), sc3[s], 0, 0.f);
}
#endif

// IQ grid types and IQ1: the decoded group (iq_group / iq1_group) as vectors; signs as +-1 bytes
// multiplied into y (exact, |y| <= 127); IQ1's 8 * grid + delta (-9..9) formed in int8 lanes.
inline int8x16_t iq_sign_bytes_neon(uint32_t bits16) {
    static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t s = vcombine_u8(vdup_n_u8((uint8_t)bits16), vdup_n_u8((uint8_t)(bits16 >> 8)));
    return vreinterpretq_s8_u8(vorrq_u8(vtstq_u8(s, vld1q_u8(kBit)), vdupq_n_u8(1)));
}
inline int8x16_t s8x16_from_u64(uint64_t lo, uint64_t hi) { return vreinterpretq_s8_u64(vcombine_u64(vcreate_u64(lo), vcreate_u64(hi))); }
#define MOE_DETAIL_IQGRID_ROW_NEON(DOT16)                                                                 \
    float sum = 0;                                                                                        \
    for (int64_t b = 0; b < n / kQKK; ++b) {                                                              \
        int32x4_t acc = vdupq_n_s32(0);                                                                   \
        for (int g = 0; g < 8; ++g) {                                                                     \
            const IqGroup q = iq_group(w[b], g);                                                          \
            const int8_t* y = x[b].qs + 32 * g;                                                           \
            const int8x16_t y0 = vmulq_s8(vld1q_s8(y), iq_sign_bytes_neon(q.signs));                      \
            const int8x16_t y1 = vmulq_s8(vld1q_s8(y + 16), iq_sign_bytes_neon(q.signs >> 16));           \
            acc = vmlaq_n_s32(acc, DOT16(s8x16_from_u64(q.mag[0], q.mag[1]), y0), q.ls[0]);               \
            acc = vmlaq_n_s32(acc, DOT16(s8x16_from_u64(q.mag[2], q.mag[3]), y1), q.ls[1]);               \
        }                                                                                                 \
        sum += iq_d(w[b]) * x[b].d * (float)vaddvq_s32(acc);                                              \
    }                                                                                                     \
    return sum / (float)iq_divisor<Block>()
#define MOE_DETAIL_IQ1_ROW_NEON(DOT16)                                                                    \
    float sum = 0;                                                                                        \
    for (int64_t b = 0; b < n / kQKK; ++b) {                                                              \
        int32x4_t acc = vdupq_n_s32(0);                                                                   \
        for (int g = 0; g < 8; ++g) {                                                                     \
            const Iq1Group q = iq1_group(w[b], g);                                                        \
            const int8_t* y = x[b].qs + 32 * g;                                                           \
            const int8x16_t v0 = vaddq_s8(vshlq_n_s8(s8x16_from_u64(q.grid[0], q.grid[1]), 3),            \
                                          s8x16_from_u64(repeat_byte(q.delta[0]), repeat_byte(q.delta[1])));\
            const int8x16_t v1 = vaddq_s8(vshlq_n_s8(s8x16_from_u64(q.grid[2], q.grid[3]), 3),            \
                                          s8x16_from_u64(repeat_byte(q.delta[2]), repeat_byte(q.delta[3])));\
            acc = vmlaq_n_s32(acc, DOT16(v0, vld1q_s8(y)), q.ls[0]);                                      \
            acc = vmlaq_n_s32(acc, DOT16(v1, vld1q_s8(y + 16)), q.ls[1]);                                 \
        }                                                                                                 \
        sum += iq_d(w[b]) * x[b].d * (float)vaddvq_s32(acc);                                              \
    }                                                                                                     \
    return sum * 0.125f
// Q1_0 / Q2_0: per Q8_0 block the 32 weights as int8 (+-1 from the sign bits; Q2_0's codes spread
// with a byte table and per-lane shifts, minus 1), one dot, scaled by d * d_y.
inline int8x16_t q2_0_values_neon(const uint8_t* qs) {
    static const uint8_t kSpread[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    static const int8_t kShift[16] = {0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6};
    uint32_t bits;
    std::memcpy(&bits, qs, 4);
    const uint8x16_t v = vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(bits)), vld1q_u8(kSpread));
    return vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshlq_u8(v, vld1q_s8(kShift)), vdupq_n_u8(3))), vdupq_n_s8(1));
}
#define MOE_DETAIL_WIDE_Q8_0_ROW_NEON(Elems, VALUES, DOT16)                                                \
    float sum = 0;                                                                                        \
    for (int64_t b = 0; b < n / Elems; ++b) {                                                             \
        float part = 0;                                                                                   \
        for (int k = 0; k < Elems / kQK; ++k) {                                                           \
            const BlockQ8_0& y = x[b * (Elems / kQK) + k];                                                \
            int8x16_t a0, a1;                                                                             \
            VALUES;                                                                                       \
            part += fp16_to_f32_neon(y.d) * (float)vaddvq_s32(vaddq_s32(DOT16(a0, vld1q_s8(y.qs)), DOT16(a1, vld1q_s8(y.qs + 16)))); \
        }                                                                                                 \
        sum += fp16_to_f32_neon(w[b].d) * part;                                                           \
    }                                                                                                     \
    return sum
#define MOE_DETAIL_Q1_0_VALUES                                                                            \
    a0 = iq_sign_bytes_neon(~load_u32(w[b].qs + 4 * k));                                                  \
    a1 = iq_sign_bytes_neon(~load_u32(w[b].qs + 4 * k) >> 16)
#define MOE_DETAIL_Q2_0_VALUES                                                                            \
    a0 = q2_0_values_neon(w[b].qs + 8 * k);                                                               \
    a1 = q2_0_values_neon(w[b].qs + 8 * k + 4)
template <typename Block> inline float vec_dot_iqgrid_q8k_neon(const Block* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_IQGRID_ROW_NEON(dot16_i8_neon); }
template <typename Block> inline float vec_dot_iq1_q8k_neon(const Block* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_IQ1_ROW_NEON(dot16_i8_neon); }
inline float vec_dot_q1_0_q8_0_neon(const BlockQ1_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_WIDE_Q8_0_ROW_NEON(kQK1, MOE_DETAIL_Q1_0_VALUES, dot16_i8_neon); }
inline float vec_dot_q2_0_q8_0_neon(const BlockQ2_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_WIDE_Q8_0_ROW_NEON(kQK2, MOE_DETAIL_Q2_0_VALUES, dot16_i8_neon); }
#if MOE_DETAIL_ARM_DOTPROD
template <typename Block> MOE_DETAIL_DOTPROD inline float vec_dot_iqgrid_q8k_dotprod(const Block* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_IQGRID_ROW_NEON(dot16_i8_dotprod); }
template <typename Block> MOE_DETAIL_DOTPROD inline float vec_dot_iq1_q8k_dotprod(const Block* w, const BlockQ8K* x, int64_t n) { MOE_DETAIL_IQ1_ROW_NEON(dot16_i8_dotprod); }
MOE_DETAIL_DOTPROD inline float vec_dot_q1_0_q8_0_dotprod(const BlockQ1_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_WIDE_Q8_0_ROW_NEON(kQK1, MOE_DETAIL_Q1_0_VALUES, dot16_i8_dotprod); }
MOE_DETAIL_DOTPROD inline float vec_dot_q2_0_q8_0_dotprod(const BlockQ2_0* w, const BlockQ8_0* x, int64_t n) { MOE_DETAIL_WIDE_Q8_0_ROW_NEON(kQK2, MOE_DETAIL_Q2_0_VALUES, dot16_i8_dotprod); }
#endif
#undef MOE_DETAIL_IQGRID_ROW_NEON
#undef MOE_DETAIL_IQ1_ROW_NEON
#undef MOE_DETAIL_WIDE_Q8_0_ROW_NEON
#undef MOE_DETAIL_Q1_0_VALUES
#undef MOE_DETAIL_Q2_0_VALUES
#undef MOE_DETAIL_Q23K_ROW_NEON

//---- activation quantizers (bit-identical to quantize_act_q8_0_ref and quantize_row_q8k_ref) ----
// The scalar parts (amax / 127, 127 / amax, -127 / vmax, 1 / iscale) are the _ref's own
// expressions. Products are one rounding each, as in the _ref; FRINTI (vrndiq) rounds in the FPCR
// mode, which is the mode nearbyint uses (ties to even by default), and the integral result then
// converts exactly. FMAXNM skips a quiet NaN the way std::max / `>` skip it in the _ref.

// Eight vectors of 4 int32 (each in [-127, 127]) to 16 + 16 int8 in order.
inline int8x16_t narrow_i32x16_to_i8(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
    return vcombine_s8(vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b))), vqmovn_s16(vcombine_s16(vqmovn_s32(c), vqmovn_s32(d))));
}
inline int32x4_t round_to_i32(float32x4_t v) { return vcvtq_s32_f32(vrndiq_f32(v)); }

// Q8_0 activations: id = 127/amax, q = nearbyint(x * id); |x * id| <= 127 up to one rounding.
inline void quantize_act_q8_0_neon(BlockQ8_0* y, const float* x, int64_t n) {
    for (int64_t b = 0; b < n / kQK; ++b, x += kQK) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0);
        for (int k = 0; k < 8; ++k) {
            v[k] = vld1q_f32(x + 4 * k);
            m = vmaxnmq_f32(m, vabsq_f32(v[k]));
        }
        const float amax = vmaxnmvq_f32(m);
        const float id = amax != 0 ? 127.f / amax : 0.f;
        y[b].d = f32_to_fp16(amax / 127.f);
        int32x4_t q[8];
        for (int k = 0; k < 8; ++k) q[k] = round_to_i32(vmulq_n_f32(v[k], id));
        vst1q_s8(y[b].qs, narrow_i32x16_to_i8(q[0], q[1], q[2], q[3]));
        vst1q_s8(y[b].qs + 16, narrow_i32x16_to_i8(q[4], q[5], q[6], q[7]));
    }
}

// Q8_K: vmax is the signed value of the first element with the largest |x| (as the _ref scans);
// q = min(127, nearbyint(iscale * x)); bsums are the 16-element sums.
inline void quantize_row_q8k_neon(BlockQ8K* y, const float* x, int64_t n) {
    const int32x4_t k127 = vdupq_n_s32(127);
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        float32x4_t m = vdupq_n_f32(0);
        for (int j = 0; j < kQKK; j += 4) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(x + j)));
        const float amax = vmaxnmvq_f32(m);
        if (amax == 0) { std::memset(&y[b], 0, sizeof y[b]); continue; }
        int first = 0;
        const float32x4_t amaxv = vdupq_n_f32(amax);
        for (int j = 0; j < kQKK; j += 4) {
            if (vmaxvq_u32(vceqq_f32(vabsq_f32(vld1q_f32(x + j)), amaxv)) == 0) continue;
            first = j;
            while (std::fabs(x[first]) != amax) ++first;
            break;
        }
        const float iscale = -127.f / x[first];
        for (int j = 0; j < kQKK; j += 16) {
            int32x4_t q[4];
            for (int k = 0; k < 4; ++k) q[k] = vminq_s32(round_to_i32(vmulq_n_f32(vld1q_f32(x + j + 4 * k), iscale)), k127);
            vst1q_s8(y[b].qs + j, narrow_i32x16_to_i8(q[0], q[1], q[2], q[3]));
            y[b].bsums[j / 16] = (int16_t)vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        }
        y[b].d = 1 / iscale;
    }
}

}  // namespace detail
}  // namespace moe

#undef MOE_DETAIL_DOTPROD
#endif  // MOE_DETAIL_HAS_NEON
#if !defined(MOE_DETAIL_ARM_DOTPROD)
#define MOE_DETAIL_ARM_DOTPROD 0
#endif

namespace moe {
namespace detail {

//-----------------------------------------------------------------------------
// [SECTION] TYPE TABLE
//-----------------------------------------------------------------------------
// >>table  One row per tensor type and one per activation format: block geometry, reference
// quantizers, and the kernel of every ISA (nullptr where an ISA has none: dispatch then takes the
// next lower level of the same family, finally the _ref kernel). Kernels compiled out by
// MOE_NO_SIMD / MOE_NO_AVX2 / MOE_NO_AVX512 / MOE_NO_NEON read as nullptr here.

#if MOE_DETAIL_HAS_AVX2
#define MOE_DETAIL_IF_AVX2(f) f
#else
#define MOE_DETAIL_IF_AVX2(f) nullptr
#endif
#if MOE_DETAIL_HAS_AVX512
#define MOE_DETAIL_IF_AVX512(f) f
#else
#define MOE_DETAIL_IF_AVX512(f) nullptr
#endif
#if MOE_DETAIL_HAS_NEON
#define MOE_DETAIL_IF_NEON(f) f
#else
#define MOE_DETAIL_IF_NEON(f) nullptr
#endif
#if MOE_DETAIL_HAS_NEON && MOE_DETAIL_ARM_DOTPROD
#define MOE_DETAIL_IF_DOTPROD(f) f
#else
#define MOE_DETAIL_IF_DOTPROD(f) nullptr
#endif
// dot[] in Isa order: scalar, avx2, avx512, avx512_vnni, neon, neon_dotprod.
// (a kernel the ISA lacks is written nullptr: dot_fn<nullptr> is a null entry).
template <auto F> constexpr VecDotFn dot_fn = erase_dot<F>;
template <> constexpr VecDotFn dot_fn<nullptr> = nullptr;
#define MOE_DETAIL_DOTS(ref, avx2, avx512, vnni, neon, dotprod)                                     \
    { erase_dot<ref>, MOE_DETAIL_IF_AVX2(dot_fn<avx2>), MOE_DETAIL_IF_AVX512(dot_fn<avx512>),      \
      MOE_DETAIL_IF_AVX512(dot_fn<vnni>), MOE_DETAIL_IF_NEON(dot_fn<neon>), MOE_DETAIL_IF_DOTPROD(dot_fn<dotprod>) }

inline const QuantType* quant_type(uint32_t id) {
    // {type, name, block_elems, block_bytes, act, quantize_ref, dequantize_ref, dot_f32, dot[] by Isa}
    // Plain AVX-512 has nothing better for Q8_0 than AVX2's vpsignb + maddubs, and Q5_K and the
    // float types have no AVX-512 kernels: the AVX2 ones are the best there.
    static const QuantType table[] = {
        {TensorType::f32, "F32", 1, sizeof(float), ActFormat::f32, erase_quantize<quantize_row_f32_ref>, erase_dequantize<dequantize_row_f32>,
         erase_dot<vec_dot_f32_f32_ref>,
         MOE_DETAIL_DOTS(vec_dot_f32_f32_ref, vec_dot_f32_f32_avx2, nullptr, nullptr, vec_dot_f32_f32_neon, nullptr)},
        {TensorType::f16, "F16", 1, sizeof(uint16_t), ActFormat::f32, erase_quantize<quantize_row_f16_ref>, erase_dequantize<dequantize_row_f16>,
         erase_dot<vec_dot_f16_f32_ref>,
         MOE_DETAIL_DOTS(vec_dot_f16_f32_ref, vec_dot_f16_f32_avx2, nullptr, nullptr, vec_dot_f16_f32_neon, nullptr)},
        {TensorType::bf16, "BF16", 1, sizeof(uint16_t), ActFormat::f32, erase_quantize<quantize_row_bf16_ref>, erase_dequantize<dequantize_row_bf16>,
         erase_dot<vec_dot_bf16_f32_ref>,
         MOE_DETAIL_DOTS(vec_dot_bf16_f32_ref, vec_dot_bf16_f32_avx2, nullptr, nullptr, vec_dot_bf16_f32_neon, nullptr)},
        {TensorType::q8_0, "Q8_0", kQK, sizeof(BlockQ8_0), ActFormat::q8_0, erase_quantize<quantize_row_q8_0_ref>, erase_dequantize<dequantize_row_q8_0>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ8_0, kQK, dequantize_row_q8_0>>,
         MOE_DETAIL_DOTS(vec_dot_q8_0_q8_0_ref, vec_dot_q8_0_q8_0_avx2, nullptr, vec_dot_q8_0_q8_0_avx512vnni, vec_dot_q8_0_q8_0_neon,
                         vec_dot_q8_0_q8_0_dotprod)},
        {TensorType::q4_0, "Q4_0", kQK, sizeof(BlockQ4_0), ActFormat::q8_0, erase_quantize<quantize_row_q4_0_ref>, erase_dequantize<dequantize_row_q4_0>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ4_0, kQK, dequantize_row_q4_0>>,
         MOE_DETAIL_DOTS(vec_dot_q4_0_q8_0_ref, vec_dot_q4_0_q8_0_avx2, vec_dot_q4_0_q8_0_avx512, vec_dot_q4_0_q8_0_avx512vnni,
                         vec_dot_q4_0_q8_0_neon, vec_dot_q4_0_q8_0_dotprod)},
        {TensorType::q4_1, "Q4_1", kQK, sizeof(BlockQ4_1), ActFormat::q8_1, erase_quantize<quantize_row_affine_ref<BlockQ4_1, 15>>,
         erase_dequantize<dequantize_row_affine<BlockQ4_1>>, erase_dot<vec_dot_dequant_f32_ref<BlockQ4_1, kQK, dequantize_row_affine<BlockQ4_1>>>,
         MOE_DETAIL_DOTS(vec_dot_affine_q8_1_ref<BlockQ4_1>, vec_dot_affine_q8_1_avx2<BlockQ4_1>, nullptr, nullptr,
                         vec_dot_affine_q8_1_neon<BlockQ4_1>, nullptr)},
        {TensorType::q5_0, "Q5_0", kQK, sizeof(BlockQ5_0), ActFormat::q8_0, erase_quantize<quantize_row_q5_0_ref>, erase_dequantize<dequantize_row_q5_0>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ5_0, kQK, dequantize_row_q5_0>>,
         MOE_DETAIL_DOTS(vec_dot_q5_0_q8_0_ref, vec_dot_q5_0_q8_0_avx2, nullptr, nullptr, vec_dot_q5_0_q8_0_neon, nullptr)},
        {TensorType::q5_1, "Q5_1", kQK, sizeof(BlockQ5_1), ActFormat::q8_1, erase_quantize<quantize_row_affine_ref<BlockQ5_1, 31>>,
         erase_dequantize<dequantize_row_affine<BlockQ5_1>>, erase_dot<vec_dot_dequant_f32_ref<BlockQ5_1, kQK, dequantize_row_affine<BlockQ5_1>>>,
         MOE_DETAIL_DOTS(vec_dot_affine_q8_1_ref<BlockQ5_1>, vec_dot_affine_q8_1_avx2<BlockQ5_1>, nullptr, nullptr,
                         vec_dot_affine_q8_1_neon<BlockQ5_1>, nullptr)},
        {TensorType::iq4_nl, "IQ4_NL", kQK, sizeof(BlockIQ4NL), ActFormat::q8_0, erase_quantize<quantize_row_iq4nl_ref>,
         erase_dequantize<dequantize_row_iq4nl>, erase_dot<vec_dot_dequant_f32_ref<BlockIQ4NL, kQK, dequantize_row_iq4nl>>,
         MOE_DETAIL_DOTS(vec_dot_iq4nl_q8_0_ref, vec_dot_iq4nl_q8_0_avx2, nullptr, nullptr, vec_dot_iq4nl_q8_0_neon, nullptr)},
        {TensorType::iq4_xs, "IQ4_XS", kQKK, sizeof(BlockIQ4XS), ActFormat::q8_k, erase_quantize<quantize_row_iq4xs_ref>,
         erase_dequantize<dequantize_row_iq4xs>, erase_dot<vec_dot_dequant_f32_ref<BlockIQ4XS, kQKK, dequantize_row_iq4xs>>,
         MOE_DETAIL_DOTS(vec_dot_iq4xs_q8k_ref, vec_dot_iq4xs_q8k_avx2, nullptr, nullptr, vec_dot_iq4xs_q8k_neon, nullptr)},
        {TensorType::q2_k, "Q2_K", kQKK, sizeof(BlockQ2K), ActFormat::q8_k, erase_quantize<quantize_row_q2k_ref>, erase_dequantize<dequantize_row_q2k>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ2K, kQKK, dequantize_row_q2k>>,
         MOE_DETAIL_DOTS(vec_dot_q2k_q8k_ref, vec_dot_q2k_q8k_avx2, vec_dot_q2k_q8k_avx512, nullptr, vec_dot_q2k_q8k_neon,
                         vec_dot_q2k_q8k_dotprod)},
        {TensorType::q3_k, "Q3_K", kQKK, sizeof(BlockQ3K), ActFormat::q8_k, erase_quantize<quantize_row_q3k_ref>, erase_dequantize<dequantize_row_q3k>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ3K, kQKK, dequantize_row_q3k>>,
         MOE_DETAIL_DOTS(vec_dot_q3k_q8k_ref, vec_dot_q3k_q8k_avx2, vec_dot_q3k_q8k_avx512, nullptr, vec_dot_q3k_q8k_neon,
                         vec_dot_q3k_q8k_dotprod)},
        {TensorType::q4_k, "Q4_K", kQKK, sizeof(BlockQ4K), ActFormat::q8_k, erase_quantize<quantize_row_q45k_ref<BlockQ4K>>,
         erase_dequantize<dequantize_row_q45k<BlockQ4K>>, erase_dot<vec_dot_dequant_f32_ref<BlockQ4K, kQKK, dequantize_row_q45k<BlockQ4K>>>,
         MOE_DETAIL_DOTS(vec_dot_q45k_q8k_ref<BlockQ4K>, vec_dot_q45k_q8k_avx2<BlockQ4K>, vec_dot_q4k_q8k_avx512, vec_dot_q4k_q8k_avx512vnni,
                         vec_dot_q45k_q8k_neon<BlockQ4K>, vec_dot_q45k_q8k_dotprod<BlockQ4K>),
         erase_quantize_weighted<quantize_row_q45k_weighted<BlockQ4K>>},
        {TensorType::q5_k, "Q5_K", kQKK, sizeof(BlockQ5K), ActFormat::q8_k, erase_quantize<quantize_row_q45k_ref<BlockQ5K>>,
         erase_dequantize<dequantize_row_q45k<BlockQ5K>>, erase_dot<vec_dot_dequant_f32_ref<BlockQ5K, kQKK, dequantize_row_q45k<BlockQ5K>>>,
         MOE_DETAIL_DOTS(vec_dot_q45k_q8k_ref<BlockQ5K>, vec_dot_q45k_q8k_avx2<BlockQ5K>, nullptr, nullptr, vec_dot_q45k_q8k_neon<BlockQ5K>,
                         vec_dot_q45k_q8k_dotprod<BlockQ5K>),
         erase_quantize_weighted<quantize_row_q45k_weighted<BlockQ5K>>},
        {TensorType::q6_k, "Q6_K", kQKK, sizeof(BlockQ6K), ActFormat::q8_k, erase_quantize<quantize_row_q6k_ref>, erase_dequantize<dequantize_row_q6k>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ6K, kQKK, dequantize_row_q6k>>,
         MOE_DETAIL_DOTS(vec_dot_q6k_q8k_ref, vec_dot_q6k_q8k_avx2, vec_dot_q6k_q8k_avx512, vec_dot_q6k_q8k_avx512vnni, vec_dot_q6k_q8k_neon,
                         vec_dot_q6k_q8k_dotprod)},
        {TensorType::tq1_0, "TQ1_0", kQKK, sizeof(BlockTQ1), ActFormat::q8_k, erase_quantize<quantize_row_tq1_ref>, erase_dequantize<dequantize_row_tq1>,
         erase_dot<vec_dot_dequant_f32_ref<BlockTQ1, kQKK, dequantize_row_tq1>>,
         MOE_DETAIL_DOTS(vec_dot_tq1_q8k_ref, vec_dot_tq1_q8k_avx2, nullptr, nullptr, vec_dot_tq1_q8k_neon, vec_dot_tq1_q8k_dotprod)},
        {TensorType::tq2_0, "TQ2_0", kQKK, sizeof(BlockTQ2), ActFormat::q8_k, erase_quantize<quantize_row_tq2_ref>, erase_dequantize<dequantize_row_tq2>,
         erase_dot<vec_dot_dequant_f32_ref<BlockTQ2, kQKK, dequantize_row_tq2>>,
         MOE_DETAIL_DOTS(vec_dot_tq2_q8k_ref, vec_dot_tq2_q8k_avx2, nullptr, nullptr, vec_dot_tq2_q8k_neon, nullptr)},
        {TensorType::q1_0, "Q1_0", kQK1, sizeof(BlockQ1_0), ActFormat::q8_0, erase_quantize<quantize_row_q1_0_ref>, erase_dequantize<dequantize_row_q1_0>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ1_0, kQK1, dequantize_row_q1_0>>,
         MOE_DETAIL_DOTS(vec_dot_q1_0_q8_0_ref, vec_dot_q1_0_q8_0_avx2, nullptr, nullptr, vec_dot_q1_0_q8_0_neon, vec_dot_q1_0_q8_0_dotprod)},
        {TensorType::q2_0, "Q2_0", kQK2, sizeof(BlockQ2_0), ActFormat::q8_0, erase_quantize<quantize_row_q2_0_ref>, erase_dequantize<dequantize_row_q2_0>,
         erase_dot<vec_dot_dequant_f32_ref<BlockQ2_0, kQK2, dequantize_row_q2_0>>,
         MOE_DETAIL_DOTS(vec_dot_q2_0_q8_0_ref, vec_dot_q2_0_q8_0_avx2, nullptr, nullptr, vec_dot_q2_0_q8_0_neon, vec_dot_q2_0_q8_0_dotprod)},
        // The IQ grid types have no quantizer here: ggml's search their grids under an importance matrix.
        // FAMILY: iqgrid (magnitudes and signs) or iq1 (-1/0/1 grid and shifts), the generic kernels.
#define MOE_DETAIL_IQ_ROW(tt, NAME, Block, FAMILY)                                                                           \
        {TensorType::tt, NAME, kQKK, sizeof(Block), ActFormat::q8_k, nullptr, erase_dequantize<dequantize_row_##FAMILY<Block>>, \
         erase_dot<vec_dot_dequant_f32_ref<Block, kQKK, dequantize_row_##FAMILY<Block>>>,                                   \
         MOE_DETAIL_DOTS(vec_dot_##FAMILY##_q8k_ref<Block>, vec_dot_##FAMILY##_q8k_avx2<Block>, nullptr, nullptr,           \
                         vec_dot_##FAMILY##_q8k_neon<Block>, vec_dot_##FAMILY##_q8k_dotprod<Block>)}
        MOE_DETAIL_IQ_ROW(iq2_xxs, "IQ2_XXS", BlockIQ2XXS, iqgrid),
        MOE_DETAIL_IQ_ROW(iq2_xs, "IQ2_XS", BlockIQ2XS, iqgrid),
        MOE_DETAIL_IQ_ROW(iq2_s, "IQ2_S", BlockIQ2S, iqgrid),
        MOE_DETAIL_IQ_ROW(iq3_xxs, "IQ3_XXS", BlockIQ3XXS, iqgrid),
        MOE_DETAIL_IQ_ROW(iq3_s, "IQ3_S", BlockIQ3S, iqgrid),
        MOE_DETAIL_IQ_ROW(iq1_s, "IQ1_S", BlockIQ1S, iq1),
        MOE_DETAIL_IQ_ROW(iq1_m, "IQ1_M", BlockIQ1M, iq1),
#undef MOE_DETAIL_IQ_ROW
        // FP4 (ggml): the AVX2 kernel serves plain AVX-512 (VNNI's vpdpbusd is what the 512-bit ones need).
        {TensorType::mxfp4, "MXFP4", kQK, sizeof(BlockMXFP4), ActFormat::q8_0, erase_quantize<quantize_row_mxfp4_ref>,
         erase_dequantize<dequantize_row_mxfp4>, erase_dot<vec_dot_dequant_f32_ref<BlockMXFP4, kQK, dequantize_row_mxfp4>>,
         MOE_DETAIL_DOTS(vec_dot_mxfp4_q8_0_ref, vec_dot_mxfp4_q8_0_avx2, nullptr, vec_dot_mxfp4_q8_0_avx512vnni, vec_dot_mxfp4_q8_0_neon, vec_dot_mxfp4_q8_0_dotprod),
         erase_quantize_weighted<quantize_row_mxfp4_weighted>},
        {TensorType::nvfp4, "NVFP4", kQNV, sizeof(BlockNVFP4), ActFormat::q8_0, erase_quantize<quantize_row_nvfp4_ref>,
         erase_dequantize<dequantize_row_nvfp4>, erase_dot<vec_dot_dequant_f32_ref<BlockNVFP4, kQNV, dequantize_row_nvfp4>>,
         MOE_DETAIL_DOTS(vec_dot_nvfp4_q8_0_ref, vec_dot_nvfp4_q8_0_avx2, nullptr, vec_dot_nvfp4_q8_0_avx512vnni, vec_dot_nvfp4_q8_0_neon, vec_dot_nvfp4_q8_0_dotprod),
         erase_quantize_weighted<quantize_row_nvfp4_weighted>},
        // moe_infer's own: rotated codebook (TQ) and MLX affine, one generic kernel set each (AVX2 serves plain AVX-512).
#define MOE_DETAIL_TQ_ROW(tt, NAME, Block)                                                                                    \
        {TensorType::tt, NAME, kQTQ, sizeof(Block), ActFormat::q8_0_rot, erase_quantize<quantize_row_tq_ref<Block>>,          \
         erase_dequantize<dequantize_row_tq<Block>>, erase_dot<vec_dot_dequant_f32_ref<Block, kQTQ, dequantize_row_tq<Block>>>, \
         MOE_DETAIL_DOTS(vec_dot_tq_q8_0_rot_ref<Block>, vec_dot_tq_q8_0_rot_avx2<Block>, nullptr, vec_dot_tq_q8_0_rot_avx512vnni<Block>,                 \
                         vec_dot_tq_q8_0_rot_neon<Block>, vec_dot_tq_q8_0_rot_dotprod<Block>),                                            \
         erase_quantize_weighted<quantize_row_tq_weighted<Block>>}
        MOE_DETAIL_TQ_ROW(tq3, "TQ3", BlockTQ3),
        MOE_DETAIL_TQ_ROW(tq4, "TQ4", BlockTQ4),
#undef MOE_DETAIL_TQ_ROW
#define MOE_DETAIL_AFFINE_ROW(tt, NAME, Block)                                                                                 \
        {TensorType::tt, NAME, Block::kGroup, sizeof(Block), ActFormat::q8_1, erase_quantize<quantize_row_affine_mlx_ref<Block>>, \
         erase_dequantize<dequantize_row_affine_mlx<Block>>,                                                                    \
         erase_dot<vec_dot_dequant_f32_ref<Block, Block::kGroup, dequantize_row_affine_mlx<Block>>>,                             \
         MOE_DETAIL_DOTS(vec_dot_affine_mlx_q8_1_ref<Block>, vec_dot_affine_mlx_q8_1_avx2<Block>, nullptr, vec_dot_affine_mlx_q8_1_avx512vnni<Block>,             \
                         vec_dot_affine_mlx_q8_1_neon<Block>, vec_dot_affine_mlx_q8_1_dotprod<Block>),                                        \
         erase_quantize_weighted<quantize_row_affine_mlx_weighted<Block>>}
        MOE_DETAIL_AFFINE_ROW(affine3_g32, "AFFINE3_G32", BlockAffine3G32),
        MOE_DETAIL_AFFINE_ROW(affine3_g64, "AFFINE3_G64", BlockAffine3G64),
        MOE_DETAIL_AFFINE_ROW(affine3_g128, "AFFINE3_G128", BlockAffine3G128),
        MOE_DETAIL_AFFINE_ROW(affine4_g32, "AFFINE4_G32", BlockAffine4G32),
        MOE_DETAIL_AFFINE_ROW(affine4_g64, "AFFINE4_G64", BlockAffine4G64),
        MOE_DETAIL_AFFINE_ROW(affine4_g128, "AFFINE4_G128", BlockAffine4G128),
#undef MOE_DETAIL_AFFINE_ROW
    };
    for (const QuantType& t : table)
        if ((uint32_t)t.type == id) return &t;
    return nullptr;
}

// An activation format: its block geometry and quantizer per ISA (SIMD ones bit-exact with _ref;
// the AVX2 quantizers serve every x86 level).
struct ActType {
    ActFormat format;
    int block_elems, block_bytes;
    QuantizeRowFn quantize[kIsaCount];  // by Isa, nullptr as in QuantType::dot
};

inline const ActType& act_type(ActFormat f) {
    static const ActType table[kActFormatCount] = {
        {ActFormat::f32, 1, sizeof(float), {erase_quantize<quantize_row_f32_ref>, nullptr, nullptr, nullptr, nullptr, nullptr}},
        {ActFormat::q8_0, kQK, sizeof(BlockQ8_0),
         {erase_quantize<quantize_act_q8_0_ref>, MOE_DETAIL_IF_AVX2(erase_quantize<quantize_act_q8_0_avx2>), nullptr, nullptr,
          MOE_DETAIL_IF_NEON(erase_quantize<quantize_act_q8_0_neon>), nullptr}},
        {ActFormat::q8_k, kQKK, sizeof(BlockQ8K),
         {erase_quantize<quantize_row_q8k_ref>, MOE_DETAIL_IF_AVX2(erase_quantize<quantize_row_q8k_avx2>), nullptr, nullptr,
          MOE_DETAIL_IF_NEON(erase_quantize<quantize_row_q8k_neon>), nullptr}},
        // Scalar only: an activation row is quantized once per matrix, far below the matmul's cost.
        {ActFormat::q8_1, kQK, sizeof(BlockQ8_1), {erase_quantize<quantize_act_q8_1_ref>, nullptr, nullptr, nullptr, nullptr, nullptr}},
        {ActFormat::q8_0_rot, kQTQ, sizeof(BlockQ8Rot), {erase_quantize<quantize_act_q8_0_rot_ref>, nullptr, nullptr, nullptr, nullptr, nullptr}},
        {ActFormat::q8_gemm, kQK, sizeof(BlockQ8G), {erase_quantize<quantize_act_q8g_ref>, nullptr, nullptr, nullptr, nullptr, nullptr}},
        {ActFormat::q8_gemm_k, kQKK, (int)sizeof(BlockQ8G) * (kQKK / kQK),
         {erase_quantize<quantize_act_q8gk_ref>, nullptr, nullptr, nullptr, nullptr, nullptr}},
        {ActFormat::q8_0_split, 128, sizeof(BlockQ8Split),
         {erase_quantize<quantize_act_q8_split_ref>, MOE_DETAIL_IF_AVX2(erase_quantize<quantize_act_q8_split<quantize_act_q8_0_avx2>>), nullptr,
          nullptr, nullptr, nullptr}},
    };
    return table[(int)f];
}

inline size_t act_row_bytes(ActFormat f, int64_t n) { return (size_t)(n / act_type(f).block_elems) * (size_t)act_type(f).block_bytes; }

// Row kernels of one ISA that read another activation format than their type's row (the format's
// block must divide the row length): {type, isa, format, kernel, its scalar _ref twin}. Bound by
// row_kernel().
struct AltRowKernel {
    TensorType type;
    Isa isa;
    ActFormat act;
    VecDotFn dot, ref;
};
inline const std::vector<AltRowKernel>& alt_row_kernels() {
    static const std::vector<AltRowKernel> table = {
#if MOE_DETAIL_HAS_AVX512
        {TensorType::q4_0, Isa::avx512_vnni, ActFormat::q8_0_split, erase_dot<vec_dot_q4_0_q8_split_avx512vnni>,
         erase_dot<vec_dot_q4_0_q8_split_ref>},
        {TensorType::iq4_nl, Isa::avx512_vnni, ActFormat::q8_0_split, erase_dot<vec_dot_iq4nl_q8_split_avx512vnni>,
         erase_dot<vec_dot_iq4nl_q8_split_ref>},
        {TensorType::mxfp4, Isa::avx512_vnni, ActFormat::q8_0_split, erase_dot<vec_dot_mxfp4_q8_split_avx512vnni>,
         erase_dot<vec_dot_mxfp4_q8_split_ref>},
#endif
    };
    return table;
}

#undef MOE_DETAIL_DOTS
#undef MOE_DETAIL_IF_AVX2
#undef MOE_DETAIL_IF_AVX512
#undef MOE_DETAIL_IF_NEON
#undef MOE_DETAIL_IF_DOTPROD

}  // namespace detail
}  // namespace moe

namespace moe {
namespace detail {

//-----------------------------------------------------------------------------
// [SECTION] KERNEL DISPATCH
//-----------------------------------------------------------------------------
// >>dispatch  The best ISA is detected once (x86: cpuid + xgetbv; AArch64: NEON always, dotprod
// from getauxval); force_isa() can lower it for tests and benchmarks. A Model resolves its kernels
// when it is loaded, so one binary runs on any CPU.

inline Isa detect_isa() {
#if MOE_DETAIL_HAS_X86
    int level = x86_detect_level();
    if (level >= 3) return Isa::avx512_vnni;
    if (level == 2) return Isa::avx512;
    if (level == 1) return Isa::avx2;
#endif
#if MOE_DETAIL_HAS_NEON
    return arm_has_dotprod() ? Isa::neon_dotprod : Isa::neon;
#else
    return Isa::scalar;
#endif
}

inline bool is_arm_isa(Isa isa) { return isa == Isa::neon || isa == Isa::neon_dotprod; }

inline std::atomic<int>& forced_isa() {
    static std::atomic<int> isa{-1};
    return isa;
}

inline Isa active_isa() {
#if defined(MOE_USE_REFERENCE_KERNELS)
    return Isa::scalar;
#else
    int forced = forced_isa().load(std::memory_order_relaxed);
    static const Isa detected = detect_isa();
    return forced >= 0 ? (Isa)forced : detected;
#endif
}

// The kernel a table row gives `isa`: its own slot, else the next lower level of the same family
// (AVX-512 VNNI -> AVX-512 -> AVX2; dotprod -> NEON), else the scalar _ref kernel.
template <typename Fn>
inline Fn pick_for_isa(const Fn* by_isa, Isa isa) {
    const int lowest = is_arm_isa(isa) ? (int)Isa::neon : (int)Isa::avx2;
    for (int i = (int)isa; i >= lowest && i > 0; --i)
        if (by_isa[i]) return by_isa[i];
    return by_isa[0];
}

// The panel kernel of `isa` (GEMM PANELS), or nullptr where it has none: the row kernels then
// serve chunks of every size.
inline std::atomic<bool>& amx_switched_on() {
    static std::atomic<bool> on{false};
    return on;
}
inline bool amx_in_use() {
#if MOE_DETAIL_HAS_AMX
    return amx_switched_on().load(std::memory_order_relaxed) && x86_amx_usable();
#else
    return false;
#endif
}

inline GemmTileFn gemm_tile_kernel(Isa isa) {
#if MOE_DETAIL_HAS_AMX
    if (isa == Isa::avx512_vnni && amx_in_use()) return gemm_tile_amx;
#endif
#if MOE_DETAIL_HAS_AVX512
    if (isa == Isa::avx512_vnni) return gemm_tile_avx512vnni;
#endif
    (void)isa;
    return nullptr;
}

// A weight's row kernel: the activation format it reads and the dot product; and, where the type
// and the ISA have one, its panel form for chunks of many tokens (activations in q8_gemm).
struct RowKernel {
    ActFormat act = ActFormat::f32;
    VecDotFn vec_dot = nullptr;
    GemmType gemm;                  // decode == nullptr: no panel form
    GemmTileFn gemm_tile = nullptr;
    ActFormat gemm_act = ActFormat::q8_gemm;  // the panels' activations: q8_gemm_k where act is q8_k
    bool has_gemm() const { return gemm_tile != nullptr; }
};

// Gives k the panel form of type t with panel kernel `tile` (if t has one: its codes are int8 times
// a scale per 32, and its row kernels read q8_0, q8_1 or q8_k, whose codes the panels reuse).
inline void set_panel_form(const QuantType& t, GemmTileFn tile, RowKernel* k) {
    const GemmType g = gemm_type(t.type);
    const bool same_codes = t.act == ActFormat::q8_0 || t.act == ActFormat::q8_1 || t.act == ActFormat::q8_k;
    if (!tile || !g.decode || !same_codes) return;
    k->gemm = g;
    k->gemm_tile = tile;
    k->gemm_act = t.act == ActFormat::q8_k ? ActFormat::q8_gemm_k : ActFormat::q8_gemm;
}
inline const AltRowKernel* alt_row_kernel(const QuantType& t, Isa isa, int64_t cols) {
    for (const AltRowKernel& alt : alt_row_kernels())
        if (alt.type == t.type && alt.isa == isa && cols % act_type(alt.act).block_elems == 0) return &alt;
    return nullptr;
}
// The kernel for rows of `cols` elements of type t on `isa`.
inline RowKernel row_kernel(const QuantType& t, Isa isa, int64_t cols) {
    RowKernel k{t.act, pick_for_isa(t.dot, isa), {}, nullptr, ActFormat::q8_gemm};
    if (const AltRowKernel* alt = alt_row_kernel(t, isa, cols)) {
        k.act = alt->act;
        k.vec_dot = alt->dot;
    }
    set_panel_form(t, gemm_tile_kernel(isa), &k);
    return k;
}
inline RowKernel row_kernel_f32(const QuantType& t) { return {ActFormat::f32, t.dot_f32, {}, nullptr, ActFormat::q8_gemm}; }

// Quantizes one activation row with the quantizer of `isa` (f32: a copy).
inline void quantize_act_with(ActFormat f, Isa isa, void* dst, const float* x, int64_t n) {
    pick_for_isa(act_type(f).quantize, isa)(x, dst, n);
}
inline void quantize_act(ActFormat f, void* dst, const float* x, int64_t n) { quantize_act_with(f, active_isa(), dst, x, n); }

}  // namespace detail

MOE_API const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
        case Isa::avx512_vnni: return "avx512_vnni";
        case Isa::neon: return "neon";
        case Isa::neon_dotprod: return "neon_dotprod";
    }
    return "unknown";
}
MOE_API Isa detected_isa() { return detail::detect_isa(); }
MOE_API Isa current_isa() { return detail::active_isa(); }
MOE_API bool amx_available() {
#if MOE_DETAIL_HAS_AMX
    return detail::x86_amx_usable();
#else
    return false;
#endif
}
MOE_API void set_amx(bool enabled) { detail::amx_switched_on().store(enabled); }
MOE_API bool amx_enabled() { return detail::amx_in_use(); }
MOE_API Status force_isa(Isa isa) {
    if ((int)isa > (int)detail::detect_isa() || ((isa == Isa::neon || isa == Isa::neon_dotprod) != (detail::detect_isa() >= Isa::neon)))
        if (isa != Isa::scalar) return detail::fail(Status::unsupported, "ISA %s is not available on this CPU/build", isa_name(isa));
    detail::forced_isa().store((int)isa);
    return Status::ok;
}

MOE_API Status quantize_activations(TensorType weight_type, Isa isa, const float* x, int64_t n, void* dst, size_t dst_size) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)weight_type);
    if (!tt || !x || !dst || n <= 0) return detail::fail(Status::invalid_argument, "quantize_activations: bad arguments");
    const detail::ActType& at = detail::act_type(tt->act);
    if (n % at.block_elems) return detail::fail(Status::invalid_argument, "quantize_activations: n is not a multiple of %d", at.block_elems);
    if (dst_size < detail::act_row_bytes(tt->act, n)) return detail::fail(Status::invalid_argument, "quantize_activations: dst too small");
    detail::quantize_act_with(tt->act, isa, dst, x, n);
    return Status::ok;
}

MOE_API Status vec_dot(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || !weights || !x || !out || n <= 0) return detail::fail(Status::invalid_argument, "vec_dot: bad arguments");
    const detail::RowKernel k = detail::row_kernel(*tt, isa, n);
    if (n % tt->block_elems || n % detail::act_type(k.act).block_elems)
        return detail::fail(Status::invalid_argument, "vec_dot: n is not a multiple of the block size");
    std::vector<uint8_t> act(detail::act_row_bytes(k.act, n) + 64);
    detail::quantize_act_with(k.act, Isa::scalar, act.data(), x, n);
    *out = k.vec_dot(weights, act.data(), n);
    return Status::ok;
}

MOE_API Status vec_dot_ref(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || !weights || !x || !out || n <= 0) return detail::fail(Status::invalid_argument, "vec_dot_ref: bad arguments");
    const detail::AltRowKernel* alt = detail::alt_row_kernel(*tt, isa, n);
    const detail::ActFormat f = alt ? alt->act : tt->act;
    if (n % tt->block_elems || n % detail::act_type(f).block_elems)
        return detail::fail(Status::invalid_argument, "vec_dot_ref: n is not a multiple of the block size");
    std::vector<uint8_t> act(detail::act_row_bytes(f, n) + 64);
    detail::quantize_act_with(f, Isa::scalar, act.data(), x, n);
    *out = (alt ? alt->ref : tt->dot[0])(weights, act.data(), n);
    return Status::ok;
}

MOE_API Status gemm_tile(TensorType type, Isa isa, const void* weights, size_t row_bytes, int rows, const float* x, int n_tokens,
                         int64_t n, float* out) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || !weights || !x || !out || n <= 0 || rows < 1 || rows > detail::kGemmRows || n_tokens < 1 || n_tokens > detail::kGemmTokens)
        return detail::fail(Status::invalid_argument, "gemm_tile: bad arguments");
    if (n % tt->block_elems) return detail::fail(Status::invalid_argument, "gemm_tile: n is not a multiple of the block size");
    detail::RowKernel k = detail::row_kernel(*tt, isa, n);
    if (isa == Isa::scalar) detail::set_panel_form(*tt, detail::gemm_tile_ref, &k);  // the _ref tile: any CPU
    if (!k.has_gemm()) return detail::fail(Status::unsupported, "gemm_tile: no panel kernel for %s on %s", tt->name, isa_name(isa));
    if (n % detail::act_type(k.gemm_act).block_elems) return detail::fail(Status::invalid_argument, "gemm_tile: bad n");
    const size_t act_bytes = detail::act_row_bytes(k.gemm_act, n);
    std::vector<uint8_t> act(act_bytes * (size_t)n_tokens + 64);
    const detail::BlockQ8G* rows_x[detail::kGemmTokens];
    for (int t = 0; t < n_tokens; ++t) {
        detail::quantize_act_with(k.gemm_act, Isa::scalar, act.data() + act_bytes * (size_t)t, x + n * t, n);
        rows_x[t] = reinterpret_cast<const detail::BlockQ8G*>(act.data() + act_bytes * (size_t)t);
    }
    detail::AlignedBuffer<uint8_t> buf;
    if (!buf.allocate(detail::GemmScratch::bytes(n))) return detail::fail(Status::out_of_memory, "out of memory");
    detail::GemmScratch scratch;
    scratch.carve(buf.data, n);
    detail::gemm_pack(k.gemm, static_cast<const uint8_t*>(weights), row_bytes, rows, n, &scratch);
    float tile[detail::kGemmTokens * detail::kGemmRows];
    k.gemm_tile(scratch.panel, rows_x, n_tokens, tile);
    for (int t = 0; t < n_tokens; ++t)
        for (int r = 0; r < rows; ++r) out[t * rows + r] = tile[t * detail::kGemmRows + r];
    return Status::ok;
}

namespace detail {
struct AttKernels {
    void (*scores)(const float*, int64_t, int, const uint8_t*, size_t, int, int, float, float*, int) = att_scores_ref;
    void (*values)(const float*, int, int, const uint8_t*, size_t, int, int, float*) = att_values_ref;
    void (*exp)(float*, int) = att_exp_ref;
};
// The attention kernels of `isa`; false where it has none (the forward pass then keeps dot_f32 and loops).
inline bool att_kernels(Isa isa, AttKernels* k) {
    *k = AttKernels();
    if (isa == Isa::scalar) return true;
#if MOE_DETAIL_HAS_AVX512
    if ((isa == Isa::avx512 || isa == Isa::avx512_vnni) && (int)isa <= (int)detect_isa()) {
        k->scores = att_scores_avx512;
        k->values = att_values_avx512;
        k->exp = att_exp_avx512;
        return true;
    }
#endif
    return false;
}
}  // namespace detail

MOE_API Status attention_step(Isa isa, const float* q, int nq, const float* keys, const float* values, int n, int hk, int hv, int64_t row_floats,
                              float scale, float* scores, float* acc) {
    if (!q || !keys || !values || !scores || !acc || nq < 1 || n < 1 || hk < 1 || hv < 1 || row_floats < std::max(hk, hv))
        return detail::fail(Status::invalid_argument, "attention_step: bad arguments");
    detail::AttKernels k;
    if (!detail::att_kernels(isa, &k)) return detail::fail(Status::unsupported, "attention_step: no attention kernels on %s", isa_name(isa));
    const size_t rb = (size_t)row_floats * sizeof(float);
    k.scores(q, hk, nq, reinterpret_cast<const uint8_t*>(keys), rb, n, hk, scale, scores, n);
    for (int i = 0; i < nq; ++i) {
        float* row = scores + (size_t)i * (size_t)n;
        const float mx = *std::max_element(row, row + n);
        for (int j = 0; j < n; ++j) row[j] -= mx;
        k.exp(row, n);
    }
    k.values(scores, n, nq, reinterpret_cast<const uint8_t*>(values), rb, n, hv, acc);
    return Status::ok;
}

MOE_API Status attention_exp(Isa isa, float* x, int n) {
    if (!x || n < 0) return detail::fail(Status::invalid_argument, "attention_exp: bad arguments");
    detail::AttKernels k;
    if (!detail::att_kernels(isa, &k)) return detail::fail(Status::unsupported, "attention_exp: no attention kernels on %s", isa_name(isa));
    k.exp(x, n);
    return Status::ok;
}

MOE_API Status quantize_row(TensorType type, const float* src, void* dst, int64_t n) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || !src || !dst || n < 0 || n % tt->block_elems) return detail::fail(Status::invalid_argument, "quantize_row: bad type or length");
    if (!tt->quantize_ref)
        return detail::fail(Status::unsupported, "quantize_row: %s is dequantize-only here (quantize it with llama-quantize and an importance matrix)", tt->name);
    tt->quantize_ref(src, dst, n);
    return Status::ok;
}

MOE_API Status quantize_row_weighted(TensorType type, const float* src, void* dst, int64_t n, const float* importance) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!importance || !tt || !tt->quantize_weighted) return quantize_row(type, src, dst, n);
    if (!src || !dst || n < 0 || n % tt->block_elems) return detail::fail(Status::invalid_argument, "quantize_row_weighted: bad type or length");
    for (int64_t i = 0; i < n; ++i)
        if (!(importance[i] >= 0) || !std::isfinite(importance[i]))
            return detail::fail(Status::invalid_argument, "quantize_row_weighted: importance[%lld] is negative or not finite", (long long)i);
    tt->quantize_weighted(src, dst, n, importance);
    return Status::ok;
}

MOE_API bool quantize_uses_importance(TensorType type) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    return tt && tt->quantize_weighted;
}

MOE_API Status dequantize_row(TensorType type, const void* src, float* dst, int64_t n) {
    const detail::QuantType* tt = detail::quant_type((uint32_t)type);
    if (!tt || !src || !dst || n < 0 || n % tt->block_elems) return detail::fail(Status::invalid_argument, "dequantize_row: bad type or length");
    tt->dequantize_ref(src, dst, n);
    return Status::ok;
}

namespace detail {

//-----------------------------------------------------------------------------
// [SECTION] THREAD POOL
//-----------------------------------------------------------------------------
// >>threads  A persistent pool. run(fn) calls fn(thread_index, n_threads) on every thread including
// the caller and returns when all are done. A forward pass is ONE run(): its phases are separated
// by barrier(), a spin barrier (well under a microsecond), so workers never sleep inside a token;
// they spin about a millisecond after a run, then sleep on a condition variable. Between barriers
// threads take chunks of work from a shared counter (grab), which the barrier resets: dynamic
// chunks absorb uneven thread speeds that a static split would turn into waiting.
// One pool per Session, so sessions on different threads never contend.

inline void cpu_relax() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_ia32_pause();
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

class ThreadPool {
public:
    typedef void (*TaskFn)(void* ctx, int ith, int nth);

    explicit ThreadPool(int n_threads) : n_threads_(MOE_DETAIL_HAS_THREADS ? std::min(kMaxThreads, std::max(1, n_threads)) : 1) {
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
        for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
#endif
    }
    ~ThreadPool() {
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
        stop_.store(true);
        generation_.fetch_add(1);
        { std::lock_guard<std::mutex> lock(mutex_); }
        wake_.notify_all();
        for (std::thread& t : workers_) t.join();
#endif
    }
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    // How long barrier() spins before it yields (default 100 us, see there).
    void set_yield_after(std::chrono::microseconds us) { yield_after_ = us; }

    void run(TaskFn fn, void* ctx) {
        work_next_.store(0, std::memory_order_relaxed);
        if (n_threads_ == 1) { fn(ctx, 0, 1); return; }
#if MOE_DETAIL_HAS_OPENMP
#pragma omp parallel num_threads(n_threads_)
        fn(ctx, omp_get_thread_num(), omp_get_num_threads());
#elif MOE_DETAIL_HAS_THREADS
        // Spinning workers see the new generation without any lock; sleeping ones need the mutex
        // handshake (generation and sleepers_ are seq_cst, so one side always sees the other).
        task_ = fn; ctx_ = ctx;
        pending_.store(n_threads_ - 1, std::memory_order_relaxed);
        generation_.fetch_add(1);
        if (sleepers_.load() > 0) {
            { std::lock_guard<std::mutex> lock(mutex_); }
            wake_.notify_all();
        }
        fn(ctx, 0, n_threads_);
        while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
#endif
    }

    template <typename F> void parallel_for(F&& f) {
        run([](void* c, int ith, int nth) { (*static_cast<F*>(c))(ith, nth); }, &f);
    }

    // Waits until all nth threads of the current run() arrive; the last one resets the work counter.
    // Two levels (groups of kBarrierGroup threads, then the groups) so that no cache line takes more
    // than a few contended increments (about 1.5 us per barrier at 16 threads on the device host).
    void barrier(int ith, int nth) {
        if (nth <= 1) { work_next_.store(0, std::memory_order_relaxed); return; }
        const uint32_t phase = barrier_phase_.load(std::memory_order_acquire);
        const int group = ith / kBarrierGroup, n_groups = (nth + kBarrierGroup - 1) / kBarrierGroup;
        const int group_size = std::min(kBarrierGroup, nth - group * kBarrierGroup);
        std::atomic<int>& arrived = group_arrived_[group].value;
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == group_size - 1) {
            arrived.store(0, std::memory_order_relaxed);
            if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) == n_groups - 1) {
                barrier_count_.store(0, std::memory_order_relaxed);
                work_next_.store(0, std::memory_order_relaxed);
                barrier_phase_.store(phase + 1, std::memory_order_release);
                return;
            }
        }
#if MOE_DETAIL_HAS_THREADS
        // Spin; once a late thread has kept us ~100 us (yield_after_) it is probably descheduled
        // (more threads than free cores), so yield from then on. Yielding sooner costs a syscall per
        // wait: -20% decode measured on a 2-vCPU VM with a 512-spin limit.
        std::chrono::steady_clock::time_point start;
        bool yielding = false;
        for (uint32_t spin = 1; barrier_phase_.load(std::memory_order_acquire) == phase; ++spin) {
            if (yielding) { std::this_thread::yield(); continue; }
            cpu_relax();
            if ((spin & 255) == 0) {
                const auto now = std::chrono::steady_clock::now();
                if (spin == 256) start = now;
                else yielding = now - start > yield_after_;
            }
        }
#else
        while (barrier_phase_.load(std::memory_order_acquire) == phase) cpu_relax();
#endif
    }
    // Hands out [begin, begin + chunk) of the current phase's work; begin >= total means done.
    int64_t grab(int64_t chunk) { return work_next_.fetch_add(chunk, std::memory_order_relaxed); }
    // Guided chunks of [0, total): each takes 1/(2 nth) of what is left (at least min_chunk), so the
    // first chunks are long sequential streams and the last ones are short. False when all is taken.
    bool grab_guided(int64_t total, int64_t min_chunk, int nth, int64_t* begin, int64_t* end) {
        int64_t cur = work_next_.load(std::memory_order_relaxed);
        for (;;) {
            if (cur >= total) return false;
            const int64_t chunk = std::max(min_chunk, (total - cur) / (2 * (int64_t)nth));
            if (work_next_.compare_exchange_weak(cur, cur + chunk, std::memory_order_relaxed)) {
                *begin = cur;
                *end = std::min(total, cur + chunk);
                return true;
            }
        }
    }

private:
    static constexpr int kMaxThreads = 512, kBarrierGroup = 4;
    struct alignas(64) PaddedCounter { std::atomic<int> value{0}; };
    int n_threads_;
    std::chrono::microseconds yield_after_{100};
    PaddedCounter group_arrived_[kMaxThreads / kBarrierGroup];
    alignas(64) std::atomic<int64_t> work_next_{0};
    alignas(64) std::atomic<int> barrier_count_{0};
    alignas(64) std::atomic<uint32_t> barrier_phase_{0};
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
    void worker(int index) {
        uint64_t seen = 0;
        for (;;) {
            uint64_t gen = generation_.load(std::memory_order_acquire);
            if (gen == seen) {  // spin ~1 ms (decode calls run() once per token), then sleep
                auto start = std::chrono::steady_clock::now();
                for (uint32_t spin = 1; gen == seen; ++spin) {
                    cpu_relax();
                    gen = generation_.load(std::memory_order_acquire);
                    if ((spin & 255) == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(1000)) break;
                }
            }
            if (gen == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                sleepers_.fetch_add(1);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
                sleepers_.fetch_sub(1);
                gen = generation_.load();
            }
            seen = gen;
            if (stop_.load()) return;
            fn_and_run(index);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    void fn_and_run(int index) { task_(ctx_, index, n_threads_); }  // task_/ctx_ were written before generation_
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0}, sleepers_{0};
    std::atomic<bool> stop_{false};
    TaskFn task_ = nullptr;
    void* ctx_ = nullptr;
#endif
};

// Even split of [0, n) into nth contiguous ranges.
inline void split_range(int64_t n, int ith, int nth, int64_t* begin, int64_t* end) {
    *begin = n * ith / nth;
    *end = n * (ith + 1) / nth;
}

}  // namespace detail
}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] TOKENIZER IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>tokenizer
// Tokenizers built from a GGUF's tokenizer.ggml.* metadata (see the TOKENIZER declarations).
//  - Byte-level BPE ("gpt2"): special tokens are cut out of the text first; each remaining fragment
//    is split into words by its family's pre-tokenizer regex (hand-written matchers below: no
//    std::regex, which is slow and knows no \p{L}); each word's bytes become GPT-2's printable
//    stand-in code points, which are merged pairwise by merge rank (lowest first, leftmost on ties).
//  - SentencePiece ("llama"): spaces become U+2581 and a space is prefixed to the text (and to each
//    fragment after a special token); the adjacent pair whose concatenation is a vocabulary piece of
//    highest score is merged until none is left; leftovers fall back to <0xXX> byte pieces.
// Behaviour follows Hugging Face tokenizers and llama.cpp's llama-vocab.cpp (read for reference,
// nothing copied) and is checked against llama.cpp's ggml-vocab-*.gguf.inp/.out test vectors.
// Unicode classes come from tools/gen_unicode_tables.py. Everything here is read-only after load.

#include <initializer_list>
#include <string_view>

namespace moe {
namespace detail {

// Unicode class of a code point, as the pre-tokenizer regexes see it: \p{L}, \p{N}, \p{M}, \p{P},
// \p{S}, \s (the White_Space property) or anything else (controls, unassigned, invalid bytes).
enum class UnicodeClass : uint8_t { other = 0, letter = 1, number = 2, mark = 3, punctuation = 4, symbol = 5, space = 6 };

// >>unicode-tables (regenerate with: python3 tools/gen_unicode_tables.py)
// Generated by tools/gen_unicode_tables.py from Unicode 14.0.0: do not edit by hand.
static const uint32_t kUnicodeClassRuns[2217] = {
    0x0, 0x4e, 0x70, 0x106, 0x10c, 0x125, 0x12c, 0x15d,
    0x164, 0x182, 0x1d4, 0x1e5, 0x1fc, 0x209, 0x2dc, 0x2f5,
    0x2fc, 0x305, 0x309, 0x3dc, 0x3e5, 0x3ec, 0x3f5, 0x3f8,
    0x42e, 0x430, 0x506, 0x50c, 0x515, 0x53c, 0x545, 0x551,
    0x55c, 0x565, 0x568, 0x575, 0x592, 0x5a5, 0x5a9, 0x5b4,
    0x5c5, 0x5ca, 0x5d1, 0x5dc, 0x5e2, 0x5fc, 0x601, 0x6bd,
    0x6c1, 0x7bd, 0x7c1, 0x1615, 0x1631, 0x1695, 0x1701, 0x172d,
    0x1761, 0x176d, 0x1771, 0x177d, 0x1803, 0x1b81, 0x1bad, 0x1bb1,
    0x1bc0, 0x1bd1, 0x1bf4, 0x1bf9, 0x1c00, 0x1c25, 0x1c31, 0x1c3c,
    0x1c41, 0x1c58, 0x1c61, 0x1c68, 0x1c71, 0x1d10, 0x1d19, 0x1fb5,
    0x1fb9, 0x2415, 0x241b, 0x2451, 0x2980, 0x2989, 0x2ab8, 0x2ac9,
    0x2ad4, 0x2b01, 0x2c4c, 0x2c58, 0x2c6d, 0x2c80, 0x2c8b, 0x2df4,
    0x2dfb, 0x2e04, 0x2e0b, 0x2e1c, 0x2e23, 0x2e34, 0x2e3b, 0x2e40,
    0x2e81, 0x2f58, 0x2f79, 0x2f9c, 0x2fa8, 0x3035, 0x304c, 0x305d,
    0x3064, 0x3075, 0x3083, 0x30dc, 0x30e0, 0x30ec, 0x3101, 0x325b,
    0x3302, 0x3354, 0x3371, 0x3383, 0x3389, 0x36a4, 0x36a9, 0x36b3,
    0x36e8, 0x36f5, 0x36fb, 0x3729, 0x373b, 0x374d, 0x3753, 0x3771,
    0x3782, 0x37d1, 0x37ed, 0x37f9, 0x3804, 0x3870, 0x3881, 0x388b,
    0x3891, 0x3983, 0x3a58, 0x3a69, 0x3d33, 0x3d89, 0x3d90, 0x3e02,
    0x3e51, 0x3f5b, 0x3fa1, 0x3fb5, 0x3fbc, 0x3fd1, 0x3fd8, 0x3feb,
    0x3ff5, 0x4001, 0x40b3, 0x40d1, 0x40db, 0x4121, 0x412b, 0x4141,
    0x414b, 0x4170, 0x4184, 0x41f8, 0x4201, 0x42cb, 0x42e0, 0x42f4,
    0x42f8, 0x4301, 0x4358, 0x4381, 0x4445, 0x4449, 0x4478, 0x44c3,
    0x4501, 0x4653, 0x4710, 0x471b, 0x4821, 0x49d3, 0x49e9, 0x49f3,
    0x4a81, 0x4a8b, 0x4ac1, 0x4b13, 0x4b24, 0x4b32, 0x4b84, 0x4b89,
    0x4c0b, 0x4c20, 0x4c29, 0x4c68, 0x4c79, 0x4c88, 0x4c99, 0x4d48,
    0x4d51, 0x4d88, 0x4d91, 0x4d98, 0x4db1, 0x4dd0, 0x4de3, 0x4de9,
    0x4df3, 0x4e28, 0x4e3b, 0x4e48, 0x4e5b, 0x4e71, 0x4e78, 0x4ebb,
    0x4ec0, 0x4ee1, 0x4ef0, 0x4ef9, 0x4f13, 0x4f20, 0x4f32, 0x4f81,
    0x4f95, 0x4fa2, 0x4fd5, 0x4fe1, 0x4fec, 0x4ff3, 0x4ff8, 0x500b,
    0x5020, 0x5029, 0x5058, 0x5079, 0x5088, 0x5099, 0x5148, 0x5151,
    0x5188, 0x5191, 0x51a0, 0x51a9, 0x51b8, 0x51c1, 0x51d0, 0x51e3,
    0x51e8, 0x51f3, 0x5218, 0x523b, 0x5248, 0x525b, 0x5270, 0x528b,
    0x5290, 0x52c9, 0x52e8, 0x52f1, 0x52f8, 0x5332, 0x5383, 0x5391,
    0x53ab, 0x53b4, 0x53b8, 0x540b, 0x5420, 0x5429, 0x5470, 0x5479,
    0x5490, 0x5499, 0x5548, 0x5551, 0x5588, 0x5591, 0x55a0, 0x55a9,
    0x55d0, 0x55e3, 0x55e9, 0x55f3, 0x5630, 0x563b, 0x5650, 0x565b,
    0x5670, 0x5681, 0x5688, 0x5701, 0x5713, 0x5720, 0x5732, 0x5784,
    0x578d, 0x5790, 0x57c9, 0x57d3, 0x5800, 0x580b, 0x5820, 0x5829,
    0x5868, 0x5879, 0x5888, 0x5899, 0x5948, 0x5951, 0x5988, 0x5991,
    0x59a0, 0x59a9, 0x59d0, 0x59e3, 0x59e9, 0x59f3, 0x5a28, 0x5a3b,
    0x5a48, 0x5a5b, 0x5a70, 0x5aab, 0x5ac0, 0x5ae1, 0x5af0, 0x5af9,
    0x5b13, 0x5b20, 0x5b32, 0x5b85, 0x5b89, 0x5b92, 0x5bc0, 0x5c13,
    0x5c19, 0x5c20, 0x5c29, 0x5c58, 0x5c71, 0x5c88, 0x5c91, 0x5cb0,
    0x5cc9, 0x5cd8, 0x5ce1, 0x5ce8, 0x5cf1, 0x5d00, 0x5d19, 0x5d28,
    0x5d41, 0x5d58, 0x5d71, 0x5dd0, 0x5df3, 0x5e18, 0x5e33, 0x5e48,
    0x5e53, 0x5e70, 0x5e81, 0x5e88, 0x5ebb, 0x5ec0, 0x5f32, 0x5f9d,
    0x5fd8, 0x6003, 0x6029, 0x6068, 0x6071, 0x6088, 0x6091, 0x6148,
    0x6151, 0x61d0, 0x61e3, 0x61e9, 0x61f3, 0x6228, 0x6233, 0x6248,
    0x6253, 0x6270, 0x62ab, 0x62b8, 0x62c1, 0x62d8, 0x62e9, 0x62f0,
    0x6301, 0x6313, 0x6320, 0x6332, 0x6380, 0x63bc, 0x63c2, 0x63fd,
    0x6401, 0x640b, 0x6424, 0x6429, 0x6468, 0x6471, 0x6488, 0x6491,
    0x6548, 0x6551, 0x65a0, 0x65a9, 0x65d0, 0x65e3, 0x65e9, 0x65f3,
    0x6628, 0x6633, 0x6648, 0x6653, 0x6670, 0x66ab, 0x66b8, 0x66e9,
    0x66f8, 0x6701, 0x6713, 0x6720, 0x6732, 0x6780, 0x6789, 0x6798,
    0x6803, 0x6821, 0x6868, 0x6871, 0x6888, 0x6891, 0x69db, 0x69e9,
    0x69f3, 0x6a28, 0x6a33, 0x6a48, 0x6a53, 0x6a71, 0x6a7d, 0x6a80,
    0x6aa1, 0x6abb, 0x6ac2, 0x6af9, 0x6b13, 0x6b20, 0x6b32, 0x6bcd,
    0x6bd1, 0x6c00, 0x6c0b, 0x6c20, 0x6c29, 0x6cb8, 0x6cd1, 0x6d90,
    0x6d99, 0x6de0, 0x6de9, 0x6df0, 0x6e01, 0x6e38, 0x6e53, 0x6e58,
    0x6e7b, 0x6ea8, 0x6eb3, 0x6eb8, 0x6ec3, 0x6f00, 0x6f32, 0x6f80,
    0x6f93, 0x6fa4, 0x6fa8, 0x7009, 0x718b, 0x7191, 0x71a3, 0x71d8,
    0x71fd, 0x7201, 0x723b, 0x727c, 0x7282, 0x72d4, 0x72e0, 0x7409,
    0x7418, 0x7421, 0x7428, 0x7431, 0x7458, 0x7461, 0x7520, 0x7529,
    0x7530, 0x7539, 0x758b, 0x7591, 0x75a3, 0x75e9, 0x75f0, 0x7601,
    0x7628, 0x7631, 0x7638, 0x7643, 0x7670, 0x7682, 0x76d0, 0x76e1,
    0x7700, 0x7801, 0x780d, 0x7824, 0x789d, 0x78a4, 0x78ad, 0x78c3,
    0x78d5, 0x7902, 0x79a5, 0x79ab, 0x79b5, 0x79bb, 0x79c5, 0x79cb,
    0x79d4, 0x79f3, 0x7a01, 0x7a40, 0x7a49, 0x7b68, 0x7b8b, 0x7c2c,
    0x7c33, 0x7c41, 0x7c6b, 0x7cc0, 0x7ccb, 0x7de8, 0x7df5, 0x7e33,
    0x7e3d, 0x7e68, 0x7e75, 0x7e84, 0x7ead, 0x7ecc, 0x7ed8, 0x8001,
    0x815b, 0x81f9, 0x8202, 0x8254, 0x8281, 0x82b3, 0x82d1, 0x82f3,
    0x8309, 0x8313, 0x8329, 0x833b, 0x8371, 0x838b, 0x83a9, 0x8413,
    0x8471, 0x847b, 0x8482, 0x84d3, 0x84f5, 0x8501, 0x8630, 0x8639,
    0x8640, 0x8669, 0x8670, 0x8681, 0x87dc, 0x87e1, 0x9248, 0x9251,
    0x9270, 0x9281, 0x92b8, 0x92c1, 0x92c8, 0x92d1, 0x92f0, 0x9301,
    0x9448, 0x9451, 0x9470, 0x9481, 0x9588, 0x9591, 0x95b0, 0x95c1,
    0x95f8, 0x9601, 0x9608, 0x9611, 0x9630, 0x9641, 0x96b8, 0x96c1,
    0x9888, 0x9891, 0x98b0, 0x98c1, 0x9ad8, 0x9aeb, 0x9b04, 0x9b4a,
    0x9be8, 0x9c01, 0x9c85, 0x9cd0, 0x9d01, 0x9fb0, 0x9fc1, 0x9ff0,
    0xa004, 0xa009, 0xb36d, 0xb374, 0xb379, 0xb406, 0xb409, 0xb4dc,
    0xb4e8, 0xb501, 0xb75c, 0xb772, 0xb789, 0xb7c8, 0xb801, 0xb893,
    0xb8b0, 0xb8f9, 0xb993, 0xb9ac, 0xb9b8, 0xba01, 0xba93, 0xbaa0,
    0xbb01, 0xbb68, 0xbb71, 0xbb88, 0xbb93, 0xbba0, 0xbc01, 0xbda3,
    0xbea4, 0xbeb9, 0xbec4, 0xbedd, 0xbee1, 0xbeeb, 0xbef0, 0xbf02,
    0xbf50, 0xbf82, 0xbfd0, 0xc004, 0xc05b, 0xc070, 0xc07b, 0xc082,
    0xc0d0, 0xc101, 0xc3c8, 0xc401, 0xc42b, 0xc439, 0xc54b, 0xc551,
    0xc558, 0xc581, 0xc7b0, 0xc801, 0xc8f8, 0xc903, 0xc960, 0xc983,
    0xc9e0, 0xca05, 0xca08, 0xca24, 0xca32, 0xca81, 0xcb70, 0xcb81,
    0xcba8, 0xcc01, 0xcd60, 0xcd81, 0xce50, 0xce82, 0xced8, 0xcef5,
    0xd001, 0xd0bb, 0xd0e0, 0xd0f4, 0xd101, 0xd2ab, 0xd2f8, 0xd303,
    0xd3e8, 0xd3fb, 0xd402, 0xd450, 0xd482, 0xd4d0, 0xd504, 0xd539,
    0xd544, 0xd570, 0xd583, 0xd678, 0xd803, 0xd829, 0xd9a3, 0xda29,
    0xda68, 0xda82, 0xdad4, 0xdb0d, 0xdb5b, 0xdba5, 0xdbec, 0xdbf8,
    0xdc03, 0xdc19, 0xdd0b, 0xdd71, 0xdd82, 0xddd1, 0xdf33, 0xdfa0,
    0xdfe4, 0xe001, 0xe123, 0xe1c0, 0xe1dc, 0xe202, 0xe250, 0xe269,
    0xe282, 0xe2d1, 0xe3f4, 0xe401, 0xe448, 0xe481, 0xe5d8, 0xe5e9,
    0xe604, 0xe640, 0xe683, 0xe69c, 0xe6a3, 0xe749, 0xe76b, 0xe771,
    0xe7a3, 0xe7a9, 0xe7bb, 0xe7d1, 0xe7d8, 0xe801, 0xee03, 0xf001,
    0xf8b0, 0xf8c1, 0xf8f0, 0xf901, 0xfa30, 0xfa41, 0xfa70, 0xfa81,
    0xfac0, 0xfac9, 0xfad0, 0xfad9, 0xfae0, 0xfae9, 0xfaf0, 0xfaf9,
    0xfbf0, 0xfc01, 0xfda8, 0xfdb1, 0xfded, 0xfdf1, 0xfdfd, 0xfe11,
    0xfe28, 0xfe31, 0xfe6d, 0xfe81, 0xfea0, 0xfeb1, 0xfee0, 0xfeed,
    0xff01, 0xff6d, 0xff80, 0xff91, 0xffa8, 0xffb1, 0xffed, 0xfff8,
    0x10006, 0x10058, 0x10084, 0x10146, 0x10150, 0x1017e, 0x10184, 0x10225,
    0x1022c, 0x10295, 0x1029c, 0x102fe, 0x10300, 0x10382, 0x10389, 0x10390,
    0x103a2, 0x103d5, 0x103ec, 0x103f9, 0x10402, 0x10455, 0x1046c, 0x10478,
    0x10481, 0x104e8, 0x10505, 0x10608, 0x10683, 0x10788, 0x10805, 0x10811,
    0x1081d, 0x10839, 0x10845, 0x10851, 0x108a5, 0x108a9, 0x108b5, 0x108c9,
    0x108f5, 0x10921, 0x1092d, 0x10931, 0x1093d, 0x10941, 0x1094d, 0x10951,
    0x10975, 0x10979, 0x109d5, 0x109e1, 0x10a05, 0x10a29, 0x10a55, 0x10a71,
    0x10a7d, 0x10a82, 0x10c19, 0x10c2a, 0x10c55, 0x10c60, 0x10c85, 0x11844,
    0x11865, 0x1194c, 0x1195d, 0x12138, 0x12205, 0x12258, 0x12302, 0x124e5,
    0x12752, 0x12805, 0x13b44, 0x13bb2, 0x13ca5, 0x13e2c, 0x13e3d, 0x13f34,
    0x13f85, 0x14c1c, 0x14ccd, 0x14ec4, 0x14ee5, 0x14fe4, 0x14ff5, 0x15ba0,
    0x15bb5, 0x15cb0, 0x15cbd, 0x16001, 0x1672d, 0x16759, 0x1677b, 0x16791,
    0x167a0, 0x167cc, 0x167ea, 0x167f4, 0x16801, 0x16930, 0x16939, 0x16940,
    0x16969, 0x16970, 0x16981, 0x16b40, 0x16b79, 0x16b84, 0x16b88, 0x16bfb,
    0x16c01, 0x16cb8, 0x16d01, 0x16d38, 0x16d41, 0x16d78, 0x16d81, 0x16db8,
    0x16dc1, 0x16df8, 0x16e01, 0x16e38, 0x16e41, 0x16e78, 0x16e81, 0x16eb8,
    0x16ec1, 0x16ef8, 0x16f03, 0x17004, 0x17179, 0x17184, 0x17285, 0x17294,
    0x172f0, 0x17405, 0x174d0, 0x174dd, 0x177a0, 0x17805, 0x17eb0, 0x17f85,
    0x17fe0, 0x18006, 0x1800c, 0x18025, 0x18029, 0x1803a, 0x18044, 0x18095,
    0x180a4, 0x18105, 0x1810a, 0x18153, 0x18184, 0x18189, 0x181b5, 0x181c2,
    0x181d9, 0x181ec, 0x181f5, 0x18200, 0x18209, 0x184b8, 0x184cb, 0x184dd,
    0x184e9, 0x18504, 0x18509, 0x187dc, 0x187e1, 0x18800, 0x18829, 0x18980,
    0x18989, 0x18c78, 0x18c85, 0x18c92, 0x18cb5, 0x18d01, 0x18e05, 0x18f20,
    0x18f81, 0x19005, 0x190f8, 0x19102, 0x19155, 0x19242, 0x19285, 0x1928a,
    0x19305, 0x19402, 0x19455, 0x1958a, 0x19605, 0x1a001, 0x26e05, 0x27001,
    0x52468, 0x52485, 0x52638, 0x52681, 0x527f4, 0x52801, 0x5306c, 0x53081,
    0x53102, 0x53151, 0x53160, 0x53201, 0x5337b, 0x5339c, 0x533a3, 0x533f4,
    0x533f9, 0x534f3, 0x53501, 0x53732, 0x53783, 0x53794, 0x537c0, 0x53805,
    0x538b9, 0x53905, 0x53911, 0x53c4d, 0x53c59, 0x53e58, 0x53e81, 0x53e90,
    0x53e99, 0x53ea0, 0x53ea9, 0x53ed0, 0x53f91, 0x54013, 0x54019, 0x54033,
    0x54039, 0x5405b, 0x54061, 0x5411b, 0x54145, 0x54163, 0x54168, 0x54182,
    0x541b5, 0x541d0, 0x54201, 0x543a4, 0x543c0, 0x54403, 0x54411, 0x545a3,
    0x54630, 0x54674, 0x54682, 0x546d0, 0x54703, 0x54791, 0x547c4, 0x547d9,
    0x547e4, 0x547e9, 0x547fb, 0x54802, 0x54851, 0x54933, 0x54974, 0x54981,
    0x54a3b, 0x54aa0, 0x54afc, 0x54b01, 0x54be8, 0x54c03, 0x54c21, 0x54d9b,
    0x54e0c, 0x54e70, 0x54e79, 0x54e82, 0x54ed0, 0x54ef4, 0x54f01, 0x54f2b,
    0x54f31, 0x54f82, 0x54fd1, 0x54ff8, 0x55001, 0x5514b, 0x551b8, 0x55201,
    0x5521b, 0x55221, 0x55263, 0x55270, 0x55282, 0x552d0, 0x552e4, 0x55301,
    0x553bd, 0x553d1, 0x553db, 0x553f1, 0x55583, 0x55589, 0x55593, 0x555a9,
    0x555bb, 0x555c9, 0x555f3, 0x55601, 0x5560b, 0x55611, 0x55618, 0x556d9,
    0x556f4, 0x55701, 0x5575b, 0x55784, 0x55791, 0x557ab, 0x557b8, 0x55809,
    0x55838, 0x55849, 0x55878, 0x55889, 0x558b8, 0x55901, 0x55938, 0x55941,
    0x55978, 0x55981, 0x55add, 0x55ae1, 0x55b55, 0x55b60, 0x55b81, 0x55f1b,
    0x55f5c, 0x55f63, 0x55f70, 0x55f82, 0x55fd0, 0x56001, 0x6bd20, 0x6bd81,
    0x6be38, 0x6be59, 0x6bfe0, 0x7c801, 0x7d370, 0x7d381, 0x7d6d0, 0x7d801,
    0x7d838, 0x7d899, 0x7d8c0, 0x7d8e9, 0x7d8f3, 0x7d8f9, 0x7d94d, 0x7d951,
    0x7d9b8, 0x7d9c1, 0x7d9e8, 0x7d9f1, 0x7d9f8, 0x7da01, 0x7da10, 0x7da19,
    0x7da28, 0x7da31, 0x7dd95, 0x7de18, 0x7de99, 0x7e9f4, 0x7ea05, 0x7ea81,
    0x7ec80, 0x7ec91, 0x7ee40, 0x7ee7d, 0x7ee80, 0x7ef81, 0x7efe5, 0x7f003,
    0x7f084, 0x7f0d0, 0x7f103, 0x7f184, 0x7f298, 0x7f2a4, 0x7f315, 0x7f31c,
    0x7f325, 0x7f338, 0x7f344, 0x7f34d, 0x7f354, 0x7f360, 0x7f381, 0x7f3a8,
    0x7f3b1, 0x7f7e8, 0x7f80c, 0x7f825, 0x7f82c, 0x7f85d, 0x7f864, 0x7f882,
    0x7f8d4, 0x7f8e5, 0x7f8fc, 0x7f909, 0x7f9dc, 0x7f9f5, 0x7f9fc, 0x7fa05,
    0x7fa09, 0x7fadc, 0x7fae5, 0x7faec, 0x7faf5, 0x7fafc, 0x7fb31, 0x7fdf8,
    0x7fe11, 0x7fe40, 0x7fe51, 0x7fe80, 0x7fe91, 0x7fec0, 0x7fed1, 0x7fee8,
    0x7ff05, 0x7ff38, 0x7ff45, 0x7ff78, 0x7ffe5, 0x7fff0, 0x80001, 0x80060,
    0x80069, 0x80138, 0x80141, 0x801d8, 0x801e1, 0x801f0, 0x801f9, 0x80270,
    0x80281, 0x802f0, 0x80401, 0x807d8, 0x80804, 0x80818, 0x8083a, 0x809a0,
    0x809bd, 0x80a02, 0x80bcd, 0x80c52, 0x80c65, 0x80c78, 0x80c85, 0x80ce8,
    0x80d05, 0x80d08, 0x80e85, 0x80feb, 0x80ff0, 0x81401, 0x814e8, 0x81501,
    0x81688, 0x81703, 0x8170a, 0x817e0, 0x81801, 0x81902, 0x81920, 0x81969,
    0x81a0a, 0x81a11, 0x81a52, 0x81a58, 0x81a81, 0x81bb3, 0x81bd8, 0x81c01,
    0x81cf0, 0x81cfc, 0x81d01, 0x81e20, 0x81e41, 0x81e84, 0x81e8a, 0x81eb0,
    0x82001, 0x824f0, 0x82502, 0x82550, 0x82581, 0x826a0, 0x826c1, 0x827e0,
    0x82801, 0x82940, 0x82981, 0x82b20, 0x82b7c, 0x82b81, 0x82bd8, 0x82be1,
    0x82c58, 0x82c61, 0x82c98, 0x82ca1, 0x82cb0, 0x82cb9, 0x82d10, 0x82d19,
    0x82d90, 0x82d99, 0x82dd0, 0x82dd9, 0x82de8, 0x83001, 0x839b8, 0x83a01,
    0x83ab0, 0x83b01, 0x83b40, 0x83c01, 0x83c30, 0x83c39, 0x83d88, 0x83d91,
    0x83dd8, 0x84001, 0x84030, 0x84041, 0x84048, 0x84051, 0x841b0, 0x841b9,
    0x841c8, 0x841e1, 0x841e8, 0x841f9, 0x842b0, 0x842bc, 0x842c2, 0x84301,
    0x843bd, 0x843ca, 0x84401, 0x844f8, 0x8453a, 0x84580, 0x84701, 0x84798,
    0x847a1, 0x847b0, 0x847da, 0x84801, 0x848b2, 0x848e0, 0x848fc, 0x84901,
    0x849d0, 0x849fc, 0x84a00, 0x84c01, 0x84dc0, 0x84de2, 0x84df1, 0x84e02,
    0x84e80, 0x84e92, 0x85001, 0x8500b, 0x85020, 0x8502b, 0x85038, 0x85063,
    0x85081, 0x850a0, 0x850a9, 0x850c0, 0x850c9, 0x851b0, 0x851c3, 0x851d8,
    0x851fb, 0x85202, 0x85248, 0x85284, 0x852c8, 0x85301, 0x853ea, 0x853fc,
    0x85401, 0x854ea, 0x85500, 0x85601, 0x85645, 0x85649, 0x8572b, 0x85738,
    0x8575a, 0x85784, 0x857b8, 0x85801, 0x859b0, 0x859cc, 0x85a01, 0x85ab0,
    0x85ac2, 0x85b01, 0x85b98, 0x85bc2, 0x85c01, 0x85c90, 0x85ccc, 0x85ce8,
    0x85d4a, 0x85d80, 0x86001, 0x86248, 0x86401, 0x86598, 0x86601, 0x86798,
    0x867d2, 0x86801, 0x86923, 0x86940, 0x86982, 0x869d0, 0x87302, 0x873f8,
    0x87401, 0x87550, 0x8755b, 0x8756c, 0x87570, 0x87581, 0x87590, 0x87801,
    0x878ea, 0x87939, 0x87940, 0x87981, 0x87a33, 0x87a8a, 0x87aac, 0x87ad0,
    0x87b81, 0x87c13, 0x87c34, 0x87c50, 0x87d81, 0x87e2a, 0x87e60, 0x87f01,
    0x87fb8, 0x88003, 0x88019, 0x881c3, 0x8823c, 0x88270, 0x88292, 0x88383,
    0x88389, 0x8839b, 0x883a9, 0x883b0, 0x883fb, 0x88419, 0x88583, 0x885dc,
    0x885e8, 0x885f4, 0x88613, 0x88618, 0x88681, 0x88748, 0x88782, 0x887d0,
    0x88803, 0x88819, 0x8893b, 0x889a8, 0x889b2, 0x88a04, 0x88a21, 0x88a2b,
    0x88a39, 0x88a40, 0x88a81, 0x88b9b, 0x88ba4, 0x88bb1, 0x88bb8, 0x88c03,
    0x88c19, 0x88d9b, 0x88e09, 0x88e2c, 0x88e4b, 0x88e6c, 0x88e73, 0x88e82,
    0x88ed1, 0x88edc, 0x88ee1, 0x88eec, 0x88f00, 0x88f0a, 0x88fa8, 0x89001,
    0x89090, 0x89099, 0x89163, 0x891c4, 0x891f3, 0x891f8, 0x89401, 0x89438,
    0x89441, 0x89448, 0x89451, 0x89470, 0x89479, 0x894f0, 0x894f9, 0x8954c,
    0x89550, 0x89581, 0x896fb, 0x89758, 0x89782, 0x897d0, 0x89803, 0x89820,
    0x89829, 0x89868, 0x89879, 0x89888, 0x89899, 0x89948, 0x89951, 0x89988,
    0x89991, 0x899a0, 0x899a9, 0x899d0, 0x899db, 0x899e9, 0x899f3, 0x89a28,
    0x89a3b, 0x89a48, 0x89a5b, 0x89a70, 0x89a81, 0x89a88, 0x89abb, 0x89ac0,
    0x89ae9, 0x89b13, 0x89b20, 0x89b33, 0x89b68, 0x89b83, 0x89ba8, 0x8a001,
    0x8a1ab, 0x8a239, 0x8a25c, 0x8a282, 0x8a2d4, 0x8a2e0, 0x8a2ec, 0x8a2f3,
    0x8a2f9, 0x8a310, 0x8a401, 0x8a583, 0x8a621, 0x8a634, 0x8a639, 0x8a640,
    0x8a682, 0x8a6d0, 0x8ac01, 0x8ad7b, 0x8adb0, 0x8adc3, 0x8ae0c, 0x8aec1,
    0x8aee3, 0x8aef0, 0x8b001, 0x8b183, 0x8b20c, 0x8b221, 0x8b228, 0x8b282,
    0x8b2d0, 0x8b304, 0x8b368, 0x8b401, 0x8b55b, 0x8b5c1, 0x8b5cc, 0x8b5d0,
    0x8b602, 0x8b650, 0x8b801, 0x8b8d8, 0x8b8eb, 0x8b960, 0x8b982, 0x8b9e4,
    0x8b9fd, 0x8ba01, 0x8ba38, 0x8c001, 0x8c163, 0x8c1dc, 0x8c1e0, 0x8c501,
    0x8c702, 0x8c798, 0x8c7f9, 0x8c838, 0x8c849, 0x8c850, 0x8c861, 0x8c8a0,
    0x8c8a9, 0x8c8b8, 0x8c8c1, 0x8c983, 0x8c9b0, 0x8c9bb, 0x8c9c8, 0x8c9db,
    0x8c9f9, 0x8ca03, 0x8ca09, 0x8ca13, 0x8ca24, 0x8ca38, 0x8ca82, 0x8cad0,
    0x8cd01, 0x8cd40, 0x8cd51, 0x8ce8b, 0x8cec0, 0x8ced3, 0x8cf09, 0x8cf14,
    0x8cf19, 0x8cf23, 0x8cf28, 0x8d001, 0x8d00b, 0x8d059, 0x8d19b, 0x8d1d1,
    0x8d1db, 0x8d1fc, 0x8d23b, 0x8d240, 0x8d281, 0x8d28b, 0x8d2e1, 0x8d453,
    0x8d4d4, 0x8d4e9, 0x8d4f4, 0x8d518, 0x8d581, 0x8d7c8, 0x8e001, 0x8e048,
    0x8e051, 0x8e17b, 0x8e1b8, 0x8e1c3, 0x8e201, 0x8e20c, 0x8e230, 0x8e282,
    0x8e368, 0x8e384, 0x8e391, 0x8e480, 0x8e493, 0x8e540, 0x8e54b, 0x8e5b8,
    0x8e801, 0x8e838, 0x8e841, 0x8e850, 0x8e859, 0x8e98b, 0x8e9b8, 0x8e9d3,
    0x8e9d8, 0x8e9e3, 0x8e9f0, 0x8e9fb, 0x8ea31, 0x8ea3b, 0x8ea40, 0x8ea82,
    0x8ead0, 0x8eb01, 0x8eb30, 0x8eb39, 0x8eb48, 0x8eb51, 0x8ec53, 0x8ec78,
    0x8ec83, 0x8ec90, 0x8ec9b, 0x8ecc1, 0x8ecc8, 0x8ed02, 0x8ed50, 0x8f701,
    0x8f79b, 0x8f7bc, 0x8f7c8, 0x8fd81, 0x8fd88, 0x8fe02, 0x8fead, 0x8ff90,
    0x8fffc, 0x90001, 0x91cd0, 0x92002, 0x92378, 0x92384, 0x923a8, 0x92401,
    0x92a20, 0x97c81, 0x97f8c, 0x97f98, 0x98001, 0x9a178, 0xa2001, 0xa3238,
    0xb4001, 0xb51c8, 0xb5201, 0xb52f8, 0xb5302, 0xb5350, 0xb5374, 0xb5381,
    0xb55f8, 0xb5602, 0xb5650, 0xb5681, 0xb5770, 0xb5783, 0xb57ac, 0xb57b0,
    0xb5801, 0xb5983, 0xb59bc, 0xb59e5, 0xb5a01, 0xb5a24, 0xb5a2d, 0xb5a30,
    0xb5a82, 0xb5ad0, 0xb5ada, 0xb5b10, 0xb5b19, 0xb5bc0, 0xb5be9, 0xb5c80,
    0xb7201, 0xb7402, 0xb74bc, 0xb74d8, 0xb7801, 0xb7a58, 0xb7a7b, 0xb7a81,
    0xb7a8b, 0xb7c40, 0xb7c7b, 0xb7c99, 0xb7d00, 0xb7f01, 0xb7f14, 0xb7f19,
    0xb7f23, 0xb7f28, 0xb7f83, 0xb7f90, 0xb8001, 0xc3fc0, 0xc4001, 0xc66b0,
    0xc6801, 0xc6848, 0xd7f81, 0xd7fa0, 0xd7fa9, 0xd7fe0, 0xd7fe9, 0xd7ff8,
    0xd8001, 0xd8918, 0xd8a81, 0xd8a98, 0xd8b21, 0xd8b40, 0xd8b81, 0xd97e0,
    0xde001, 0xde358, 0xde381, 0xde3e8, 0xde401, 0xde448, 0xde481, 0xde4d0,
    0xde4e5, 0xde4eb, 0xde4fc, 0xde500, 0xe7803, 0xe7970, 0xe7983, 0xe7a38,
    0xe7a85, 0xe7e20, 0xe8005, 0xe87b0, 0xe8805, 0xe8938, 0xe894d, 0xe8b2b,
    0xe8b55, 0xe8b6b, 0xe8b98, 0xe8bdb, 0xe8c1d, 0xe8c2b, 0xe8c65, 0xe8d53,
    0xe8d75, 0xe8f58, 0xe9005, 0xe9213, 0xe922d, 0xe9230, 0xe9702, 0xe97a0,
    0xe9805, 0xe9ab8, 0xe9b02, 0xe9bc8, 0xea001, 0xea2a8, 0xea2b1, 0xea4e8,
    0xea4f1, 0xea500, 0xea511, 0xea518, 0xea529, 0xea538, 0xea549, 0xea568,
    0xea571, 0xea5d0, 0xea5d9, 0xea5e0, 0xea5e9, 0xea620, 0xea629, 0xea830,
    0xea839, 0xea858, 0xea869, 0xea8a8, 0xea8b1, 0xea8e8, 0xea8f1, 0xea9d0,
    0xea9d9, 0xea9f8, 0xeaa01, 0xeaa28, 0xeaa31, 0xeaa38, 0xeaa51, 0xeaa88,
    0xeaa91, 0xeb530, 0xeb541, 0xeb60d, 0xeb611, 0xeb6dd, 0xeb6e1, 0xeb7dd,
    0xeb7e1, 0xeb8ad, 0xeb8b1, 0xeb9ad, 0xeb9b1, 0xeba7d, 0xeba81, 0xebb7d,
    0xebb81, 0xebc4d, 0xebc51, 0xebd4d, 0xebd51, 0xebe1d, 0xebe21, 0xebe60,
    0xebe72, 0xec005, 0xed003, 0xed1bd, 0xed1db, 0xed36d, 0xed3ab, 0xed3b5,
    0xed423, 0xed42d, 0xed43c, 0xed460, 0xed4db, 0xed500, 0xed50b, 0xed580,
    0xef801, 0xef8f8, 0xf0003, 0xf0038, 0xf0043, 0xf00c8, 0xf00db, 0xf0110,
    0xf011b, 0xf0128, 0xf0133, 0xf0158, 0xf0801, 0xf0968, 0xf0983, 0xf09b9,
    0xf09f0, 0xf0a02, 0xf0a50, 0xf0a71, 0xf0a7d, 0xf0a80, 0xf1481, 0xf1573,
    0xf1578, 0xf1601, 0xf1763, 0xf1782, 0xf17d0, 0xf17fd, 0xf1800, 0xf3f01,
    0xf3f38, 0xf3f41, 0xf3f60, 0xf3f69, 0xf3f78, 0xf3f81, 0xf3ff8, 0xf4001,
    0xf4628, 0xf463a, 0xf4683, 0xf46b8, 0xf4801, 0xf4a23, 0xf4a59, 0xf4a60,
    0xf4a82, 0xf4ad0, 0xf4af4, 0xf4b00, 0xf638a, 0xf6565, 0xf656a, 0xf6585,
    0xf658a, 0xf65a8, 0xf680a, 0xf6975, 0xf697a, 0xf69f0, 0xf7001, 0xf7020,
    0xf7029, 0xf7100, 0xf7109, 0xf7118, 0xf7121, 0xf7128, 0xf7139, 0xf7140,
    0xf7149, 0xf7198, 0xf71a1, 0xf71c0, 0xf71c9, 0xf71d0, 0xf71d9, 0xf71e0,
    0xf7211, 0xf7218, 0xf7239, 0xf7240, 0xf7249, 0xf7250, 0xf7259, 0xf7260,
    0xf7269, 0xf7280, 0xf7289, 0xf7298, 0xf72a1, 0xf72a8, 0xf72b9, 0xf72c0,
    0xf72c9, 0xf72d0, 0xf72d9, 0xf72e0, 0xf72e9, 0xf72f0, 0xf72f9, 0xf7300,
    0xf7309, 0xf7318, 0xf7321, 0xf7328, 0xf7339, 0xf7358, 0xf7361, 0xf7398,
    0xf73a1, 0xf73c0, 0xf73c9, 0xf73e8, 0xf73f1, 0xf73f8, 0xf7401, 0xf7450,
    0xf7459, 0xf74e0, 0xf7509, 0xf7520, 0xf7529, 0xf7550, 0xf7559, 0xf75e0,
    0xf7785, 0xf7790, 0xf8005, 0xf8160, 0xf8185, 0xf84a0, 0xf8505, 0xf8578,
    0xf858d, 0xf8600, 0xf860d, 0xf8680, 0xf868d, 0xf87b0, 0xf8802, 0xf886d,
    0xf8d70, 0xf8f35, 0xf9018, 0xf9085, 0xf91e0, 0xf9205, 0xf9248, 0xf9285,
    0xf9290, 0xf9305, 0xf9330, 0xf9805, 0xfb6c0, 0xfb6ed, 0xfb768, 0xfb785,
    0xfb7e8, 0xfb805, 0xfbba0, 0xfbc05, 0xfbec8, 0xfbf05, 0xfbf60, 0xfbf85,
    0xfbf88, 0xfc005, 0xfc060, 0xfc085, 0xfc240, 0xfc285, 0xfc2d0, 0xfc305,
    0xfc440, 0xfc485, 0xfc570, 0xfc585, 0xfc590, 0xfc805, 0xfd2a0, 0xfd305,
    0xfd370, 0xfd385, 0xfd3a8, 0xfd3c5, 0xfd3e8, 0xfd405, 0xfd438, 0xfd485,
    0xfd568, 0xfd585, 0xfd5d8, 0xfd605, 0xfd630, 0xfd685, 0xfd6d0, 0xfd705,
    0xfd740, 0xfd785, 0xfd7b8, 0xfd805, 0xfdc98, 0xfdca5, 0xfde58, 0xfdf82,
    0xfdfd0, 0x100001, 0x153700, 0x153801, 0x15b9c8, 0x15ba01, 0x15c0f0, 0x15c101,
    0x167510, 0x167581, 0x175f08, 0x17c001, 0x17d0f0, 0x180001, 0x189a58, 0x700803,
    0x700f80,
};
static const uint32_t kDeepseekLetterRanges[84][2] = {
    {0x41, 0x5a}, {0x61, 0x7a}, {0xb5, 0xb5}, {0xc0, 0xd6}, {0xd8, 0xf6}, {0xf8, 0x1ba},
    {0x1bc, 0x1bf}, {0x1c4, 0x293}, {0x295, 0x2af}, {0x370, 0x373}, {0x376, 0x377}, {0x37b, 0x37d},
    {0x37f, 0x37f}, {0x386, 0x386}, {0x388, 0x38a}, {0x38c, 0x38c}, {0x38e, 0x3a1}, {0x3a3, 0x3f5},
    {0x3f7, 0x481}, {0x48a, 0x52f}, {0x531, 0x556}, {0x10a0, 0x10c5}, {0x13a0, 0x13f5}, {0x13f8, 0x13fd},
    {0x1c90, 0x1cba}, {0x1cbd, 0x1cbf}, {0x1d00, 0x1d2b}, {0x1d6b, 0x1d77}, {0x1d79, 0x1d9a}, {0x1e00, 0x1f15},
    {0x1f18, 0x1f1d}, {0x1f20, 0x1f45}, {0x1f48, 0x1f4d}, {0x1f50, 0x1f57}, {0x1f59, 0x1f59}, {0x1f5b, 0x1f5b},
    {0x1f5d, 0x1f5d}, {0x1f5f, 0x1f7d}, {0x1f80, 0x1fb4}, {0x1fb6, 0x1fbc}, {0x1fbe, 0x1fbe}, {0x1fc2, 0x1fc4},
    {0x1fc6, 0x1fcc}, {0x1fd0, 0x1fd3}, {0x1fd6, 0x1fdb}, {0x1fe0, 0x1fec}, {0x1ff2, 0x1ff4}, {0x1ff6, 0x1ffc},
    {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210a, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211d}, {0x2124, 0x2124},
    {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212a, 0x212d}, {0x212f, 0x2134}, {0x2139, 0x2139}, {0x213c, 0x213f},
    {0x2145, 0x2149}, {0x214e, 0x214e}, {0x2183, 0x2184}, {0x2c00, 0x2c7b}, {0x2c7e, 0x2ce4}, {0x2ceb, 0x2cee},
    {0x2cf2, 0x2cf3}, {0xa640, 0xa66d}, {0xa680, 0xa69b}, {0xa722, 0xa76f}, {0xa771, 0xa787}, {0xa78b, 0xa78e},
    {0xab70, 0xabbf}, {0xfb00, 0xfb06}, {0xfb13, 0xfb17}, {0xff21, 0xff3a}, {0xff41, 0xff5a}, {0x10400, 0x1044f},
    {0x104b0, 0x104d3}, {0x104d8, 0x104fb}, {0x10c80, 0x10cb2}, {0x10cc0, 0x10cf2}, {0x118a0, 0x118df}, {0x1e900, 0x1e943},
};
// <<unicode-tables

inline UnicodeClass unicode_class(uint32_t cp) {
    if (cp < 0x80) {  // ASCII fast path for the common classes
        if ((cp | 0x20) - 'a' < 26u) return UnicodeClass::letter;
        if (cp - '0' < 10u) return UnicodeClass::number;
        if (cp == ' ' || cp - 9u < 5u) return UnicodeClass::space;
    }
    if (cp > 0x10ffff) return UnicodeClass::other;  // an invalid byte (see encode_bpe_fragment)
    // The run holding cp is the last one that starts at or before it.
    size_t lo = 0, hi = sizeof(kUnicodeClassRuns) / sizeof(kUnicodeClassRuns[0]);
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((kUnicodeClassRuns[mid] >> 3) <= cp) lo = mid; else hi = mid;
    }
    return (UnicodeClass)(kUnicodeClassRuns[lo] & 7);
}

inline bool deepseek_is_letter(uint32_t cp) {
    size_t lo = 0, hi = sizeof(kDeepseekLetterRanges) / sizeof(kDeepseekLetterRanges[0]);
    while (lo < hi) {  // first range whose end is >= cp
        size_t mid = (lo + hi) / 2;
        if (kDeepseekLetterRanges[mid][1] < cp) lo = mid + 1; else hi = mid;
    }
    return lo < sizeof(kDeepseekLetterRanges) / sizeof(kDeepseekLetterRanges[0]) && kDeepseekLetterRanges[lo][0] <= cp;
}

//--- UTF-8 --------------------------------------------------------------------------------------

// The UTF-8 sequence at s[0..n), n >= 1. Returns its length (1..4) with the code point in *cp when
// valid; 0 when s holds only the valid start of a longer sequence (more bytes may complete it);
// -k when the first k bytes are ill-formed (k = the "maximal subpart" that one U+FFFD replaces,
// Unicode §3.9). Overlongs, surrogates and code points above U+10FFFF are ill-formed.
inline int utf8_sequence(const unsigned char* s, size_t n, uint32_t* cp) {
    unsigned char b = s[0];
    if (b < 0x80) { *cp = b; return 1; }
    int need;
    uint32_t v;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the next byte
    if (b >= 0xc2 && b <= 0xdf) { need = 1; v = b & 0x1fu; }
    else if (b >= 0xe0 && b <= 0xef) { need = 2; v = b & 0x0fu; if (b == 0xe0) lo = 0xa0; if (b == 0xed) hi = 0x9f; }
    else if (b >= 0xf0 && b <= 0xf4) { need = 3; v = b & 0x07u; if (b == 0xf0) lo = 0x90; if (b == 0xf4) hi = 0x8f; }
    else return -1;
    for (int i = 1; i <= need; ++i) {
        if ((size_t)i >= n) return 0;
        unsigned char c = s[i];
        if (c < lo || c > hi) return -i;
        lo = 0x80;
        hi = 0xbf;
        v = (v << 6) | (c & 0x3fu);
    }
    *cp = v;
    return need + 1;
}

// Appends s[0..n) to *out as valid UTF-8: each ill-formed subpart becomes U+FFFD. With
// hold_incomplete, a valid but unfinished sequence at the end is not appended; returns the number
// of bytes consumed (n minus what is held back, at most 3 bytes).
inline size_t utf8_append_sanitized(std::string* out, const char* s, size_t n, bool hold_incomplete) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(s);
    size_t i = 0;
    while (i < n) {
        size_t run = i;  // copy runs of valid sequences in one go
        uint32_t cp;
        int r = 0;
        while (run < n && (r = utf8_sequence(p + run, n - run, &cp)) > 0) run += (size_t)r;
        out->append(s + i, run - i);
        i = run;
        if (i == n) break;
        if (r == 0) {  // a valid start cut off by the end of the buffer
            if (hold_incomplete) return i;
            out->append("\xef\xbf\xbd");
            return n;
        }
        out->append("\xef\xbf\xbd");
        i += (size_t)(-r);
    }
    return n;
}

// GPT-2's byte-level alphabet: every byte gets a printable stand-in code point, so that the BPE
// vocabulary never holds raw control bytes or spaces. Printable Latin-1 bytes stand for themselves;
// the other 68 bytes map, in order, to U+0100..U+0143 (so ' ' is 'Ġ' U+0120, '\n' is 'Ċ' U+010A).
struct ByteLevelCodec {
    char utf8[256][2];       // UTF-8 of each byte's stand-in
    uint8_t utf8_len[256];   // 1 or 2
    int16_t byte_of[0x144];  // stand-in code point -> byte, -1 for others
};

inline const ByteLevelCodec& byte_level_codec() {
    static const ByteLevelCodec codec = [] {
        ByteLevelCodec c;
        for (int16_t& b : c.byte_of) b = -1;
        uint32_t next_extra = 0x100;
        for (uint32_t b = 0; b < 256; ++b) {
            bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
            uint32_t cp = printable ? b : next_extra++;
            c.byte_of[cp] = (int16_t)b;
            if (cp < 0x80) {
                c.utf8[b][0] = (char)cp;
                c.utf8_len[b] = 1;
            } else {
                c.utf8[b][0] = (char)(0xc0 | (cp >> 6));
                c.utf8[b][1] = (char)(0x80 | (cp & 0x3f));
                c.utf8_len[b] = 2;
            }
        }
        return c;
    }();
    return codec;
}

// "<0x41>" -> 0x41; -1 if `text` is not a byte piece.
inline int parse_byte_piece(const std::string& text) {
    if (text.size() != 6 || text[0] != '<' || text[1] != '0' || text[2] != 'x' || text[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; ++i) {
        char c = text[(size_t)i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

//--- Pre-tokenizers ---------------------------------------------------------------------------
// Each splits a fragment of n code points (cp, with classes cls) into words and appends the end
// index of every word to *ends; the words cover the fragment. Lookahead never crosses the
// fragment's end, as with a regex run on the fragment alone. Invalid bytes have class `other`.

inline bool pretok_is_space(const uint8_t* cls, size_t i) { return cls[i] == (uint8_t)UnicodeClass::space; }
inline bool pretok_is_letter(const uint8_t* cls, size_t i) { return cls[i] == (uint8_t)UnicodeClass::letter; }
inline bool pretok_is_number(const uint8_t* cls, size_t i) { return cls[i] == (uint8_t)UnicodeClass::number; }
// [^\s\p{L}\p{N}]
inline bool pretok_is_other(const uint8_t* cls, size_t i) {
    return !pretok_is_space(cls, i) && !pretok_is_letter(cls, i) && !pretok_is_number(cls, i);
}
inline bool pretok_is_newline(uint32_t c) { return c == '\r' || c == '\n'; }
inline uint32_t pretok_ascii_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// 's 't 're 've 'm 'll 'd at i (ASCII case-insensitive when ignore_case): the match end, or i.
inline size_t match_contraction(const uint32_t* cp, size_t i, size_t n, bool ignore_case) {
    if (cp[i] != '\'' || i + 1 >= n) return i;
    uint32_t a = ignore_case ? pretok_ascii_lower(cp[i + 1]) : cp[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 >= n) return i;
    uint32_t b = ignore_case ? pretok_ascii_lower(cp[i + 2]) : cp[i + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    return i;
}

// \s+(?!\S)|\s+ at a whitespace code point i: the whole run, less its last code point when more
// than one and followed by a non-space (which then starts the next word, e.g. " word").
inline size_t match_space_run(const uint8_t* cls, size_t i, size_t n) {
    size_t e = i;
    while (e < n && pretok_is_space(cls, e)) ++e;
    if (e < n && e - i > 1) return e - 1;
    return e;
}

// \s*[\r\n]+|\s+(?!\S)|\s+ at a whitespace code point i: up to and including the run's last newline
// when it has one, else as match_space_run. Elsewhere (no alternative matched) one code point.
inline size_t match_space_or_newlines(const uint32_t* cp, const uint8_t* cls, size_t i, size_t n) {
    size_t run = i, last_newline = 0;
    for (; run < n && pretok_is_space(cls, run); ++run)
        if (pretok_is_newline(cp[run])) last_newline = run + 1;
    if (run == i) return i + 1;
    return last_newline ? last_newline : match_space_run(cls, i, n);
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
inline void pretokenize_gpt2(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<uint32_t>* ends) {
    size_t i = 0;
    while (i < n) {
        size_t e = match_contraction(cp, i, n, false);
        if (e == i) {
            size_t q = (cp[i] == ' ' && i + 1 < n) ? i + 1 : i;  // the optional leading space
            if (pretok_is_letter(cls, q)) {
                for (e = q + 1; e < n && pretok_is_letter(cls, e);) ++e;
            } else if (pretok_is_number(cls, q)) {
                for (e = q + 1; e < n && pretok_is_number(cls, e);) ++e;
            } else if (pretok_is_other(cls, q)) {
                for (e = q + 1; e < n && pretok_is_other(cls, e);) ++e;
            } else {
                e = match_space_run(cls, i, n);
            }
        }
        ends->push_back((uint32_t)e);
        i = e;
    }
}

// Llama 3 (max_digits 3) and Qwen2 (max_digits 1):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+
// Qwen3.5 (max_digits 1, with_marks): the same with [\p{L}\p{M}]+ for \p{L}+ and [^\s\p{L}\p{M}\p{N}]
// for [^\s\p{L}\p{N}], so that combining marks stay in their word.
inline void pretokenize_llama3(const uint32_t* cp, const uint8_t* cls, size_t n, size_t max_digits, bool with_marks,
                               std::vector<uint32_t>* ends) {
    auto wordlike = [&](size_t j) { return pretok_is_letter(cls, j) || (with_marks && cls[j] == (uint8_t)UnicodeClass::mark); };
    size_t i = 0;
    while (i < n) {
        size_t e = match_contraction(cp, i, n, true);
        if (e == i) {
            uint32_t c = cp[i];
            size_t q = (c == ' ' && i + 1 < n) ? i + 1 : i;
            bool letters_next = wordlike(i) || (i + 1 < n && wordlike(i + 1));
            if (!pretok_is_newline(c) && !pretok_is_number(cls, i) && letters_next) {
                // [^\r\n\p{L}\p{N}]?\p{L}+ : one optional non-letter (a space, '(', a mark...) then letters
                for (e = i + 1; e < n && wordlike(e);) ++e;
            } else if (pretok_is_number(cls, i)) {
                for (e = i + 1; e < n && e - i < max_digits && pretok_is_number(cls, e);) ++e;
            } else if (pretok_is_other(cls, q) && !wordlike(q)) {
                for (e = q + 1; e < n && pretok_is_other(cls, e) && !wordlike(e);) ++e;
                while (e < n && pretok_is_newline(cp[e])) ++e;
            } else {
                e = match_space_or_newlines(cp, cls, i, n);
            }
        }
        ends->push_back((uint32_t)e);
        i = e;
    }
}

// Kimi K2, as llama.cpp's hand-written splitter for it reads the regex
//   [\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}|
//   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// (the tokenizer's own regex tells upper from lower case letters and counts \p{M} as a letter; that
// splitter does neither: a word is any run of letters other than Han). Han is kimi_is_han's ranges.
inline bool kimi_is_han(uint32_t c) {
    return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x20000 && c <= 0x2a6df) ||
           (c >= 0x2a700 && c <= 0x2ebef) || (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);
}
inline void pretokenize_kimi_k2(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<uint32_t>* ends) {
    auto word_letter = [&](size_t j) { return pretok_is_letter(cls, j) && !kimi_is_han(cp[j]); };
    size_t i = 0;
    while (i < n) {
        size_t e;
        uint32_t c = cp[i];
        size_t q = (c == ' ' && i + 1 < n) ? i + 1 : i;
        if (kimi_is_han(c)) {
            for (e = i + 1; e < n && kimi_is_han(cp[e]);) ++e;
        } else if (word_letter(i) || (!pretok_is_newline(c) && !pretok_is_letter(cls, i) && !pretok_is_number(cls, i) &&
                                      i + 1 < n && word_letter(i + 1))) {
            for (e = i + 1; e < n && word_letter(e);) ++e;
            if (e < n) e = match_contraction(cp, e, n, true);  // an optional contraction suffix
        } else if (pretok_is_number(cls, i)) {
            for (e = i + 1; e < n && e - i < 3 && pretok_is_number(cls, e);) ++e;
        } else if (pretok_is_other(cls, q)) {
            for (e = q + 1; e < n && pretok_is_other(cls, e);) ++e;
            while (e < n && pretok_is_newline(cp[e])) ++e;
        } else {
            e = match_space_or_newlines(cp, cls, i, n);
        }
        ends->push_back((uint32_t)e);
        i = e;
    }
}

// GPT-4o's o200k (gpt-oss, Llama 4, MiniMax-M2), as llama.cpp runs it: std::regex over the text with
// every non-ASCII code point collapsed to one stand-in per class (unicode.cpp), and \p{M} left out:
//   [^\r\n\p{L}\p{N}]?U*W+C?|[^\r\n\p{L}\p{N}]?U+W*C?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
// U = a letter but not a-z, W = a letter but not A-Z, C = (?i:'s|'t|'re|'ve|'m|'ll|'d). The collapse
// loses case, so a non-ASCII letter is both U and W. Matching is leftmost-first with backtracking:
// "ÀB" gives "À" (U* backs off until W+ can take the À), then "B".
inline void pretokenize_gpt4o(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<uint32_t>* ends) {
    auto upper = [&](size_t j) { return pretok_is_letter(cls, j) && !(cp[j] >= 'a' && cp[j] <= 'z'); };
    auto lower = [&](size_t j) { return pretok_is_letter(cls, j) && !(cp[j] >= 'A' && cp[j] <= 'Z'); };
    size_t i = 0;
    while (i < n) {
        size_t e = i;
        uint32_t c = cp[i];
        // the optional [^\r\n\p{L}\p{N}] prefix: taken whenever present (no letters after it: no word)
        size_t q = (!pretok_is_newline(c) && !pretok_is_letter(cls, i) && !pretok_is_number(cls, i)) ? i + 1 : i;
        size_t u = q;
        while (u < n && upper(u)) ++u;
        if (u < n && lower(u)) {
            for (e = u + 1; e < n && lower(e);) ++e;  // U*W+
        } else {
            for (size_t k = u; k > q; --k)  // U* gives back letters until W+ can match one
                if (lower(k - 1)) { e = k; break; }
            if (e == i && u > q) e = u;  // U+W* (W* is empty here)
        }
        if (e > i) {
            if (e < n) e = match_contraction(cp, e, n, true);
        } else if (pretok_is_number(cls, i)) {
            for (e = i + 1; e < n && e - i < 3 && pretok_is_number(cls, e);) ++e;
        } else {
            size_t p = (c == ' ' && i + 1 < n && pretok_is_other(cls, i + 1)) ? i + 1 : i;
            if (pretok_is_other(cls, p)) {
                for (e = p + 1; e < n && pretok_is_other(cls, e);) ++e;
                while (e < n && (pretok_is_newline(cp[e]) || cp[e] == '/')) ++e;
            } else {
                e = match_space_or_newlines(cp, cls, i, n);
            }
        }
        ends->push_back((uint32_t)e);
        i = e;
    }
}

// Splits every span of `in` at the matches of one regex (matches and the text between them both
// become spans), as Hugging Face's Split(pattern, behavior="isolated") does. match(i, end) gives the
// end of the match starting at i (i if none); scanning i upwards finds the leftmost match.
struct CptSpan { uint32_t begin, end; };
template <typename Match>
inline void split_isolated(const std::vector<CptSpan>& in, std::vector<CptSpan>* out, Match match) {
    out->clear();
    for (const CptSpan& s : in) {
        uint32_t gap = s.begin, i = s.begin;
        while (i < s.end) {
            uint32_t e = (uint32_t)match(i, s.end);
            if (e > i) {
                if (gap < i) out->push_back({gap, i});
                out->push_back({i, e});
                i = gap = e;
            } else {
                ++i;
            }
        }
        if (gap < s.end) out->push_back({gap, s.end});
    }
}

inline bool deepseek_is_punct(uint32_t c) {  // [!-/:-~！-／：-～‘-‟　-。]
    return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x7e) || (c >= 0xff01 && c <= 0xff0f) ||
           (c >= 0xff1a && c <= 0xff5e) || (c >= 0x2018 && c <= 0x201f) || (c >= 0x3000 && c <= 0x3002);
}
inline bool deepseek_is_cjk(uint32_t c) {  // [一-龥ࠀ-一가-퟿]
    return (c >= 0x4e00 && c <= 0x9fa5) || (c >= 0x0800 && c <= 0x4e00) || (c >= 0xac00 && c <= 0xd7ff);
}

// DeepSeek LLM: six regexes applied one after the other, each splitting the spans of the last:
//   [\r\n]   \s?[A-Za-zµÀ-Ö...]+   \s?[!-/:-~...]+   \s+$   [一-龥ࠀ-一가-퟿]+   \p{N}+
// llama.cpp runs the ones with literal ranges over the text with every non-ASCII whitespace code
// point replaced by U+000B, so that std::wregex's \s sees it: U+2003 or U+3000 is then in no range.
inline void pretokenize_deepseek_llm(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<CptSpan>* a,
                                     std::vector<CptSpan>* b, std::vector<uint32_t>* ends) {
    auto in = [&](size_t j, bool (*in_class)(uint32_t)) { return in_class(cp[j]) && !(cp[j] >= 0x80 && pretok_is_space(cls, j)); };
    a->assign(1, CptSpan{0, (uint32_t)n});
    split_isolated(*a, b, [&](size_t i, size_t) { return pretok_is_newline(cp[i]) ? i + 1 : i; });
    // \s?[class]+ : an optional whitespace code point, then a run of the class.
    auto space_then_run = [&](size_t i, size_t end, bool (*in_class)(uint32_t)) {
        size_t q = i;
        if (pretok_is_space(cls, i) && i + 1 < end && in(i + 1, in_class)) q = i + 1;
        else if (!in(i, in_class)) return i;
        size_t e = q + 1;
        while (e < end && in(e, in_class)) ++e;
        return e;
    };
    split_isolated(*b, a, [&](size_t i, size_t end) { return space_then_run(i, end, deepseek_is_letter); });
    split_isolated(*a, b, [&](size_t i, size_t end) { return space_then_run(i, end, deepseek_is_punct); });
    // \s+$ : the trailing whitespace of each span (its leftmost match starts where that run starts).
    a->clear();
    for (const CptSpan& s : *b) {
        uint32_t t = s.end;
        while (t > s.begin && pretok_is_space(cls, t - 1)) --t;
        if (t > s.begin && t < s.end) {
            a->push_back({s.begin, t});
            a->push_back({t, s.end});
        } else {
            a->push_back(s);
        }
    }
    auto run_of = [&](size_t i, size_t end, bool (*in_class)(uint32_t)) {
        size_t e = i;
        while (e < end && in(e, in_class)) ++e;
        return e;
    };
    split_isolated(*a, b, [&](size_t i, size_t end) { return run_of(i, end, deepseek_is_cjk); });
    split_isolated(*b, a, [&](size_t i, size_t end) {
        size_t e = i;
        while (e < end && pretok_is_number(cls, e)) ++e;
        return e;
    });
    for (const CptSpan& s : *a) ends->push_back(s.end);
}

// llama.cpp's "default" (also what a GGUF without tokenizer.ggml.pre gets): four regexes one after
// the other, the first and third over class-collapsed text (see pretokenize_gpt4o):
//   [\p{P}\$\+<=>\^~\|]+   then GPT-2's   then \p{N}+   then [0-9][0-9][0-9]
// `ends` must be empty (it holds the words of one span while they are made spans).
inline void pretokenize_default(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<CptSpan>* a,
                                std::vector<CptSpan>* b, std::vector<uint32_t>* ends) {
    auto punct = [&](size_t j) {  // every ASCII punctuation or symbol but '`'; other \p{P}
        uint32_t c = cp[j];
        if (c < 0x80) return c > 0x20 && c < 0x7f && c != '`' && !((c | 0x20) - 'a' < 26u) && !(c - '0' < 10u);
        return cls[j] == (uint8_t)UnicodeClass::punctuation;
    };
    a->assign(1, CptSpan{0, (uint32_t)n});
    split_isolated(*a, b, [&](size_t i, size_t end) {
        size_t e = i;
        while (e < end && punct(e)) ++e;
        return e;
    });
    a->clear();
    for (const CptSpan& s : *b) {  // GPT-2's regex on each span
        pretokenize_gpt2(cp + s.begin, cls + s.begin, s.end - s.begin, ends);
        uint32_t begin = s.begin;
        for (uint32_t e : *ends) {
            a->push_back({begin, s.begin + e});
            begin = s.begin + e;
        }
        ends->clear();
    }
    split_isolated(*a, b, [&](size_t i, size_t end) {
        size_t e = i;
        while (e < end && pretok_is_number(cls, e)) ++e;
        return e;
    });
    split_isolated(*b, a, [&](size_t i, size_t end) {
        for (size_t k = 0; k < 3; ++k)
            if (i + k >= end || cp[i + k] - '0' >= 10u) return i;
        return i + 3;
    });
    for (const CptSpan& s : *a) ends->push_back(s.end);
}

// DeepSeek V3 (also R1, Hunyuan dense, JoyAI): three regexes applied one after the other, as
// llama.cpp runs them (std::regex; where a regex names a class, over the text with every non-ASCII
// code point collapsed to one stand-in per class, see pretokenize_gpt4o):
//   \p{N}{1,3}   then   [一-龥぀-ゟ゠-ヿ]+   then
//   [!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// An invalid byte is llama.cpp's U+FFFD there, a symbol.
inline bool deepseek_v3_is_kana_or_cjk(uint32_t c) {  // [一-龥぀-ゟ゠-ヿ]
    return (c >= 0x4e00 && c <= 0x9fa5) || (c >= 0x3040 && c <= 0x30ff);
}
inline void pretokenize_deepseek_v3(const uint32_t* cp, const uint8_t* cls, size_t n, std::vector<CptSpan>* a,
                                    std::vector<CptSpan>* b, std::vector<uint32_t>* ends) {
    auto ascii_punct = [](uint32_t c) { return c > 0x20 && c < 0x7f && !((c | 0x20) - 'a' < 26u) && !(c - '0' < 10u); };
    auto ascii_letter = [](uint32_t c) { return (c | 0x20) - 'a' < 26u; };
    auto punct_or_symbol = [&](size_t j) {  // [\p{P}\p{S}]
        if (cp[j] < 0x80) return ascii_punct(cp[j]);
        return cls[j] == (uint8_t)UnicodeClass::punctuation || cls[j] == (uint8_t)UnicodeClass::symbol || cp[j] > 0x10ffff;
    };
    auto letter_or_mark = [&](size_t j) { return pretok_is_letter(cls, j) || cls[j] == (uint8_t)UnicodeClass::mark; };
    a->assign(1, CptSpan{0, (uint32_t)n});
    split_isolated(*a, b, [&](size_t i, size_t end) {
        size_t e = i;
        while (e < end && e - i < 3 && pretok_is_number(cls, e)) ++e;
        return e;
    });
    split_isolated(*b, a, [&](size_t i, size_t end) {
        size_t e = i;
        while (e < end && deepseek_v3_is_kana_or_cjk(cp[e])) ++e;
        return e;
    });
    split_isolated(*a, b, [&](size_t i, size_t end) {
        size_t e = i;
        uint32_t c = cp[i];
        if (ascii_punct(c) && i + 1 < end && ascii_letter(cp[i + 1])) {  // [!-/:-@\[-`{-~][A-Za-z]+
            for (e = i + 2; e < end && ascii_letter(cp[e]);) ++e;
            return e;
        }
        // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ (a mark may be the prefix or the first of the run)
        bool prefix = !pretok_is_newline(c) && !pretok_is_letter(cls, i) && !punct_or_symbol(i);
        size_t q = (prefix && i + 1 < end && letter_or_mark(i + 1)) ? i + 1 : i;
        if (letter_or_mark(q)) {
            for (e = q + 1; e < end && letter_or_mark(e);) ++e;
            return e;
        }
        // ?[\p{P}\p{S}]+[\r\n]*
        q = (c == ' ' && i + 1 < end && punct_or_symbol(i + 1)) ? i + 1 : i;
        if (punct_or_symbol(q)) {
            for (e = q + 1; e < end && punct_or_symbol(e);) ++e;
            while (e < end && pretok_is_newline(cp[e])) ++e;
            return e;
        }
        if (!pretok_is_space(cls, i)) return i;  // no match here
        return match_space_or_newlines(cp, cls, i, end);
    });
    for (const CptSpan& s : *b) ends->push_back(s.end);
}

//--- Vocabulary structures ----------------------------------------------------------------------

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class VocabTokenType : uint8_t { undefined = 0, normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

// (int32, int32) -> (rank, result), open addressing with linear probing. Holds the BPE merges keyed
// by the token ids of the pair (the innermost lookup of encoding: one per candidate pair), and the
// SentencePiece set of code point pairs that occur inside some piece.
struct PairTable {
    struct Slot {
        uint64_t key;
        int32_t rank;    // BPE: position in tokenizer.ggml.merges, lower merges first
        int32_t result;  // BPE: token id of the merged pair
    };
    static constexpr uint64_t kEmpty = ~(uint64_t)0;  // never a key: ids are < 2^31
    std::vector<Slot> slots;
    size_t mask = 0;
    size_t count = 0;

    static uint64_t key(int32_t left, int32_t right) { return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right; }
    static size_t hash(uint64_t k) {
        k *= 0x9e3779b97f4a7c15ull;
        return (size_t)(k ^ (k >> 29));
    }
    // Room for n entries (it grows past that anyway).
    void init(size_t n) {
        size_t cap = 16;
        while (cap < n * 2) cap <<= 1;  // load factor <= 1/2
        slots.assign(cap, Slot{kEmpty, 0, 0});
        mask = cap - 1;
        count = 0;
    }
    // False if the pair is already present (the first, lower rank is kept).
    bool insert(int32_t left, int32_t right, int32_t rank, int32_t result) {
        if (slots.empty() || (count + 1) * 2 > slots.size()) {
            std::vector<Slot> old;
            old.swap(slots);
            init(old.size());  // doubles: init sizes for 2x entries
            for (const Slot& o : old)
                if (o.key != kEmpty) place(o);
        }
        uint64_t k = key(left, right);
        for (size_t i = hash(k) & mask;; i = (i + 1) & mask) {
            if (slots[i].key == k) return false;
            if (slots[i].key == kEmpty) {
                slots[i] = Slot{k, rank, result};
                ++count;
                return true;
            }
        }
    }
    void place(const Slot& s) {
        size_t i = hash(s.key) & mask;
        while (slots[i].key != kEmpty) i = (i + 1) & mask;
        slots[i] = s;
        ++count;
    }
    const Slot* find(int32_t left, int32_t right) const {
        if (slots.empty()) return nullptr;
        uint64_t k = key(left, right);
        for (size_t i = hash(k) & mask;; i = (i + 1) & mask) {
            if (slots[i].key == k) return &slots[i];
            if (slots[i].key == kEmpty) return nullptr;
        }
    }
};

// Token text -> id: open addressing over (hash, id) slots; the text itself is compared in `tokens`.
// (Lighter than std::unordered_map, which allocates a node per token and slowed loading down.)
struct TokenIndex {
    struct Slot {
        uint32_t hash;
        int32_t id;  // -1: empty
    };
    std::vector<Slot> slots;
    size_t mask = 0;

    static uint32_t hash_text(const char* p, size_t n) {
        uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
        for (; n >= 8; p += 8, n -= 8) {
            uint64_t w;
            std::memcpy(&w, p, 8);
            h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
            h ^= h >> 31;
        }
        uint64_t w = 0;
        if (n) std::memcpy(&w, p, n);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
        h ^= h >> 29;
        return (uint32_t)(h ^ (h >> 32));
    }
    // Later duplicates of a text replace earlier ones (llama.cpp's behaviour).
    void build(const std::vector<std::string>& tokens) {
        size_t cap = 16;
        while (cap < tokens.size() * 2) cap <<= 1;  // load factor <= 1/2
        slots.assign(cap, Slot{0, -1});
        mask = cap - 1;
        for (size_t id = 0; id < tokens.size(); ++id) {
            const std::string& t = tokens[id];
            uint32_t h = hash_text(t.data(), t.size());
            size_t i = h & mask;
            while (slots[i].id >= 0 && !(slots[i].hash == h && tokens[(size_t)slots[i].id] == t)) i = (i + 1) & mask;
            slots[i] = Slot{h, (int32_t)id};
        }
    }
    int32_t find(const std::vector<std::string>& tokens, std::string_view text) const {
        if (slots.empty()) return -1;
        uint32_t h = hash_text(text.data(), text.size());
        for (size_t i = h & mask; slots[i].id >= 0; i = (i + 1) & mask) {
            if (slots[i].hash != h) continue;
            const std::string& t = tokens[(size_t)slots[i].id];
            if (t.size() == text.size() && std::memcmp(t.data(), text.data(), text.size()) == 0) return slots[i].id;
        }
        return -1;
    }
};

// Byte trie of the special tokens' texts (control, user-defined and unknown tokens), for
// leftmost-longest matching in one pass over the text, as Hugging Face's added-token matcher does.
struct SpecialTokenTrie {
    struct Node {
        int32_t token = -1;                              // the token whose text ends here
        std::vector<std::pair<uint8_t, int32_t>> next;   // byte -> child node
    };
    std::vector<Node> nodes;    // nodes[0] is the root
    int32_t root_next[256];     // the root's children, as a table: most text bytes start no token

    SpecialTokenTrie() {
        for (int32_t& r : root_next) r = -1;
        nodes.emplace_back();
    }
    void add(const std::string& text, int32_t token) {
        int32_t node = 0;
        for (size_t i = 0; i < text.size(); ++i) {
            uint8_t b = (uint8_t)text[i];
            int32_t child = -1;
            if (node == 0) {
                child = root_next[b];
            } else {
                for (const auto& e : nodes[(size_t)node].next)
                    if (e.first == b) child = e.second;
            }
            if (child < 0) {
                child = (int32_t)nodes.size();
                nodes.emplace_back();
                if (node == 0) root_next[b] = child;
                else nodes[(size_t)node].next.emplace_back(b, child);
            }
            node = child;
        }
        nodes[(size_t)node].token = token;  // a later duplicate text wins, as in the id lookup
    }
};

struct TokenizerImpl {
    enum class Model { bpe, spm };
    enum class Pre { gpt2, default_, llama3, qwen2, qwen35, deepseek_llm, deepseek_v3, gpt4o, kimi_k2 };

    Model model = Model::bpe;
    Pre pre = Pre::gpt2;
    bool ignore_merges = false;     // Llama 3: a word that is a token is taken whole
    bool add_bos = false;
    bool add_eos = false;
    bool add_space_prefix = false;  // SentencePiece only
    int32_t bos = -1, eos = -1, eot = -1, eom = -1, pad = -1, unk = -1;

    std::vector<std::string> tokens;                     // (n_vocab) raw vocabulary entries
    std::vector<uint8_t> types;                          // (n_vocab) VocabTokenType
    std::vector<float> scores;                           // (n_vocab) SentencePiece piece scores
    TokenIndex ids;                                      // token text -> id
    PairTable merges;                                    // BPE: (left id, right id) -> rank, result
    PairTable spm_pairs;                                 // SPM: code point pairs found inside pieces
    int32_t byte_token[256];  // BPE: the token of each byte's stand-in; SPM: its <0xXX> piece; -1: none
    SpecialTokenTrie specials;
    bool has_specials = false;
    bool has_user_defined = false;
    std::vector<int32_t> eog;  // end-of-generation tokens, sorted
    std::string chat_template;

    VocabTokenType type(int32_t id) const { return (VocabTokenType)types[(size_t)id]; }
    int32_t find(std::string_view text) const { return ids.find(tokens, text); }

    Status load(const GgufFile& file);
    void encode(const std::string& text, bool add_special, bool parse_special, std::vector<int32_t>* out) const;
    void append_piece(int32_t token, bool render_special, std::string* out) const;

    struct Scratch;  // per-call buffers of encode()
    size_t match_special(const std::string& text, size_t pos, bool parse_special, int32_t* token) const;
    size_t chunk_length(const char* s, size_t n) const;
    static constexpr size_t kCacheMaxWordBytes = 64;  // longer words are not cached
    bool cache_lookup(Scratch& sc, std::vector<int32_t>* out) const;
    void cache_store(Scratch& sc, const std::vector<int32_t>& out, size_t first) const;
    void encode_bpe_fragment(const char* s, size_t n, Scratch& sc, std::vector<int32_t>* out) const;
    void encode_bpe_word(const unsigned char* s, size_t n, Scratch& sc, std::vector<int32_t>* out) const;
    void encode_spm_fragment(const char* s, size_t n, bool space_prefix, Scratch& sc, std::vector<int32_t>* out) const;
    void spm_merge_chunk(const std::string& text, size_t begin, size_t end, Scratch& sc, std::vector<int32_t>* out) const;
    void spm_resegment(std::string_view piece, Scratch& sc, std::vector<int32_t>* out) const;
    bool spm_mergeable(int32_t id) const {
        VocabTokenType t = type(id);
        return t == VocabTokenType::normal || t == VocabTokenType::user_defined || t == VocabTokenType::unused ||
               t == VocabTokenType::undefined;
    }
};

struct TokenizerImpl::Scratch {
    // pre-tokenization of one fragment
    std::vector<uint32_t> cpts;     // code points (invalid bytes: 0x110000 | byte)
    std::vector<uint32_t> offsets;  // byte offset of each code point, plus the end
    std::vector<uint8_t> cls;       // UnicodeClass of each code point
    std::vector<uint32_t> ends;     // end (code point index) of each word
    std::vector<CptSpan> spans_a, spans_b;
    // word cache (BPE words, SentencePiece chunks): bytes -> (offset, count) in cache_ids
    std::unordered_map<std::string, std::pair<uint32_t, uint32_t>> word_cache;
    std::vector<int32_t> cache_ids;
    std::string cache_key;
    // BPE of one word: symbols in a doubly linked list, candidate merges in a heap
    struct BpeCandidate { int32_t rank, left, right, left_id, right_id; };
    std::vector<int32_t> sym_id, sym_prev, sym_next;
    std::vector<BpeCandidate> bpe_heap;
    std::string word;
    // SentencePiece
    struct SpmCandidate { float score; int32_t left, right; uint32_t size; };
    std::string spm_text;
    std::vector<uint32_t> sym_start, sym_len;
    std::vector<SpmCandidate> spm_heap;
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> spm_unmerge;
    std::vector<std::string_view> spm_stack;
};

//--- Loading ------------------------------------------------------------------------------------

inline bool gguf_type_is_integer(GgufValueType t) {
    switch (t) {
        case GgufValueType::u8: case GgufValueType::i8: case GgufValueType::u16: case GgufValueType::i16:
        case GgufValueType::u32: case GgufValueType::i32: case GgufValueType::u64: case GgufValueType::i64:
            return true;
        default:
            return false;
    }
}

// Optional token id `key`: absent or negative leaves *id as is / sets -1; out of range is an error.
inline Status tokenizer_read_id(const GgufFile& file, const char* key, int32_t n_vocab, int32_t* id) {
    const GgufKeyValue* kv = file.find(key);
    if (!kv) return Status::ok;
    if (!gguf_type_is_integer(kv->type)) return fail(Status::tokenizer_error, "%s is not an integer", key);
    bool is_signed = kv->type == GgufValueType::i8 || kv->type == GgufValueType::i16 || kv->type == GgufValueType::i32 ||
                     kv->type == GgufValueType::i64;
    if (is_signed && (int64_t)kv->scalar_u64 < 0) {
        *id = -1;  // some converters write -1 for "none"
        return Status::ok;
    }
    if (kv->scalar_u64 >= (uint64_t)n_vocab)
        return fail(Status::tokenizer_error, "%s = %llu is out of range (the vocabulary has %d tokens)", key,
                    (unsigned long long)kv->scalar_u64, n_vocab);
    *id = (int32_t)kv->scalar_u64;
    return Status::ok;
}

inline Status tokenizer_read_flag(const GgufFile& file, const char* key, bool* value) {
    const GgufKeyValue* kv = file.find(key);
    if (!kv) return Status::ok;
    if (kv->type != GgufValueType::boolean && !gguf_type_is_integer(kv->type))
        return fail(Status::tokenizer_error, "%s is not a boolean", key);
    *value = kv->scalar_u64 != 0;
    return Status::ok;
}

// A required string array: missing_key when absent, a tokenizer error when of another type.
inline Status tokenizer_read_strings(const GgufFile& file, const char* key, std::vector<std::string>* out) {
    const GgufKeyValue* kv = file.find(key);
    if (!kv) return fail(Status::missing_key, "missing metadata key '%s'", key);
    if (kv->type != GgufValueType::array || kv->array_type != GgufValueType::string)
        return fail(Status::tokenizer_error, "%s is not an array of strings", key);
    return file.get_string_array(key, out);
}

inline bool pre_is_one_of(const std::string& pre, std::initializer_list<const char*> names) {
    for (const char* name : names)
        if (pre == name) return true;
    return false;
}

inline Status TokenizerImpl::load(const GgufFile& file) {
    Status s;
    // Model kind.
    const GgufKeyValue* kv = file.find("tokenizer.ggml.model");
    if (!kv) return fail(Status::missing_key, "missing metadata key 'tokenizer.ggml.model'");
    if (kv->type != GgufValueType::string) return fail(Status::tokenizer_error, "tokenizer.ggml.model is not a string");
    std::string kind = kv->scalar_str.str();
    if (kind == "gpt2") model = Model::bpe;
    else if (kind == "llama") model = Model::spm;
    else
        return fail(Status::tokenizer_error, "tokenizer.ggml.model '%.64s' is not supported (this build reads 'gpt2' and 'llama')",
                    kind.c_str());

    // Vocabulary.
    if ((s = tokenizer_read_strings(file, "tokenizer.ggml.tokens", &tokens)) != Status::ok) return s;
    if (tokens.empty()) return fail(Status::tokenizer_error, "tokenizer.ggml.tokens is empty");
    if (tokens.size() >= (size_t)INT32_MAX) return fail(Status::tokenizer_error, "tokenizer.ggml.tokens has too many entries");
    const int32_t n_vocab = (int32_t)tokens.size();

    types.assign(tokens.size(), (uint8_t)VocabTokenType::normal);
    if (file.find("tokenizer.ggml.token_type")) {
        const GgufKeyValue* tkv = file.find("tokenizer.ggml.token_type");
        if (tkv->type != GgufValueType::array || !gguf_type_is_integer(tkv->array_type))
            return fail(Status::tokenizer_error, "tokenizer.ggml.token_type is not an integer array");
        std::vector<int32_t> raw;
        if ((s = file.get_i32_array("tokenizer.ggml.token_type", &raw)) != Status::ok) return s;
        if (raw.size() != tokens.size())
            return fail(Status::tokenizer_error, "tokenizer.ggml.token_type has %zu entries but tokenizer.ggml.tokens has %zu",
                        raw.size(), tokens.size());
        for (size_t i = 0; i < raw.size(); ++i) {
            if (raw[i] < 0 || raw[i] > (int32_t)VocabTokenType::byte)
                return fail(Status::tokenizer_error, "tokenizer.ggml.token_type[%zu] = %d is not a token type (0..6)", i, raw[i]);
            types[i] = (uint8_t)raw[i];
        }
    }
    scores.assign(tokens.size(), 0.0f);
    if (file.find("tokenizer.ggml.scores")) {
        const GgufKeyValue* skv = file.find("tokenizer.ggml.scores");
        if (skv->type != GgufValueType::array || skv->array_type == GgufValueType::string || skv->array_type == GgufValueType::array)
            return fail(Status::tokenizer_error, "tokenizer.ggml.scores is not a numeric array");
        if ((s = file.get_f32_array("tokenizer.ggml.scores", &scores)) != Status::ok) return s;
        if (scores.size() != tokens.size())
            return fail(Status::tokenizer_error, "tokenizer.ggml.scores has %zu entries but tokenizer.ggml.tokens has %zu",
                        scores.size(), tokens.size());
        for (size_t i = 0; i < scores.size(); ++i)
            if (std::isnan(scores[i])) return fail(Status::tokenizer_error, "tokenizer.ggml.scores[%zu] is NaN", i);
    }

    ids.build(tokens);

    // Pre-tokenizer and the per-family defaults (llama.cpp's, where the keys are absent).
    std::string pre_name = "default";
    if ((kv = file.find("tokenizer.ggml.pre")) != nullptr) {
        if (kv->type != GgufValueType::string) return fail(Status::tokenizer_error, "tokenizer.ggml.pre is not a string");
        pre_name = kv->scalar_str.str();
    }
    if (model == Model::spm) {
        add_bos = true;
        add_space_prefix = true;
        bos = n_vocab > 1 ? 1 : -1;  // SentencePiece's conventional <unk>=0, <s>=1, </s>=2
        eos = n_vocab > 2 ? 2 : -1;
        unk = 0;
    } else if (pre_is_one_of(pre_name, {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                                        "lfm2", "jina-v5-nano"})) {
        pre = Pre::llama3;
        ignore_merges = true;
        add_bos = true;
    } else if (pre_is_one_of(pre_name, {"dbrx", "smaug-bpe", "glm4", "chatglm-bpe"})) {
        pre = Pre::llama3;  // Llama 3's regex without its ignore_merges / add_bos defaults
    } else if (pre_is_one_of(pre_name, {"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                                        "solar-open", "grok-2"})) {
        pre = Pre::qwen2;
    } else if (pre_name == "qwen35") {
        pre = Pre::qwen35;
    } else if (pre_name == "deepseek-llm") {
        pre = Pre::deepseek_llm;
    } else if (pre_is_one_of(pre_name, {"deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"})) {
        pre = Pre::deepseek_v3;
    } else if (pre_is_one_of(pre_name, {"gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"})) {
        pre = Pre::gpt4o;
    } else if (pre_name == "kimi-k2") {
        pre = Pre::kimi_k2;
    } else if (pre_name == "default") {
        pre = Pre::default_;  // also when the key is absent
    } else {
        pre = Pre::gpt2;  // "gpt-2" and any family without a matcher of its own (llama.cpp refuses those)
    }

    if ((s = tokenizer_read_id(file, "tokenizer.ggml.bos_token_id", n_vocab, &bos)) != Status::ok) return s;
    if ((s = tokenizer_read_id(file, "tokenizer.ggml.eos_token_id", n_vocab, &eos)) != Status::ok) return s;
    if ((s = tokenizer_read_id(file, "tokenizer.ggml.eot_token_id", n_vocab, &eot)) != Status::ok) return s;
    if ((s = tokenizer_read_id(file, "tokenizer.ggml.eom_token_id", n_vocab, &eom)) != Status::ok) return s;
    if ((s = tokenizer_read_id(file, "tokenizer.ggml.padding_token_id", n_vocab, &pad)) != Status::ok) return s;
    if ((s = tokenizer_read_id(file, "tokenizer.ggml.unknown_token_id", n_vocab, &unk)) != Status::ok) return s;
    if ((s = tokenizer_read_flag(file, "tokenizer.ggml.add_bos_token", &add_bos)) != Status::ok) return s;
    if ((s = tokenizer_read_flag(file, "tokenizer.ggml.add_eos_token", &add_eos)) != Status::ok) return s;
    if ((s = tokenizer_read_flag(file, "tokenizer.ggml.add_space_prefix", &add_space_prefix)) != Status::ok) return s;
    if (model == Model::bpe) add_space_prefix = false;

    if ((kv = file.find("tokenizer.chat_template")) != nullptr) {
        if (kv->type != GgufValueType::string) return fail(Status::tokenizer_error, "tokenizer.chat_template is not a string");
        chat_template = kv->scalar_str.str();
    }

    // Byte tokens.
    for (int32_t& t : byte_token) t = -1;
    if (model == Model::bpe) {
        const ByteLevelCodec& codec = byte_level_codec();
        for (int b = 0; b < 256; ++b) byte_token[b] = find(std::string_view(codec.utf8[b], codec.utf8_len[b]));
    } else {
        for (int32_t i = 0; i < n_vocab; ++i) {
            if (type(i) != VocabTokenType::byte) continue;
            int b = parse_byte_piece(tokens[(size_t)i]);
            if (b < 0) return fail(Status::tokenizer_error, "tokenizer.ggml.tokens[%d] has type byte but is not <0xXX>", i);
            if (byte_token[b] < 0) byte_token[b] = i;
        }
        for (int b = 0; b < 256; ++b)  // no <0xXX> piece: the byte itself, if it is a piece
            if (byte_token[b] < 0) {
                char c = (char)b;
                byte_token[b] = find(std::string_view(&c, 1));
            }
    }

    // SentencePiece: the code point pairs that occur inside mergeable pieces (see encode_spm_fragment).
    if (model == Model::spm) {
        spm_pairs.init(1024);
        for (int32_t i = 0; i < n_vocab; ++i) {
            if (!spm_mergeable(i)) continue;
            const std::string& t = tokens[(size_t)i];
            const unsigned char* p = reinterpret_cast<const unsigned char*>(t.data());
            uint32_t prev = 0;
            for (size_t j = 0; j < t.size();) {
                uint32_t cp = 0;
                int r = utf8_sequence(p + j, t.size() - j, &cp);
                if (r <= 0) {
                    cp = 0x110000u | p[j];
                    r = 1;
                }
                if (j > 0) spm_pairs.insert((int32_t)prev, (int32_t)cp, 0, 0);
                prev = cp;
                j += (size_t)r;
            }
        }
    }

    // Merges.
    if (model == Model::bpe) {
        std::vector<std::string> lines;
        // llama.cpp loads Kimi K2 without merges (words then fall back to byte tokens).
        bool optional = pre == Pre::kimi_k2 && !file.find("tokenizer.ggml.merges");
        if (!optional && (s = tokenizer_read_strings(file, "tokenizer.ggml.merges", &lines)) != Status::ok) return s;
        if (lines.size() >= (size_t)INT32_MAX) return fail(Status::tokenizer_error, "tokenizer.ggml.merges has too many entries");
        merges.init(lines.size());
        std::string joined;
        for (size_t r = 0; r < lines.size(); ++r) {
            const std::string& line = lines[r];
            size_t space = line.find(' ', 1);  // from 1: a pair may start with a literal space
            if (space == std::string::npos)
                return fail(Status::tokenizer_error, "tokenizer.ggml.merges[%zu] '%.64s' is not 'left right'", r, line.c_str());
            std::string_view left(line.data(), space), right(line.data() + space + 1, line.size() - space - 1);
            int32_t a = find(left), b = find(right);
            if (a < 0 || b < 0)
                return fail(Status::tokenizer_error, "tokenizer.ggml.merges[%zu] '%.64s' names a token that is not in tokenizer.ggml.tokens",
                            r, line.c_str());
            joined.assign(left.data(), left.size());
            joined.append(right.data(), right.size());
            int32_t c = find(joined);
            if (c < 0)
                return fail(Status::tokenizer_error, "tokenizer.ggml.merges[%zu] '%.64s' makes a token that is not in tokenizer.ggml.tokens",
                            r, line.c_str());
            merges.insert(a, b, (int32_t)r, c);
        }
    }

    // End of generation: eos/eot/eom and the end-of-turn texts that llama.cpp recognizes; those are
    // made control tokens (never produced from plain text, not rendered by default).
    static const char* const kEndOfGenerationTexts[] = {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
        "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    };
    for (const char* text : kEndOfGenerationTexts) {
        int32_t id = find(text);
        if (id < 0) continue;
        eog.push_back(id);
        types[(size_t)id] = (uint8_t)VocabTokenType::control;
    }
    int32_t end_of_sentence = find("</s>");
    if (end_of_sentence >= 0 && type(end_of_sentence) == VocabTokenType::control) eog.push_back(end_of_sentence);
    for (int32_t id : {eos, eot, eom})
        if (id >= 0) eog.push_back(id);
    std::sort(eog.begin(), eog.end());
    eog.erase(std::unique(eog.begin(), eog.end()), eog.end());

    // Special tokens matched verbatim in the text.
    for (int32_t i = 0; i < n_vocab; ++i) {
        VocabTokenType t = type(i);
        if (tokens[(size_t)i].empty()) continue;
        if (t != VocabTokenType::control && t != VocabTokenType::user_defined && t != VocabTokenType::unknown) continue;
        specials.add(tokens[(size_t)i], i);
        has_specials = true;
        if (t == VocabTokenType::user_defined) has_user_defined = true;
    }
    return Status::ok;
}

//--- Encoding -----------------------------------------------------------------------------------

// The longest special token whose text starts at text[pos] (user-defined ones only, unless
// parse_special): its length, or 0.
inline size_t TokenizerImpl::match_special(const std::string& text, size_t pos, bool parse_special, int32_t* token) const {
    int32_t node = specials.root_next[(uint8_t)text[pos]];
    size_t best = 0, len = 1;
    while (node >= 0) {
        const SpecialTokenTrie::Node& nd = specials.nodes[(size_t)node];
        if (nd.token >= 0 && (parse_special || type(nd.token) == VocabTokenType::user_defined)) {
            best = len;
            *token = nd.token;
        }
        if (pos + len >= text.size()) break;
        uint8_t b = (uint8_t)text[pos + len];
        int32_t child = -1;
        for (const auto& e : nd.next)
            if (e.first == b) { child = e.second; break; }
        node = child;
        ++len;
    }
    return best;
}

inline void TokenizerImpl::encode(const std::string& text, bool add_special, bool parse_special, std::vector<int32_t>* out) const {
    if (add_special && add_bos && bos >= 0) out->push_back(bos);
    Scratch sc;
    bool after_special = true;  // SentencePiece: a space is prefixed to the text and after each special token
    auto fragment = [&](size_t begin, size_t end) {
        while (begin < end) {  // in chunks, so that the per-code-point scratch stays small
            size_t n = chunk_length(text.data() + begin, end - begin);
            if (model == Model::bpe) encode_bpe_fragment(text.data() + begin, n, sc, out);
            else encode_spm_fragment(text.data() + begin, n, add_space_prefix && after_special, sc, out);
            after_special = false;
            begin += n;
        }
    };
    size_t start = 0;
    if (parse_special ? has_specials : has_user_defined) {
        for (size_t pos = 0; pos < text.size();) {
            int32_t token = -1;
            size_t len = match_special(text, pos, parse_special, &token);
            if (len == 0) { ++pos; continue; }
            fragment(start, pos);
            out->push_back(token);
            after_special = true;
            pos += len;
            start = pos;
        }
    }
    fragment(start, text.size());
    if (add_special && add_eos && eos >= 0) out->push_back(eos);
}

// Length of the first chunk of a fragment of n bytes: at least kChunkBytes when the fragment is
// longer, cut only where the tokens cannot depend on the cut (no regex here looks behind).
// Byte-level BPE: after a '\n' between two visible ASCII characters, every pre-tokenizer here ends
// a word (that newline is a whitespace run of its own or ends a punctuation run, and is never a
// letter's prefix), and DeepSeek LLM's first regex isolates each newline anyway; but GPT-4o's
// punctuation run goes on through [\r\n/]*, so there the character after it must not be '/'. SentencePiece:
// between two ASCII characters (not spaces) that are neighbours in no piece, no merge can cross.
// Without such a place, the chunk is the whole rest.
inline size_t TokenizerImpl::chunk_length(const char* s, size_t n) const {
    static constexpr size_t kChunkBytes = 1 << 16;
    for (size_t p = kChunkBytes; p < n; ++p) {
        unsigned char a = (unsigned char)s[p - 1], b = (unsigned char)s[p];
        if (model == Model::bpe) {
            unsigned char before = (unsigned char)s[p - 2];
            if (a == '\n' && b > 0x20 && b < 0x7f && before > 0x20 && before < 0x7f && !(pre == Pre::gpt4o && b == '/')) return p;
        } else if (a < 0x80 && b < 0x80 && a != ' ' && b != ' ' && !spm_pairs.find(a, b)) {
            return p;
        }
    }
    return n;
}

inline void TokenizerImpl::encode_bpe_fragment(const char* s, size_t n, Scratch& sc, std::vector<int32_t>* out) const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(s);
    sc.cpts.clear();
    sc.offsets.clear();
    sc.cls.clear();
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int r = utf8_sequence(p + i, n - i, &cp);
        if (r <= 0) {  // an invalid byte stays one code point of its own, class `other`
            cp = 0x110000u | p[i];
            r = 1;
        }
        sc.cpts.push_back(cp);
        sc.offsets.push_back((uint32_t)i);
        sc.cls.push_back((uint8_t)unicode_class(cp));
        i += (size_t)r;
    }
    sc.offsets.push_back((uint32_t)n);
    const size_t m = sc.cpts.size();
    sc.ends.clear();
    switch (pre) {
        case Pre::gpt2: pretokenize_gpt2(sc.cpts.data(), sc.cls.data(), m, &sc.ends); break;
        case Pre::default_: pretokenize_default(sc.cpts.data(), sc.cls.data(), m, &sc.spans_a, &sc.spans_b, &sc.ends); break;
        case Pre::llama3: pretokenize_llama3(sc.cpts.data(), sc.cls.data(), m, 3, false, &sc.ends); break;
        case Pre::qwen2: pretokenize_llama3(sc.cpts.data(), sc.cls.data(), m, 1, false, &sc.ends); break;
        case Pre::qwen35: pretokenize_llama3(sc.cpts.data(), sc.cls.data(), m, 1, true, &sc.ends); break;
        case Pre::deepseek_llm: pretokenize_deepseek_llm(sc.cpts.data(), sc.cls.data(), m, &sc.spans_a, &sc.spans_b, &sc.ends); break;
        case Pre::deepseek_v3: pretokenize_deepseek_v3(sc.cpts.data(), sc.cls.data(), m, &sc.spans_a, &sc.spans_b, &sc.ends); break;
        case Pre::gpt4o: pretokenize_gpt4o(sc.cpts.data(), sc.cls.data(), m, &sc.ends); break;
        case Pre::kimi_k2: pretokenize_kimi_k2(sc.cpts.data(), sc.cls.data(), m, &sc.ends); break;
    }
    uint32_t begin = 0;
    for (uint32_t end : sc.ends) {
        uint32_t b0 = sc.offsets[begin], b1 = sc.offsets[end];
        begin = end;
        size_t len = b1 - b0;
        if (len < 2 || len > kCacheMaxWordBytes) {
            encode_bpe_word(p + b0, len, sc, out);
            continue;
        }
        sc.cache_key.assign(s + b0, len);
        if (cache_lookup(sc, out)) continue;
        size_t first = out->size();
        encode_bpe_word(p + b0, len, sc, out);
        cache_store(sc, *out, first);
    }
}

// Natural text repeats its words: a per-call cache of word -> tokens saves most of the merging
// (KJV: ~13k distinct words in ~1M). Bounded, and per call so that encode() stays thread-safe.
// The key is in sc.cache_key.
inline bool TokenizerImpl::cache_lookup(Scratch& sc, std::vector<int32_t>* out) const {
    auto hit = sc.word_cache.find(sc.cache_key);
    if (hit == sc.word_cache.end()) return false;
    auto first = sc.cache_ids.begin() + hit->second.first;
    out->insert(out->end(), first, first + hit->second.second);
    return true;
}

inline void TokenizerImpl::cache_store(Scratch& sc, const std::vector<int32_t>& out, size_t first) const {
    static constexpr size_t kCacheMaxEntries = 1 << 16;
    if (sc.word_cache.size() >= kCacheMaxEntries) return;
    sc.word_cache.emplace(sc.cache_key, std::make_pair((uint32_t)sc.cache_ids.size(), (uint32_t)(out.size() - first)));
    sc.cache_ids.insert(sc.cache_ids.end(), out.begin() + (std::ptrdiff_t)first, out.end());
}

inline void TokenizerImpl::encode_bpe_word(const unsigned char* s, size_t n, Scratch& sc, std::vector<int32_t>* out) const {
    if (n == 0) return;
    auto emit = [&](int32_t id) {
        // A byte without a stand-in token (a vocabulary lacking part of the alphabet, such as
        // gpt-neox's) is dropped, as llama.cpp does: its <unk> may well be an end-of-text token.
        if (id >= 0) out->push_back(id);
    };
    if (n == 1) { emit(byte_token[s[0]]); return; }
    if (ignore_merges) {
        const ByteLevelCodec& codec = byte_level_codec();
        sc.word.clear();
        for (size_t i = 0; i < n; ++i) sc.word.append(codec.utf8[s[i]], codec.utf8_len[s[i]]);
        int32_t id = find(sc.word);
        if (id >= 0) { out->push_back(id); return; }
    }
    // One symbol per byte, linked; merge the candidate pair of lowest rank (leftmost on ties) until
    // no adjacent pair has a merge. Heap entries go stale when a neighbour changes; they are
    // recognised by the ids no longer matching and skipped.
    sc.sym_id.resize(n);
    sc.sym_prev.resize(n);
    sc.sym_next.resize(n);
    for (size_t i = 0; i < n; ++i) {
        sc.sym_id[i] = byte_token[s[i]];
        sc.sym_prev[i] = (int32_t)i - 1;
        sc.sym_next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    using Candidate = Scratch::BpeCandidate;
    auto lower_priority = [](const Candidate& a, const Candidate& b) {
        return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    };
    std::vector<Candidate>& heap = sc.bpe_heap;
    heap.clear();
    auto consider = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        int32_t a = sc.sym_id[(size_t)left], b = sc.sym_id[(size_t)right];
        if (a < 0 || b < 0) return;
        const PairTable::Slot* m = merges.find(a, b);
        if (!m) return;
        heap.push_back(Candidate{m->rank, left, right, a, b});
        std::push_heap(heap.begin(), heap.end(), lower_priority);
    };
    for (size_t i = 0; i + 1 < n; ++i) consider((int32_t)i, (int32_t)i + 1);
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), lower_priority);
        Candidate c = heap.back();
        heap.pop_back();
        size_t l = (size_t)c.left, r = (size_t)c.right;
        // Stale: the left symbol was absorbed (prev == -2), or either side changed since.
        if (sc.sym_prev[l] == -2 || sc.sym_next[l] != c.right || sc.sym_id[l] != c.left_id || sc.sym_id[r] != c.right_id) continue;
        sc.sym_id[l] = merges.find(c.left_id, c.right_id)->result;
        sc.sym_next[l] = sc.sym_next[r];
        if (sc.sym_next[r] >= 0) sc.sym_prev[(size_t)sc.sym_next[r]] = c.left;
        sc.sym_prev[r] = -2;
        consider(sc.sym_prev[l], c.left);
        consider(c.left, sc.sym_next[l]);
    }
    for (int32_t i = 0; i >= 0; i = sc.sym_next[(size_t)i]) emit(sc.sym_id[(size_t)i]);
}

inline void TokenizerImpl::encode_spm_fragment(const char* s, size_t n, bool space_prefix, Scratch& sc, std::vector<int32_t>* out) const {
    static const char kSpace[] = "\xe2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK stands for ' '
    std::string& text = sc.spm_text;
    text.clear();
    if (space_prefix) text += kSpace;
    for (size_t i = 0; i < n; ++i) {
        if (s[i] == ' ') text += kSpace;
        else text.push_back(s[i]);
    }
    // One symbol per character (an invalid byte is a character of its own).
    sc.sym_start.clear();
    sc.sym_len.clear();
    sc.cpts.clear();
    const unsigned char* p = reinterpret_cast<const unsigned char*>(text.data());
    for (size_t i = 0; i < text.size();) {
        uint32_t cp;
        int r = utf8_sequence(p + i, text.size() - i, &cp);
        if (r <= 0) {
            cp = 0x110000u | p[i];
            r = 1;
        }
        sc.sym_start.push_back((uint32_t)i);
        sc.sym_len.push_back((uint32_t)r);
        sc.cpts.push_back(cp);
        i += (size_t)r;
    }
    const size_t m = sc.sym_start.size();
    sc.sym_prev.resize(m);
    sc.sym_next.resize(m);
    sc.spm_unmerge.clear();
    // A merged symbol is always a piece, so no merge can cross two neighbouring characters that occur
    // together in no piece: the text is cut there into chunks merged independently (for English with
    // a Llama vocabulary, about one chunk per word), which keeps the heap small.
    // Chunks repeat like words do: they go through the same per-call cache as BPE words.
    for (size_t begin = 0, end; begin < m; begin = end) {
        for (end = begin + 1; end < m && spm_pairs.find((int32_t)sc.cpts[end - 1], (int32_t)sc.cpts[end]);) ++end;
        size_t b0 = sc.sym_start[begin], b1 = end < m ? sc.sym_start[end] : text.size();
        if (end - begin < 2 || b1 - b0 > kCacheMaxWordBytes) {
            spm_merge_chunk(text, begin, end, sc, out);
            continue;
        }
        sc.cache_key.assign(text, b0, b1 - b0);
        if (cache_lookup(sc, out)) continue;
        size_t first = out->size();
        spm_merge_chunk(text, begin, end, sc, out);
        cache_store(sc, *out, first);
    }
}

// Merges the symbols [begin, end): the adjacent pair whose concatenation is the piece of highest
// score goes first (leftmost on ties), until no pair forms a piece. Stale heap entries are
// recognised by the symbols' lengths (a symbol only grows, or drops to 0 when absorbed).
inline void TokenizerImpl::spm_merge_chunk(const std::string& text, size_t begin, size_t end, Scratch& sc, std::vector<int32_t>* out) const {
    for (size_t i = begin; i < end; ++i) {
        sc.sym_prev[i] = i > begin ? (int32_t)i - 1 : -1;
        sc.sym_next[i] = i + 1 < end ? (int32_t)i + 1 : -1;
    }
    using Candidate = Scratch::SpmCandidate;
    auto lower_priority = [](const Candidate& a, const Candidate& b) {
        return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::vector<Candidate>& heap = sc.spm_heap;
    heap.clear();
    auto consider = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        uint32_t ll = sc.sym_len[(size_t)left], rl = sc.sym_len[(size_t)right];
        std::string_view piece(text.data() + sc.sym_start[(size_t)left], ll + rl);
        int32_t id = find(piece);
        if (id < 0 || !spm_mergeable(id)) return;  // control, unknown and byte pieces never come from text
        heap.push_back(Candidate{scores[(size_t)id], left, right, ll + rl});
        std::push_heap(heap.begin(), heap.end(), lower_priority);
        if (type(id) == VocabTokenType::unused)  // unused pieces are split back into their halves on output
            sc.spm_unmerge[piece] = {std::string_view(piece.data(), ll), std::string_view(piece.data() + ll, rl)};
    };
    for (size_t i = begin; i + 1 < end; ++i) consider((int32_t)i, (int32_t)i + 1);
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), lower_priority);
        Candidate c = heap.back();
        heap.pop_back();
        size_t l = (size_t)c.left, r = (size_t)c.right;
        if (sc.sym_len[l] == 0 || sc.sym_len[r] == 0 || sc.sym_len[l] + sc.sym_len[r] != c.size) continue;
        sc.sym_len[l] += sc.sym_len[r];
        sc.sym_len[r] = 0;
        sc.sym_next[l] = sc.sym_next[r];
        if (sc.sym_next[r] >= 0) sc.sym_prev[(size_t)sc.sym_next[r]] = c.left;
        consider(sc.sym_prev[l], c.left);
        consider(c.left, sc.sym_next[l]);
    }
    for (int32_t i = (int32_t)begin; i >= 0; i = sc.sym_next[(size_t)i])
        spm_resegment(std::string_view(text.data() + sc.sym_start[(size_t)i], sc.sym_len[(size_t)i]), sc, out);
}

// Emits a final SentencePiece symbol: its piece, or the halves it was merged from (unused pieces),
// or its bytes as <0xXX> pieces, or <unk>.
inline void TokenizerImpl::spm_resegment(std::string_view piece, Scratch& sc, std::vector<int32_t>* out) const {
    sc.spm_stack.assign(1, piece);
    while (!sc.spm_stack.empty()) {
        std::string_view v = sc.spm_stack.back();
        sc.spm_stack.pop_back();
        int32_t id = find(v);
        if (id >= 0 && type(id) != VocabTokenType::unused) {
            out->push_back(id);
            continue;
        }
        auto it = sc.spm_unmerge.find(v);
        if (it != sc.spm_unmerge.end()) {
            sc.spm_stack.push_back(it->second.second);  // stack: the left half comes out first
            sc.spm_stack.push_back(it->second.first);
            continue;
        }
        bool all_bytes = true;
        for (char ch : v) all_bytes = all_bytes && byte_token[(uint8_t)ch] >= 0;
        if (all_bytes) {
            for (char ch : v) out->push_back(byte_token[(uint8_t)ch]);
        } else if (unk >= 0) {
            out->push_back(unk);
        }
    }
}

//--- Decoding -----------------------------------------------------------------------------------

inline void TokenizerImpl::append_piece(int32_t token, bool render_special, std::string* out) const {
    if (token < 0 || (size_t)token >= tokens.size()) return;
    const std::string& text = tokens[(size_t)token];
    switch (type(token)) {
        case VocabTokenType::control:
        case VocabTokenType::unknown:
        case VocabTokenType::unused:
            if (render_special) out->append(text);
            return;
        case VocabTokenType::user_defined:  // stored as plain text in both vocabulary kinds
            out->append(text);
            return;
        case VocabTokenType::byte: {
            int b = parse_byte_piece(text);
            if (b >= 0) {
                out->push_back((char)b);
                return;
            }
            break;
        }
        default:
            break;
    }
    if (model == Model::spm) {  // U+2581 -> ' '
        for (size_t i = 0; i < text.size(); ++i) {
            if (text.compare(i, 3, "\xe2\x96\x81") == 0) {
                out->push_back(' ');
                i += 2;
            } else {
                out->push_back(text[i]);
            }
        }
        return;
    }
    // Byte-level: each stand-in code point back to its byte (anything else is kept as it is).
    const ByteLevelCodec& codec = byte_level_codec();
    const unsigned char* p = reinterpret_cast<const unsigned char*>(text.data());
    for (size_t i = 0; i < text.size();) {
        uint32_t cp = 0;
        int r = utf8_sequence(p + i, text.size() - i, &cp);
        if (r > 0 && cp < 0x144 && codec.byte_of[cp] >= 0) {
            out->push_back((char)codec.byte_of[cp]);
        } else {
            if (r <= 0) r = 1;
            out->append(text, i, (size_t)r);
        }
        i += (size_t)r;
    }
}

}  // namespace detail

//--- Public API ---------------------------------------------------------------------------------

MOE_DETAIL_MEMBER Tokenizer::Tokenizer() = default;
MOE_DETAIL_MEMBER Tokenizer::~Tokenizer() = default;
MOE_DETAIL_MEMBER Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
MOE_DETAIL_MEMBER Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

MOE_DETAIL_MEMBER Status Tokenizer::load(const GgufFile& file, Tokenizer* out) {
    if (!out) return detail::fail(Status::invalid_argument, "null output");
    std::unique_ptr<detail::TokenizerImpl> impl(new (std::nothrow) detail::TokenizerImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = impl->load(file);
    if (s != Status::ok) return s;
    out->impl_ = std::move(impl);
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Tokenizer::encode(const std::string& text, bool add_special, bool parse_special, std::vector<int32_t>* out) const {
    if (!out) return detail::fail(Status::invalid_argument, "null output");
    if (!impl_) return detail::fail(Status::tokenizer_error, "tokenizer not loaded");
    // Offsets inside the encoder are 32-bit, and SentencePiece's escaping can triple a chunk.
    if (text.size() > ((size_t)1 << 30))
        return detail::fail(Status::invalid_argument, "text of %zu bytes is too long to encode (limit 1 GiB)", text.size());
    impl_->encode(text, add_special, parse_special, out);
    return Status::ok;
}

MOE_DETAIL_MEMBER std::string Tokenizer::token_to_piece(int32_t token, bool render_special) const {
    std::string piece;
    if (impl_) impl_->append_piece(token, render_special, &piece);
    return piece;
}

MOE_DETAIL_MEMBER std::string Tokenizer::decode(const int32_t* tokens, size_t n, bool render_special) const {
    std::string text;
    if (!impl_ || !tokens) return text;
    // SentencePiece prefixed a space to the text: drop it from the first piece that has any text.
    bool strip = impl_->model == detail::TokenizerImpl::Model::spm && impl_->add_space_prefix;
    for (size_t i = 0; i < n; ++i) {
        size_t before = text.size();
        impl_->append_piece(tokens[i], render_special, &text);
        if (strip && text.size() > before) {
            if (text[before] == ' ') text.erase(before, 1);
            strip = false;
        }
    }
    return text;
}

MOE_DETAIL_MEMBER int32_t Tokenizer::n_vocab() const { return impl_ ? (int32_t)impl_->tokens.size() : 0; }
MOE_DETAIL_MEMBER int32_t Tokenizer::bos() const { return impl_ ? impl_->bos : -1; }
MOE_DETAIL_MEMBER int32_t Tokenizer::eos() const { return impl_ ? impl_->eos : -1; }

MOE_DETAIL_MEMBER bool Tokenizer::is_end_of_generation(int32_t token) const {
    return impl_ && std::binary_search(impl_->eog.begin(), impl_->eog.end(), token);
}

MOE_DETAIL_MEMBER bool Tokenizer::is_control(int32_t token) const {
    return impl_ && token >= 0 && token < n_vocab() && impl_->type(token) == detail::VocabTokenType::control;
}

MOE_DETAIL_MEMBER const std::string& Tokenizer::token_text(int32_t token) const {
    static const std::string kEmpty;
    if (!impl_ || token < 0 || token >= n_vocab()) return kEmpty;
    return impl_->tokens[(size_t)token];
}

MOE_DETAIL_MEMBER const std::string& Tokenizer::chat_template() const {
    static const std::string kEmpty;
    return impl_ ? impl_->chat_template : kEmpty;
}

MOE_DETAIL_MEMBER bool Tokenizer::valid() const { return impl_ != nullptr; }

MOE_DETAIL_MEMBER Detokenizer::Detokenizer(const Tokenizer& tokenizer, bool render_special) : tokenizer_(&tokenizer), render_special_(render_special) {}

MOE_DETAIL_MEMBER void Detokenizer::push(int32_t token, std::string* out) {
    std::string piece = tokenizer_->token_to_piece(token, render_special_);
    if (first_ && !piece.empty()) {
        piece = tokenizer_->decode(&token, 1, render_special_);  // applies the leading-space rule
        first_ = false;
    }
    pending_ += piece;
    size_t used = detail::utf8_append_sanitized(out, pending_.data(), pending_.size(), true);
    pending_.erase(0, used);
}

MOE_DETAIL_MEMBER void Detokenizer::flush(std::string* out) {
    detail::utf8_append_sanitized(out, pending_.data(), pending_.size(), false);
    pending_.clear();
}

MOE_DETAIL_MEMBER void Detokenizer::reset() {
    pending_.clear();
    first_ = true;
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] MODEL LOADING
//-----------------------------------------------------------------------------
// >>loader  Hyper-parameters come only from metadata (ARCH.* keys); every tensor is looked up by
// its llama.cpp name and its shape checked against them. Tensor names appear only here.
// Small vectors (norms, biases, the qwen2moe shared-expert gate) are converted to float once.

namespace moe {
namespace detail {

// A weight matrix (or a stack of expert matrices) as stored in the file.
struct Weight {
    const uint8_t* data = nullptr;  // nullptr when the tensor is absent
    uint32_t type = 0;
    const QuantType* qt = nullptr;  // its row of the type table
    int64_t cols = 0, rows = 0, n_mats = 1;  // ne0 (input), ne1 (output), ne2 (experts)
    size_t row_bytes = 0, mat_bytes = 0;
    RowKernel kernel;      // quantized activations (as llama.cpp)
    RowKernel kernel_f32;  // float activations
    std::vector<float> out_scale;  // `<name>.scale` (NVFP4 tensor scale): one per matrix, or empty
    explicit operator bool() const { return data != nullptr; }
    bool scaled() const { return !out_scale.empty(); }
    float scale(int64_t mat) const { return out_scale[out_scale.size() == 1 ? 0 : (size_t)mat]; }
    const uint8_t* row(int64_t mat, int64_t r) const { return data + (size_t)mat * mat_bytes + (size_t)r * row_bytes; }
};

struct LayerWeights {
    std::vector<float> attn_norm, ffn_norm, q_norm, k_norm, bq, bk, bv, bo;  // empty when absent
    Weight wq, wk, wv, wo;          // (n_head*hd, n_embd), (n_kv*hd, n_embd) x2, (n_embd, n_head*hd)
    Weight router;                  // (n_expert, n_embd)
    Weight gate_exps, up_exps;      // (n_expert, n_ff, n_embd)
    Weight down_exps;               // (n_expert, n_embd, n_ff)
    // Hot/cold files (moe-quantize --recipe hotcold): the hot experts' matrices in a second stack of
    // their own type, the _exps stacks holding the others. expert_mat[e]: e's matrix in the _exps
    // stacks (>= 0) or -1 - its matrix in the hot ones; empty in plain files.
    Weight gate_hot, up_hot, down_hot;
    std::vector<int32_t> expert_mat;
    struct ExpertMats { const Weight *gate, *up, *down; int64_t mat; };
    ExpertMats expert(int32_t e) const {
        const int32_t m = expert_mat.empty() ? e : expert_mat[(size_t)e];
        if (m >= 0) return {&gate_exps, &up_exps, &down_exps, m};
        return {&gate_hot, &up_hot, &down_hot, -1 - (int64_t)m};
    }
    Weight gate, up, down;          // dense FFN (n_ff, n_embd), (n_embd, n_ff)
    Weight gate_shexp, up_shexp, down_shexp;  // shared expert (qwen2moe, glm4moe)
    std::vector<float> router_shexp;          // (n_embd) sigmoid gate of the shared expert; empty: weight 1
    std::vector<float> router_bias;           // (n_expert) added to the router logits (gpt-oss)
    std::vector<float> selection_bias;        // (n_expert) steers the top-k only (exp_probs_b)
    std::vector<float> gate_exps_b, up_exps_b, down_exps_b;  // (n_expert, n_ff) x2, (n_expert, n_embd)
    std::vector<float> sinks;                 // (n_head) attention sink logits (gpt-oss)
    // Multi-head latent attention (deepseek2): wq_a/wq_b (q LoRA) or wq; wkv_a gives the latent and
    // the shared rope key; wk_b (n_head, kv_lora, no-rope) absorbs a query into the latent space,
    // wv_b (n_head, value_dim, kv_lora) turns the attended latent into a head's value.
    Weight wq_a, wq_b, wkv_a, wk_b, wv_b;
    std::vector<float> q_a_norm, kv_a_norm;
    // Short convolution (lfm2moe): in_proj gives gates b, c and input x; the layer's output is
    // out_proj(c * conv(b * x)), conv_kernel (n_embd, l_cache) per channel, the last tap on the newest.
    Weight conv_in, conv_out;
    std::vector<float> conv_kernel;
    int32_t conv_index = -1;                  // >= 0: a short-convolution layer, its slot in KvCache::conv
    // Gated delta-net (qwen35moe): attn_qkv gives the q, k, v channels (convolved over time, then
    // silu), attn_gate z; ssm_beta / ssm_alpha one value per v head (the update strength, and with
    // ssm_dt and ssm_a the decay); ssm_out maps the heads' gated RMSNorm back.
    Weight ssm_qkv, ssm_z, ssm_beta, ssm_alpha, ssm_out;
    Weight ssm_ba;                            // qwen3next: beta and alpha in one matrix (ModelImpl::ssm_grouped)
    std::vector<float> ssm_conv1d, ssm_dt, ssm_a, ssm_norm;  // (channels, kernel), (v heads) x2, (state)
    int32_t recr_index = -1;                  // >= 0: a delta-net layer, its slot in KvCache::recr
    bool swa = false;                         // attends the last ModelInfo::sliding_window positions
    bool moe() const { return (bool)router; }
};

enum class QkNorm { none, per_head, whole };

inline uint8_t fmt_bit(ActFormat f) { return (uint8_t)(1u << (int)f); }
// Largest activation block among fmts (1 for f32 only).
inline int64_t act_block(uint8_t fmts) {
    int64_t block = 1;
    for (int f = 0; f < kActFormatCount; ++f)
        if (fmts & (1u << f)) block = std::max<int64_t>(block, act_type((ActFormat)f).block_elems);
    return block;
}

// Activation formats each input of a layer must be quantized to (bit set of ActFormat).
struct LayerFormats { uint8_t attn_in = 0, att_out = 0, ffn_in = 0, q_b_in = 0; };

// The forward pass's dimensions and activation formats, fixed at load. Formats are kept for both
// kernel choices: [0] the integer kernels (as llama.cpp), [1] float activations.
struct ForwardPlan {
    // Attention works on heads of att_k dims (scores) and att_v dims (values): head_dim both, or
    // with MLA kv_lora + n_rot and kv_lora over one shared KV head (values = the keys' first dims).
    int64_t n_embd = 0, q_dim = 0, kv_dim = 0;  // n_head * att_k, n_head_kv * att_k
    int64_t att_k = 0, att_v = 0;
    int64_t v_dim = 0;     // V cache row: n_head_kv * att_v (0 with MLA)
    int64_t att_dim = 0;   // attention output: n_head * att_v
    int64_t wo_dim = 0;    // attn_output's input: att_dim, or n_head * value_dim with MLA
    float att_scale = 1;
    int64_t max_ff = 0;   // widest FFN hidden layer (routed or shared)
    int32_t group = 1;    // query heads per KV head
    int32_t slots = 1;    // FFN uses per token: top-k routed [+ shared], or 1 dense
    // Gated delta-net layers: conv channels (q, k, v) and the heads' output width (v heads * state);
    // a layer's recurrent state in floats: the last kernel - 1 raw channel rows, then per v head
    // ssm_head floats (see delta_rule_phase).
    int64_t ssm_ch = 0, ssm_v = 0, ssm_head = 0, ssm_floats = 0;
    std::vector<LayerFormats> layer_formats[2];
    uint8_t output_formats[2] = {0, 0};
};


struct ExpertStore;

// The FFN's gated activation: silu(gate) * up, or gpt-oss's clamped variant
// min(gate, 7) * sigmoid(1.702 min(gate, 7)) * (clamp(up, -7, 7) + 1).
enum class FfnAct { silu, swiglu_oai };

// RoPE angles per pair i of a head: theta_i = pos * inv_freq[i] mixed by YaRN (ggml's rope_yarn):
// interpolated (times freq_scale) where ramp[i] = 0, extrapolated where 1; cos and sin times mscale.
struct RopeTable {
    std::vector<float> inv_freq, ramp;  // (n_rot / 2)
    float freq_scale = 1.f, mscale = 1.f;
    void angles(int32_t pos, float* cs) const {
        for (size_t i = 0; i < inv_freq.size(); ++i) {
            const float extrap = (float)pos * inv_freq[i], interp = freq_scale * extrap;
            const float theta = ramp.empty() ? interp : interp * (1 - ramp[i]) + extrap * ramp[i];
            cs[2 * i] = std::cos(theta) * mscale;
            cs[2 * i + 1] = std::sin(theta) * mscale;
        }
    }
};

struct ModelImpl {
    GgufFile file;
    Tokenizer tokenizer;
    ModelInfo info;
    QkNorm qk_norm = QkNorm::none;
    FfnAct ffn_act = FfnAct::silu;
    RopeTable rope;
    RopeTable rope_swa;  // sliding-window layers whose base differs (rope.freq_base_swa); else empty
    bool mla = false;      // multi-head latent attention (ModelInfo::kv_lora_rank)
    bool ssm_grouped = false;  // delta net: v heads grouped by q/k head and beta/alpha fused (qwen3next), else tiled (qwen35moe)
    // Tensors never read (NextN layers): [offset, end) in the file, and their bytes.
    std::vector<std::pair<uint64_t, uint64_t>> unused_ranges;
    uint64_t unused_bytes = 0;
    std::list<std::vector<float>> owned;  // weights made at load (old deepseek2 files' split attn_kv_b)
    float att_scale = 0;   // scale of q.k; 0: 1 / sqrt(head_dim)
    Weight token_embd, output;
    std::vector<float> output_norm;
    std::vector<LayerWeights> layers;
    ForwardPlan plan;
    LogFn log = nullptr;
    void* log_user = nullptr;
    std::shared_ptr<ExpertStore> store;  // LoadOptions::mem_budget; null: experts read from the mapping
};

struct Loader {
    ModelImpl& m;
    std::string arch;

    std::string key(const char* suffix) const { return arch + "." + suffix; }

    Status u32(const char* suffix, uint32_t* out, bool required, uint32_t fallback) {
        std::string k = key(suffix);
        Status s = m.file.get_u32(k.c_str(), out);
        if (s == Status::missing_key && !required) { *out = fallback; return Status::ok; }
        return s;
    }
    Status f32(const char* suffix, float* out, bool required, float fallback) {
        std::string k = key(suffix);
        Status s = m.file.get_f32(k.c_str(), out);
        if (s == Status::missing_key && !required) { *out = fallback; return Status::ok; }
        return s;
    }

    // Finds `name`, checks its shape {ne0, ne1, ne2} (0 = any) and returns it; optional tensors
    // that are absent leave `out` empty.
    Status weight(const std::string& name, int64_t ne0, int64_t ne1, int64_t ne2, bool required, Weight* out) {
        const GgufTensorInfo* t = m.file.find_tensor(name.c_str());
        if (!t) return required ? fail(Status::missing_tensor, "missing tensor '%s'", name.c_str()) : Status::ok;
        int64_t want[3] = {ne0, ne1, ne2};
        for (int d = 0; d < 3; ++d)
            if (want[d] && t->ne[d] != want[d])
                return fail(Status::shape_mismatch, "tensor '%s' has shape {%lld, %lld, %lld}, expected {%lld, %lld, %lld}", name.c_str(),
                            (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)ne0, (long long)ne1, (long long)ne2);
        if (t->ne[3] != 1 || (ne2 == 0 && t->ne[2] != 1))
            return fail(Status::shape_mismatch, "tensor '%s' has too many dimensions", name.c_str());
        const QuantType* tt = quant_type(t->type);
        out->data = t->data;
        out->type = t->type;
        out->qt = tt;
        out->cols = t->ne[0];
        out->rows = t->ne[1];
        out->n_mats = t->ne[2];
        out->row_bytes = (size_t)(t->ne[0] / tt->block_elems * tt->block_bytes);
        out->mat_bytes = out->row_bytes * (size_t)t->ne[1];
        out->kernel = row_kernel(*tt, active_isa(), t->ne[0]);
        out->kernel_f32 = row_kernel_f32(*tt);
        // A second-level output scale (NVFP4 from ModelOpt, or moe-quantize's): {1} or one per matrix.
        const size_t dot = name.rfind(".weight");
        const GgufTensorInfo* sc = dot == std::string::npos ? nullptr : m.file.find_tensor((name.substr(0, dot) + ".scale").c_str());
        if (sc) {
            const int64_t k = sc->n_elements();
            if ((k != 1 && k != t->ne[2]) || sc->ne[0] != k)
                return fail(Status::shape_mismatch, "tensor '%s.scale' has %lld elements, expected 1 or %lld", name.substr(0, dot).c_str(), (long long)k,
                            (long long)t->ne[2]);
            out->out_scale.resize((size_t)k);
            Status s = dequantize_row((TensorType)sc->type, sc->data, out->out_scale.data(), k);
            if (s != Status::ok) return s;
            for (float v : out->out_scale)
                if (!std::isfinite(v)) return fail(Status::invalid_file, "tensor '%s.scale' holds a non-finite value", name.substr(0, dot).c_str());
        }
        return Status::ok;
    }

    // A vector {n} (or n_rows vectors {n, n_rows}) as floats.
    Status vector(const std::string& name, int64_t n, bool required, std::vector<float>* out, int64_t n_rows = 1) {
        const GgufTensorInfo* t = m.file.find_tensor(name.c_str());
        if (!t) return required ? fail(Status::missing_tensor, "missing tensor '%s'", name.c_str()) : Status::ok;
        if (t->n_elements() != n * n_rows || t->ne[0] != n)
            return fail(Status::shape_mismatch, "tensor '%s' has %lld elements, expected %lld", name.c_str(), (long long)t->n_elements(), (long long)(n * n_rows));
        out->resize((size_t)(n * n_rows));
        Status s = dequantize_row((TensorType)t->type, t->data, out->data(), n * n_rows);
        if (s != Status::ok) return s;
        for (float v : *out)
            if (!std::isfinite(v)) return fail(Status::invalid_file, "tensor '%s' holds a non-finite value", name.c_str());
        return Status::ok;
    }
};

// Dimensions and the activation formats each matmul input must be quantized to.
inline void plan_forward(ModelImpl& m) {
    const ModelInfo& hp = m.info;
    ForwardPlan& p = m.plan;
    p.n_embd = hp.n_embd;
    p.att_k = m.mla ? hp.kv_lora_rank + hp.n_rot : hp.head_dim;
    p.att_v = m.mla ? hp.kv_lora_rank : hp.head_dim;
    p.q_dim = (int64_t)hp.n_head * p.att_k;
    p.kv_dim = (int64_t)hp.n_head_kv * p.att_k;
    p.v_dim = m.mla ? 0 : (int64_t)hp.n_head_kv * p.att_v;
    p.att_dim = (int64_t)hp.n_head * p.att_v;
    p.wo_dim = m.mla ? (int64_t)hp.n_head * hp.value_dim : p.att_dim;
    p.att_scale = m.att_scale > 0 ? m.att_scale : 1.f / std::sqrt((float)hp.head_dim);
    p.group = hp.n_head / hp.n_head_kv;
    p.max_ff = std::max<int64_t>(std::max(hp.n_ff, hp.n_ff_shared), hp.n_ff_dense);
    p.slots = hp.n_expert > 0 ? hp.n_expert_used + (hp.n_ff_shared > 0 ? 1 : 0) : 1;  // a dense layer uses slot 0
    if (hp.ssm_state > 0) {
        const int64_t DS = hp.ssm_state;
        p.ssm_ch = 2 * hp.ssm_k_heads * DS + hp.ssm_v_heads * DS;
        p.ssm_v = hp.ssm_v_heads * DS;
        p.ssm_head = DS * DS + 2 * DS + 1;
        p.ssm_floats = (hp.ssm_conv_kernel - 1) * p.ssm_ch + hp.ssm_v_heads * p.ssm_head;
    }
    for (int fa = 0; fa < 2; ++fa) {
        auto bit = [&](const Weight& w) -> uint8_t { return w ? fmt_bit(fa ? w.kernel_f32.act : w.kernel.act) : (uint8_t)0; };
        p.layer_formats[fa].resize((size_t)hp.n_layer);
        for (int il = 0; il < hp.n_layer; ++il) {
            const LayerWeights& l = m.layers[(size_t)il];
            LayerFormats& f = p.layer_formats[fa][(size_t)il];
            f.attn_in = (uint8_t)(bit(l.wq) | bit(l.wk) | bit(l.wv) | bit(l.wq_a) | bit(l.wkv_a) | bit(l.conv_in) | bit(l.ssm_qkv) | bit(l.ssm_z) |
                                  bit(l.ssm_beta) | bit(l.ssm_alpha) | bit(l.ssm_ba));
            f.q_b_in = bit(l.wq_b);
            f.att_out = (uint8_t)(bit(l.wo) | bit(l.conv_out) | bit(l.ssm_out));
            f.ffn_in = (uint8_t)(bit(l.router) | bit(l.gate_exps) | bit(l.up_exps) | bit(l.gate_hot) | bit(l.up_hot) | bit(l.gate) | bit(l.up) | bit(l.gate_shexp) | bit(l.up_shexp));
        }
        p.output_formats[fa] = bit(m.output);
    }
}

// Layer il's hot experts (a hot/cold file): the next n_hot ids of `moe_infer.hot_experts` (the layers'
// lists one after another, each ascending) become expert_mat, the map from expert to matrix.
constexpr const char* kHotExpertsKey = "moe_infer.hot_experts";
inline Status hot_experts(const std::vector<int32_t>* list, uint32_t il, int64_t n_hot, uint32_t n_expert, size_t* cursor,
                          std::vector<int32_t>* expert_mat) {
    if (!list) return fail(Status::invalid_file, "layer %u has hot expert tensors but the file has no %s list", il, kHotExpertsKey);
    const std::vector<int32_t>& ids = *list;
    if (n_hot <= 0 || n_hot >= (int64_t)n_expert)
        return fail(Status::shape_mismatch, "layer %u has %lld hot experts of %u (expected 1 to %u)", il, (long long)n_hot, n_expert, n_expert - 1);
    if ((int64_t)(ids.size() - *cursor) < n_hot)
        return fail(Status::invalid_file, "%s has %zu ids, too few for layer %u's %lld hot experts", kHotExpertsKey, ids.size(), il, (long long)n_hot);
    expert_mat->assign(n_expert, 0);
    for (int64_t j = 0; j < n_hot; ++j) {
        const int32_t e = ids[*cursor + (size_t)j];
        if (e < 0 || e >= (int32_t)n_expert || (j > 0 && e <= ids[*cursor + (size_t)j - 1]))
            return fail(Status::invalid_file, "%s: layer %u's hot expert ids must ascend within 0..%u (got %d)", kHotExpertsKey, il, n_expert - 1, e);
        (*expert_mat)[(size_t)e] = (int32_t)(-1 - j);
    }
    int32_t cold = 0;
    for (int32_t& mat : *expert_mat)
        if (mat == 0) mat = cold++;
    *cursor += (size_t)n_hot;
    return Status::ok;
}

// A float32 Weight over storage the model owns (ModelImpl::owned).
inline Weight owned_f32_weight(ModelImpl& m, std::vector<float>&& values, int64_t cols, int64_t rows, int64_t n_mats) {
    m.owned.push_back(std::move(values));
    const QuantType* f32 = quant_type((uint32_t)TensorType::f32);
    Weight w;
    w.data = reinterpret_cast<const uint8_t*>(m.owned.back().data());
    w.type = (uint32_t)TensorType::f32;
    w.qt = f32;
    w.cols = cols; w.rows = rows; w.n_mats = n_mats;
    w.row_bytes = (size_t)cols * 4;
    w.mat_bytes = w.row_bytes * (size_t)rows;
    w.kernel = row_kernel(*f32, active_isa(), cols);
    w.kernel_f32 = row_kernel_f32(*f32);
    return w;
}

// An old deepseek2 file's joint attn_kv_b {kv_lora, n_head * (nope + v)} (each head's nope key
// rows, then its value rows) as the absorbed form's wk_b {nope, kv_lora, n_head} (transposed) and
// wv_b {kv_lora, v, n_head}.
inline Status split_kv_b(ModelImpl& m, const Weight& kv_b, int64_t n_head, int64_t nope, int64_t v, Weight* wk_b, Weight* wv_b) {
    const int64_t lora = kv_b.cols;
    std::vector<float> row((size_t)lora), k((size_t)(n_head * lora * nope)), vals((size_t)(n_head * v * lora));
    for (int64_t h = 0; h < n_head; ++h)
        for (int64_t j = 0; j < nope + v; ++j) {
            Status s = dequantize_row((TensorType)kv_b.type, kv_b.row(0, h * (nope + v) + j), row.data(), lora);
            if (s != Status::ok) return s;
            if (kv_b.scaled()) for (float& x : row) x *= kv_b.scale(0);
            for (int64_t r = 0; r < lora; ++r) {
                if (j < nope) k[(size_t)((h * lora + r) * nope + j)] = row[(size_t)r];
                else vals[(size_t)((h * v + (j - nope)) * lora + r)] = row[(size_t)r];
            }
        }
    *wk_b = owned_f32_weight(m, std::move(k), nope, lora, n_head);
    *wv_b = owned_f32_weight(m, std::move(vals), lora, v, n_head);
    return Status::ok;
}

// A metadata array with one flag per layer (booleans or integers, at least n_layer of them).
inline Status read_layer_flags(const GgufKeyValue& e, const std::string& key, uint32_t n_layer, std::vector<bool>* flags) {
    if (e.type != GgufValueType::array || e.array_count < n_layer || (e.array_type != GgufValueType::boolean && !gguf_is_integer(e.array_type)))
        return fail(Status::invalid_file, "'%s' must hold a flag per layer", key.c_str());
    const size_t es = gguf_scalar_size(e.array_type);
    flags->assign(n_layer, false);
    for (uint32_t il = 0; il < n_layer; ++il) {
        uint64_t u; double f;
        gguf_decode_scalar(e.array_type, e.array_data + il * es, &u, &f);
        (*flags)[il] = u != 0;
    }
    return Status::ok;
}

inline Status load_model(ModelImpl& m) {
    ModelInfo& hp = m.info;
    Status s = m.file.get_string("general.architecture", &hp.architecture);
    if (s != Status::ok) return s;
    const std::string& arch = hp.architecture;
    const bool is_qwen3moe = arch == "qwen3moe", is_olmoe = arch == "olmoe", is_qwen2moe = arch == "qwen2moe", is_llama = arch == "llama";
    const bool is_gptoss = arch == "gpt-oss", is_glm4moe = arch == "glm4moe", is_deepseek2 = arch == "deepseek2", is_lfm2moe = arch == "lfm2moe";
    const bool is_qwen35moe = arch == "qwen35moe", is_qwen3next = arch == "qwen3next";
    const bool is_delta = is_qwen35moe || is_qwen3next;  // gated delta-net beside gated attention
    if (!is_qwen3moe && !is_olmoe && !is_qwen2moe && !is_llama && !is_gptoss && !is_glm4moe && !is_deepseek2 && !is_lfm2moe && !is_delta)
        return fail(Status::unsupported,
                    "unsupported architecture '%s' (supported: qwen3moe, olmoe, qwen2moe, llama, gpt-oss, glm4moe, deepseek2, lfm2moe, qwen35moe, qwen3next)",
                    arch.c_str());
    m.file.get_string("general.name", &hp.name);
    last_error_storage().clear();

    Loader L{m, arch};
    uint32_t n_embd, n_layer_all, n_nextn, n_head, n_head_kv, n_ctx, n_expert, n_used, n_ff, n_ff_exp, n_ff_sh, n_shared, n_dense_lead, key_len, val_len, n_rot;
    if ((s = L.u32("embedding_length", &n_embd, true, 0)) != Status::ok) return s;
    if ((s = L.u32("block_count", &n_layer_all, true, 0)) != Status::ok) return s;
    // NextN / multi-token-prediction layers come after the trunk and count in block_count; they
    // only draft tokens, so they are not loaded.
    if ((s = L.u32("nextn_predict_layers", &n_nextn, false, 0)) != Status::ok) return s;
    if (n_nextn >= n_layer_all) return fail(Status::invalid_file, "nextn_predict_layers %u leaves no layers of %u", n_nextn, n_layer_all);
    const uint32_t n_layer = n_layer_all - n_nextn;
    if ((s = L.u32("attention.head_count", &n_head, true, 0)) != Status::ok) return s;
    hp.layer_conv.assign(n_layer, false);
    {
        // head_count_kv may be a per-layer array; we support arrays whose entries are all equal
        // (lfm2moe: 0 marks a short-convolution layer).
        std::string k = L.key("attention.head_count_kv");
        const GgufKeyValue* e = m.file.find(k.c_str());
        if (e && e->type == GgufValueType::array) {
            std::vector<int32_t> per_layer;
            if ((s = m.file.get_i32_array(k.c_str(), &per_layer)) != Status::ok) return s;
            if (per_layer.size() < n_layer) return fail(Status::invalid_file, "'%s' has %zu entries for %u layers", k.c_str(), per_layer.size(), n_layer);
            int32_t heads = 0;
            for (uint32_t il = 0; il < n_layer; ++il) {
                if (is_lfm2moe && per_layer[il] == 0) { hp.layer_conv[il] = true; continue; }
                if (per_layer[il] <= 0) return fail(Status::invalid_file, "'%s'[%u] = %d is not a head count", k.c_str(), il, per_layer[il]);
                if (heads && per_layer[il] != heads) return fail(Status::unsupported, "'%s': per-layer KV head counts are not supported", k.c_str());
                heads = per_layer[il];
            }
            if (heads <= 0) return fail(Status::invalid_file, "'%s' has no attention layer", k.c_str());
            n_head_kv = (uint32_t)heads;
        } else if ((s = L.u32("attention.head_count_kv", &n_head_kv, false, n_head)) != Status::ok) {
            return s;
        }
    }
    hp.layer_recurrent.assign(n_layer, false);
    if (is_delta) {
        // Gated delta-net layers: attention.recurrent_layers (a flag per layer, MTP layers after
        // the trunk included), else every full_attention_interval-th layer attends in full.
        const std::string k = L.key("attention.recurrent_layers");
        if (const GgufKeyValue* e = m.file.find(k.c_str())) {
            if ((s = read_layer_flags(*e, k, n_layer, &hp.layer_recurrent)) != Status::ok) return s;
        } else {
            uint32_t interval = 4;
            if ((s = L.u32("full_attention_interval", &interval, false, 4)) != Status::ok) return s;
            if (interval == 0) return fail(Status::invalid_file, "full_attention_interval must be positive");
            for (uint32_t il = 0; il < n_layer; ++il) hp.layer_recurrent[il] = (il + 1) % interval != 0;
        }
        uint32_t conv = 0, state = 0, groups = 0, v_heads = 0, inner = 0;
        if ((s = L.u32("ssm.conv_kernel", &conv, true, 0)) != Status::ok) return s;
        if ((s = L.u32("ssm.state_size", &state, true, 0)) != Status::ok) return s;
        if ((s = L.u32("ssm.group_count", &groups, true, 0)) != Status::ok) return s;
        if ((s = L.u32("ssm.time_step_rank", &v_heads, true, 0)) != Status::ok) return s;
        if ((s = L.u32("ssm.inner_size", &inner, true, 0)) != Status::ok) return s;
        if (conv < 2 || conv > 64 || state == 0 || state > 1024 || groups == 0 || groups > 1024 || v_heads == 0 || v_heads > 1024 ||
            v_heads % groups || inner != state * v_heads)
            return fail(Status::invalid_file, "inconsistent delta-net parameters (conv_kernel %u, state_size %u, group_count %u, time_step_rank %u, inner_size %u)",
                        conv, state, groups, v_heads, inner);
        hp.ssm_conv_kernel = (int32_t)conv; hp.ssm_state = (int32_t)state; hp.ssm_k_heads = (int32_t)groups; hp.ssm_v_heads = (int32_t)v_heads;
        hp.attn_output_gate = true;
        // qwen3next keeps Qwen's own order: v head h belongs to q/k head h / (v heads / k heads), and
        // one ssm_ba matrix gives per q/k head its v heads' beta rows, then their alpha rows;
        // qwen35moe files are converted to tiled v heads (h % k heads) and separate ssm_beta / ssm_alpha.
        m.ssm_grouped = is_qwen3next;
    }
    if ((s = L.u32("context_length", &n_ctx, false, 4096)) != Status::ok) return s;
    if ((s = L.u32("expert_count", &n_expert, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_used_count", &n_used, false, 0)) != Status::ok) return s;
    if ((s = L.u32("feed_forward_length", &n_ff, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_feed_forward_length", &n_ff_exp, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_shared_feed_forward_length", &n_ff_sh, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_shared_count", &n_shared, false, 0)) != Status::ok) return s;
    if ((s = L.u32("leading_dense_block_count", &n_dense_lead, false, 0)) != Status::ok) return s;
    if ((s = L.f32("attention.layer_norm_rms_epsilon", &hp.rms_eps, true, 0)) != Status::ok) return s;
    if ((s = L.f32("rope.freq_base", &hp.rope_freq_base, false, 10000.f)) != Status::ok) return s;

    // Cap every dimension before any product is formed; real models are far below these.
    if (n_embd == 0 || n_embd > 65536 || n_layer == 0 || n_layer > 1024 || n_head == 0 || n_head > 1024 || n_head_kv == 0 ||
        n_head_kv > n_head || n_head % n_head_kv != 0 || n_expert > 4096 || n_used > n_expert || (n_expert > 0 && n_used == 0) ||
        n_ff > 1 << 20 || n_ff_exp > 1 << 20 || n_ff_sh > 1 << 20 || n_shared > 64 || n_ctx == 0)
        return fail(Status::invalid_file, "inconsistent hyper-parameters (n_embd %u, layers %u, heads %u/%u, experts %u/%u)", n_embd, n_layer,
                    n_head, n_head_kv, n_used, n_expert);
    if (n_dense_lead > n_layer) return fail(Status::invalid_file, "leading_dense_block_count %u exceeds the %u layers", n_dense_lead, n_layer);
    if ((s = L.u32("attention.key_length", &key_len, false, n_embd / n_head)) != Status::ok) return s;
    if ((s = L.u32("attention.value_length", &val_len, false, key_len)) != Status::ok) return s;
    uint32_t q_lora = 0, kv_lora = 0;
    bool legacy_kv_b = false;
    if (is_deepseek2) {
        // MLA: key_length / value_length describe the cached latent (kv_lora + rope, kv_lora); a
        // head's own sizes are the _mla keys. Files without them carry the old joint attn_kv_b.
        if ((s = L.u32("attention.kv_lora_rank", &kv_lora, true, 0)) != Status::ok) return s;
        if ((s = L.u32("attention.q_lora_rank", &q_lora, false, 0)) != Status::ok) return s;
        // Files of older converters carry a joint attn_kv_b and no _mla keys (key_length is then
        // a head's own); it is split into wk_b / wv_b (as floats) at load.
        legacy_kv_b = !m.file.find(L.key("attention.key_length_mla").c_str());
        if (!legacy_kv_b && (s = L.u32("attention.key_length_mla", &key_len, true, 0)) != Status::ok) return s;
        if (!legacy_kv_b && (s = L.u32("attention.value_length_mla", &val_len, true, 0)) != Status::ok) return s;
        if (kv_lora == 0 || kv_lora > 16384 || q_lora > 65536 || val_len == 0 || val_len > 1024)
            return fail(Status::invalid_file, "invalid MLA ranks (q_lora_rank %u, kv_lora_rank %u, value_length_mla %u)", q_lora, kv_lora, val_len);
        if (n_head_kv != n_head && n_head_kv != 1) return fail(Status::invalid_file, "deepseek2 with %u KV heads of %u", n_head_kv, n_head);
        n_head_kv = 1;  // one latent shared by all heads
    } else if (key_len != val_len) {
        return fail(Status::unsupported, "key_length %u != value_length %u is not supported", key_len, val_len);
    }
    if (key_len == 0 || key_len > 1024) return fail(Status::invalid_file, "invalid head size %u", key_len);
    if ((s = L.u32("rope.dimension_count", &n_rot, false, key_len)) != Status::ok) return s;
    if (n_rot > key_len || n_rot % 2 || (is_deepseek2 && (n_rot == 0 || n_rot >= key_len)))
        return fail(Status::invalid_file, "rope.dimension_count %u is invalid for head size %u", n_rot, key_len);
    hp.rms_eps = std::max(hp.rms_eps, 0.f);
    if (!(hp.rope_freq_base > 0)) return fail(Status::invalid_file, "rope.freq_base must be positive");
    {
        std::vector<int32_t> sections;  // M-RoPE (vision-language files): positions are not 1-D
        const std::string k = L.key("rope.dimension_sections");
        if (is_qwen35moe) {
            // IMROPE: text positions are the same on the t/h/w axes, so a pair rotates by pos unless
            // its section is none of them (see the RoPE tables below).
            if ((s = m.file.get_i32_array(k.c_str(), &sections)) != Status::ok) return s;
            int64_t sum = 0;
            for (int32_t v : sections) sum += v < 0 ? -(1 << 30) : v;
            if (sections.size() < 4 || sum <= 0 || sections[0] + sections[1] + sections[2] <= 0)
                return fail(Status::invalid_file, "'%s' must hold 4 non-negative sections, not all zero", k.c_str());
            sections.resize(4);
            hp.rope_sections = sections;
        } else if (m.file.find(k.c_str()) && m.file.get_i32_array(k.c_str(), &sections) == Status::ok && sections.size() >= 2 && sections[0] > 0 &&
                   sections[1] > 0) {
            return fail(Status::unsupported, "multimodal rotary sections ('%s') are not supported", k.c_str());
        }
        last_error_storage().clear();
    }

    // RoPE scaling, as llama.cpp applies it: linear divides the angles; YaRN (ext_factor 1, beta_fast
    // 32, beta_slow 1) interpolates the low frequencies, extrapolates the high ones and scales cos/sin
    // by 1 + 0.1 ln(factor), also inside the original context.
    float attn_factor = 1.f, yarn_log_mul = 0.f;
    uint32_t n_ctx_orig = n_ctx;
    {
        std::string scaling;
        std::string k = L.key("rope.scaling.type");
        if (m.file.get_string(k.c_str(), &scaling) == Status::ok && scaling != "none") {
            float factor = 1;
            if ((s = L.f32("rope.scaling.factor", &factor, false, 1.f)) != Status::ok) return s;
            if (scaling != "linear" && scaling != "yarn") return fail(Status::unsupported, "rope scaling '%s' is not supported", scaling.c_str());
            if (!(factor > 0) || !std::isfinite(factor)) return fail(Status::invalid_file, "rope.scaling.factor %g is invalid", (double)factor);
            hp.rope_freq_scale = 1.f / factor;
            hp.rope_yarn = scaling == "yarn";
        }
        float scale_linear = 0;
        if (L.f32("rope.scale_linear", &scale_linear, false, 0.f) == Status::ok && scale_linear > 0) hp.rope_freq_scale = 1.f / scale_linear;
        if ((s = L.u32("rope.scaling.original_context_length", &n_ctx_orig, false, n_ctx)) != Status::ok) return s;
        if ((s = L.f32("rope.scaling.attn_factor", &attn_factor, false, 1.f)) != Status::ok) return s;
        if (is_deepseek2 && (s = L.f32("rope.scaling.yarn_log_multiplier", &yarn_log_mul, false, 0.f)) != Status::ok) return s;
        yarn_log_mul /= 0.1f;  // the converter stores 0.1 * mscale_all_dim
        if (!std::isfinite(yarn_log_mul)) return fail(Status::invalid_file, "invalid rope.scaling.yarn_log_multiplier");
        if (!(attn_factor > 0) || !std::isfinite(attn_factor) || n_ctx_orig == 0) return fail(Status::invalid_file, "invalid rope scaling parameters");
        last_error_storage().clear();
    }

    hp.n_embd = (int32_t)n_embd; hp.n_layer = (int32_t)n_layer; hp.n_head = (int32_t)n_head; hp.n_head_kv = (int32_t)n_head_kv;
    hp.head_dim = (int32_t)key_len; hp.n_rot = (int32_t)n_rot; hp.n_ctx_train = (int32_t)n_ctx;
    hp.n_expert = (int32_t)n_expert; hp.n_expert_used = (int32_t)n_used;
    // qwen3moe/qwen2moe/gpt-oss/glm4moe keep the per-expert size in expert_feed_forward_length (and
    // the dense layers' in feed_forward_length); olmoe/Mixtral in feed_forward_length.
    hp.n_ff = (int32_t)(n_expert > 0 && n_ff_exp > 0 ? n_ff_exp : n_ff);
    hp.n_ff_shared = (int32_t)(is_glm4moe || is_deepseek2 ? n_ff_exp * n_shared : n_ff_sh);
    hp.q_lora_rank = (int32_t)q_lora; hp.kv_lora_rank = (int32_t)kv_lora; hp.value_dim = (int32_t)val_len;
    m.mla = is_deepseek2;
    hp.n_layer_dense_lead = n_expert > 0 ? (int32_t)n_dense_lead : (int32_t)n_layer;
    hp.n_ff_dense = n_expert > 0 ? (n_dense_lead > 0 ? (int32_t)n_ff : 0) : hp.n_ff;
    if (hp.n_layer_dense_lead > 0 && hp.n_ff_dense <= 0) return fail(Status::invalid_file, "missing feed_forward_length for the dense layers");
    hp.rope_neox = !is_llama && !is_deepseek2;  // llama.cpp: qwen*/olmoe/gpt-oss/glm4moe use NEOX RoPE, llama and deepseek2 normal RoPE
    hp.expert_weights_norm = is_qwen3moe || is_llama || is_delta;  // olmoe and qwen2moe keep the raw softmax weights
    if (!is_gptoss && !is_delta) {  // gpt-oss's softmax over the chosen k is never renormalised; qwen35moe/qwen3next always renormalise
        bool norm = hp.expert_weights_norm;
        if (L.m.file.get_bool(L.key("expert_weights_norm").c_str(), &norm) == Status::ok) hp.expert_weights_norm = norm;
        last_error_storage().clear();
    }
    hp.expert_gating = is_gptoss ? ExpertGating::softmax_weight : is_glm4moe ? ExpertGating::sigmoid : ExpertGating::softmax;
    if (is_lfm2moe) {
        uint32_t g = 0, l_cache = 0;
        if ((s = L.u32("expert_gating_func", &g, n_expert > 0, 0)) != Status::ok) return s;
        if (g > 3) return fail(Status::unsupported, "expert_gating_func %u is not supported (1 softmax, 2 sigmoid, 3 softmax_weight)", g);
        if (g) hp.expert_gating = (ExpertGating)g;
        hp.expert_weights_norm = true;  // llama.cpp always renormalises for this family
        if ((s = L.u32("shortconv.l_cache", &l_cache, true, 0)) != Status::ok) return s;
        if (l_cache < 2 || l_cache > 64) return fail(Status::invalid_file, "shortconv.l_cache %u is out of range [2, 64]", l_cache);
        hp.shortconv_l_cache = (int32_t)l_cache;
    }
    if (is_deepseek2) {
        hp.expert_weights_norm = false;  // llama.cpp's default where the key is absent
        if (m.file.get_bool(L.key("expert_weights_norm").c_str(), &hp.expert_weights_norm) != Status::ok) hp.expert_weights_norm = false;
        last_error_storage().clear();
    }
    {   // grouped top-k (llama.cpp reads it for every architecture)
        uint32_t groups = 0, used_groups = 0;
        if ((s = L.u32("expert_group_count", &groups, false, 0)) != Status::ok) return s;
        if ((s = L.u32("expert_group_used_count", &used_groups, false, 0)) != Status::ok) return s;
        if (groups > 1 && (n_expert == 0 || groups > n_expert || n_expert % groups || used_groups == 0 || used_groups >= groups ||
                           n_used > n_expert / groups * used_groups))
            return fail(Status::invalid_file, "expert groups %u (used %u) do not fit %u experts, top-%u", groups, used_groups, n_expert, n_used);
        hp.n_expert_groups = groups > 1 ? (int32_t)groups : 0;
        hp.n_group_used = groups > 1 ? (int32_t)used_groups : 0;
    }
    uint32_t gating_key = 0;
    if (is_glm4moe || is_deepseek2) {
        uint32_t& g = gating_key;
        if ((s = L.u32("expert_gating_func", &g, false, 0)) != Status::ok) return s;
        if (g > 3) return fail(Status::unsupported, "expert_gating_func %u is not supported (1 softmax, 2 sigmoid, 3 softmax_weight)", g);
        if (g) hp.expert_gating = (ExpertGating)g;
        float scale = 0;
        if ((s = L.f32("expert_weights_scale", &scale, false, 0.f)) != Status::ok) return s;
        if (!std::isfinite(scale) || scale < 0) return fail(Status::invalid_file, "expert_weights_scale %g is invalid", (double)scale);
        hp.expert_weights_scale = scale != 0 ? scale : 1.f;  // llama.cpp: 0 means none
        if (n_expert > 0 && n_shared == 0) return fail(Status::invalid_file, "%s needs expert_shared_count > 0", arch.c_str());
    }
    hp.layer_swa.assign(n_layer, false);
    if (is_gptoss) {
        uint32_t window = 0;
        if ((s = L.u32("attention.sliding_window", &window, true, 0)) != Status::ok) return s;
        if (window == 0) return fail(Status::invalid_file, "attention.sliding_window must be positive");
        hp.sliding_window = (int32_t)std::min<uint32_t>(window, 1u << 30);
        const std::string k = L.key("attention.sliding_window_pattern");
        const GgufKeyValue* e = m.file.find(k.c_str());
        if (e && e->type == GgufValueType::array) {  // one flag per layer
            if ((s = read_layer_flags(*e, k, n_layer, &hp.layer_swa)) != Status::ok) return s;
        } else {  // every n-th layer attends in full: layers il % n < n - 1 slide (0: all slide)
            uint32_t pattern = 2;
            if ((s = L.u32("attention.sliding_window_pattern", &pattern, false, 2)) != Status::ok) return s;
            for (uint32_t il = 0; il < n_layer; ++il) hp.layer_swa[il] = pattern == 0 || il % pattern < pattern - 1;
        }
        m.ffn_act = FfnAct::swiglu_oai;
    }
    if (hp.n_ff <= 0) return fail(Status::invalid_file, "missing or zero feed-forward size for '%s'", arch.c_str());

    // The RoPE tables (see RopeTable); sliding-window layers may have a base of their own.
    float base_swa = hp.rope_freq_base;
    if (is_gptoss && (s = L.f32("rope.freq_base_swa", &base_swa, false, hp.rope_freq_base)) != Status::ok) return s;
    if (!(base_swa > 0)) return fail(Status::invalid_file, "rope.freq_base_swa must be positive");
    for (RopeTable* table : {&m.rope, &m.rope_swa}) {
        const float base = table == &m.rope ? hp.rope_freq_base : base_swa;
        if (table == &m.rope_swa && base == hp.rope_freq_base) break;
        RopeTable& rt = *table;
        const int half = hp.n_rot / 2;
        rt.inv_freq.resize((size_t)half);
        for (int i = 0; i < half; ++i) rt.inv_freq[(size_t)i] = std::pow(base, -2.f * (float)i / (float)hp.n_rot);
        rt.freq_scale = hp.rope_freq_scale;
        rt.mscale = attn_factor;
        if (hp.rope_yarn) {
            const float factor = 1.f / hp.rope_freq_scale, log_factor = std::log(factor);
            // the attention factor llama.cpp passes cancels the magnitude ggml's YaRN adds, then ggml adds it back
            // (deepseek2 with a log multiplier: mscale / mscale_all_dim, which llama.cpp makes 1)
            const float yarn_attn = (yarn_log_mul != 0 || factor <= 1 ? 1.f : 0.1f * log_factor + 1.f) / (1.f + 0.1f * log_factor);
            rt.mscale = attn_factor * yarn_attn * (1.f + 0.1f * std::log(1.f / hp.rope_freq_scale));
            auto corr_dim = [&](float n_rotations) {
                return (float)hp.n_rot * std::log((float)n_ctx_orig / (n_rotations * 2 * 3.14159265358979f)) / (2 * std::log(base));
            };
            const float low = std::max(0.f, std::floor(corr_dim(32.f))), high = std::min((float)hp.n_rot - 1, std::ceil(corr_dim(1.f)));
            rt.ramp.resize((size_t)half);
            for (int i = 0; i < half; ++i) {
                const float y = ((float)i - low) / std::max(0.001f, high - low);
                rt.ramp[(size_t)i] = 1 - std::min(1.f, std::max(0.f, y));
            }
        }
    }

    if (!hp.rope_sections.empty()) {
        // IMROPE (ggml's sector rule): pair i is in sector i % (sum of sections); sectors 3j, 3j+1,
        // 3j+2 take the t, h, w positions while j is below that axis' section, the rest the 4th
        // position, 0 for text: those pairs keep their angle at 0 (cos, sin = mscale, 0).
        const int32_t* sec = hp.rope_sections.data();
        const int32_t sect_dims = sec[0] + sec[1] + sec[2] + sec[3];
        for (size_t i = 0; i < m.rope.inv_freq.size(); ++i) {
            const int32_t sc = (int32_t)i % sect_dims;
            const bool rotates = (sc % 3 == 0 && sc < 3 * sec[0]) || (sc % 3 == 1 && sc < 3 * sec[1]) || (sc % 3 == 2 && sc < 3 * sec[2]);
            if (!rotates) m.rope.inv_freq[i] = 0;
        }
    }
    for (const RopeTable* t : {&m.rope, &m.rope_swa})
        if (!(std::isfinite(t->freq_scale) && t->freq_scale > 0 && std::isfinite(t->mscale) && t->mscale > 0))
            return fail(Status::invalid_file, "the rope scaling parameters give a non-finite scale");
    const int64_t E = n_embd, H = (int64_t)n_head * key_len, KV = (int64_t)n_head_kv * key_len, F = hp.n_ff;
    if ((s = L.weight("token_embd.weight", E, 0, 0, true, &m.token_embd)) != Status::ok) return s;
    hp.n_vocab = (int32_t)m.token_embd.rows;
    // llama.cpp's rule for deepseek2 files without a gating key: GLM-4.7-Flash (47/48 layers, 154880
    // tokens) is sigmoid, DeepSeek-V2/V2.5 softmax.
    if (is_deepseek2 && gating_key == 0 && (n_layer == 47 || n_layer == 48) && hp.n_vocab == 154880) hp.expert_gating = ExpertGating::sigmoid;
    if (is_deepseek2) {
        // q.k scale with YaRN's magnitude (llama.cpp's kq_scale for deepseek2): the attention factor
        // before ggml's correction, times 1 + 0.1 * mscale_all_dim * ln(factor), squared.
        const float inv_fs = 1.f / hp.rope_freq_scale;
        const float attn_cp = attn_factor * (hp.rope_yarn ? (1.f / (1.f + 0.1f * std::log(inv_fs))) *
                                                                (yarn_log_mul != 0 || inv_fs <= 1 ? 1.f : 0.1f * std::log(inv_fs) + 1.f) : 1.f);
        const float mscale = attn_cp * (1.f + 0.1f * std::log(inv_fs)) * (1.f + 0.1f * yarn_log_mul * std::log(inv_fs));
        m.att_scale = mscale * mscale / std::sqrt((float)key_len);
        if (!(std::isfinite(m.att_scale) && m.att_scale > 0)) return fail(Status::invalid_file, "the rope scaling parameters give a non-finite attention scale");
    }
    if ((s = L.weight("output.weight", E, hp.n_vocab, 0, false, &m.output)) != Status::ok) return s;
    if (!m.output) m.output = m.token_embd;  // tied embeddings
    // lfm2moe names its final norm token_embd_norm (llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2).
    if ((s = L.vector(is_lfm2moe ? "token_embd_norm.weight" : "output_norm.weight", E, true, &m.output_norm)) != Status::ok) return s;

    m.layers.resize(n_layer);
    char name[128];
    std::vector<int32_t> hot_list;
    const bool has_hot_list = m.file.find(kHotExpertsKey) != nullptr;
    if (has_hot_list && (s = m.file.get_i32_array(kHotExpertsKey, &hot_list)) != Status::ok) return s;
    size_t hot_cursor = 0;  // into hot_list
    const char* ffn_norm_name = is_gptoss || is_glm4moe || is_delta ? "post_attention_norm.weight" : "ffn_norm.weight";
    int32_t n_conv = 0, n_recr = 0;
    for (uint32_t il = 0; il < n_layer; ++il) {
        LayerWeights& l = m.layers[il];
        auto N = [&](const char* suffix) { std::snprintf(name, sizeof name, "blk.%u.%s", il, suffix); return std::string(name); };
        l.swa = hp.layer_swa[il];
        if ((s = L.vector(N("attn_norm.weight"), E, true, &l.attn_norm)) != Status::ok) return s;
        if (hp.layer_conv[il]) {
            const int64_t LC = hp.shortconv_l_cache;
            l.conv_index = n_conv++;
            if ((s = L.vector(N("shortconv.conv.weight"), LC, true, &l.conv_kernel, E)) != Status::ok) return s;
            if ((s = L.weight(N("shortconv.in_proj.weight"), E, 3 * E, 0, true, &l.conv_in)) != Status::ok) return s;
            if ((s = L.weight(N("shortconv.out_proj.weight"), E, E, 0, true, &l.conv_out)) != Status::ok) return s;
        } else if (hp.layer_recurrent[il]) {
            const int64_t DS = hp.ssm_state, HK = hp.ssm_k_heads, HV = hp.ssm_v_heads, CH = 2 * HK * DS + HV * DS;
            l.recr_index = n_recr++;
            if (!m.file.find_tensor(N("attn_qkv.weight").c_str()) && m.file.find_tensor(N("ssm_in.weight").c_str()))
                return fail(Status::unsupported, "layer %u has the fused 'ssm_in' projection of older %s files: convert the model again", il, arch.c_str());
            if ((s = L.weight(N("attn_qkv.weight"), E, CH, 0, true, &l.ssm_qkv)) != Status::ok) return s;
            if ((s = L.weight(N("attn_gate.weight"), E, HV * DS, 0, true, &l.ssm_z)) != Status::ok) return s;
            if (m.ssm_grouped) {
                if ((s = L.weight(N("ssm_ba.weight"), E, 2 * HV, 0, true, &l.ssm_ba)) != Status::ok) return s;
            } else {
                if ((s = L.weight(N("ssm_beta.weight"), E, HV, 0, true, &l.ssm_beta)) != Status::ok) return s;
                if ((s = L.weight(N("ssm_alpha.weight"), E, HV, 0, true, &l.ssm_alpha)) != Status::ok) return s;
            }
            if ((s = L.weight(N("ssm_out.weight"), HV * DS, E, 0, true, &l.ssm_out)) != Status::ok) return s;
            if ((s = L.vector(N("ssm_conv1d.weight"), hp.ssm_conv_kernel, true, &l.ssm_conv1d, CH)) != Status::ok) return s;
            if ((s = L.vector(N("ssm_dt.bias"), HV, true, &l.ssm_dt)) != Status::ok) return s;
            if ((s = L.vector(N("ssm_a"), HV, true, &l.ssm_a)) != Status::ok) return s;
            if ((s = L.vector(N("ssm_norm.weight"), DS, true, &l.ssm_norm)) != Status::ok) return s;
        } else if (is_deepseek2) {
            const int64_t R = n_rot, NOPE = key_len - n_rot, NH = n_head;
            if (q_lora > 0 && m.file.find_tensor(N("attn_q_a.weight").c_str())) {
                if ((s = L.weight(N("attn_q_a.weight"), E, q_lora, 0, true, &l.wq_a)) != Status::ok) return s;
                if ((s = L.vector(N("attn_q_a_norm.weight"), q_lora, true, &l.q_a_norm)) != Status::ok) return s;
                if ((s = L.weight(N("attn_q_b.weight"), q_lora, H, 0, true, &l.wq_b)) != Status::ok) return s;
            } else if ((s = L.weight(N("attn_q.weight"), E, H, 0, true, &l.wq)) != Status::ok) {
                return s;
            }
            if ((s = L.weight(N("attn_kv_a_mqa.weight"), E, kv_lora + R, 0, true, &l.wkv_a)) != Status::ok) return s;
            if ((s = L.vector(N("attn_kv_a_norm.weight"), kv_lora, true, &l.kv_a_norm)) != Status::ok) return s;
            if (legacy_kv_b) {
                Weight kv_b;
                if ((s = L.weight(N("attn_kv_b.weight"), kv_lora, NH * (NOPE + val_len), 0, true, &kv_b)) != Status::ok) return s;
                if ((s = split_kv_b(m, kv_b, NH, NOPE, val_len, &l.wk_b, &l.wv_b)) != Status::ok) return s;
            } else {
                if ((s = L.weight(N("attn_k_b.weight"), NOPE, kv_lora, NH, true, &l.wk_b)) != Status::ok) return s;
                if ((s = L.weight(N("attn_v_b.weight"), kv_lora, val_len, NH, true, &l.wv_b)) != Status::ok) return s;
            }
            if ((s = L.weight(N("attn_output.weight"), NH * val_len, E, 0, true, &l.wo)) != Status::ok) return s;
        } else {
            // with an output gate (qwen35moe) each head's query rows are followed by its gate rows
            if ((s = L.weight(N("attn_q.weight"), E, hp.attn_output_gate ? 2 * H : H, 0, true, &l.wq)) != Status::ok) return s;
            if ((s = L.weight(N("attn_k.weight"), E, KV, 0, true, &l.wk)) != Status::ok) return s;
            if ((s = L.weight(N("attn_v.weight"), E, KV, 0, true, &l.wv)) != Status::ok) return s;
            if ((s = L.weight(N("attn_output.weight"), H, E, 0, true, &l.wo)) != Status::ok) return s;
        }
        if ((s = L.vector(N("attn_q.bias"), H, false, &l.bq)) != Status::ok) return s;
        if ((s = L.vector(N("attn_k.bias"), KV, false, &l.bk)) != Status::ok) return s;
        if ((s = L.vector(N("attn_v.bias"), KV, false, &l.bv)) != Status::ok) return s;
        if ((s = L.vector(N("attn_output.bias"), E, false, &l.bo)) != Status::ok) return s;
        if (is_gptoss && (s = L.vector(N("attn_sinks.weight"), H / key_len, true, &l.sinks)) != Status::ok) return s;
        if ((is_qwen3moe || is_olmoe || is_glm4moe || is_lfm2moe || is_delta) && !hp.layer_conv[il] && !hp.layer_recurrent[il]) {
            // qwen3moe normalises each head (weight {hd}); olmoe the whole projection (weight {n_head*hd});
            // glm4moe each head where the file has the weights.
            const GgufTensorInfo* qn = m.file.find_tensor(N("attn_q_norm.weight").c_str());
            m.qk_norm = qn && qn->ne[0] == H && H != key_len ? QkNorm::whole : QkNorm::per_head;
            int64_t qn_len = m.qk_norm == QkNorm::whole ? H : key_len, kn_len = m.qk_norm == QkNorm::whole ? KV : key_len;
            if ((s = L.vector(N("attn_q_norm.weight"), qn_len, !is_glm4moe, &l.q_norm)) != Status::ok) return s;
            if ((s = L.vector(N("attn_k_norm.weight"), kn_len, !is_glm4moe, &l.k_norm)) != Status::ok) return s;
            if (l.q_norm.empty() != l.k_norm.empty()) return fail(Status::missing_tensor, "layer %u has only one of attn_q_norm / attn_k_norm", il);
        }
        if ((s = L.vector(N(ffn_norm_name), E, true, &l.ffn_norm)) != Status::ok) return s;
        if (n_expert > 0 && (int32_t)il >= hp.n_layer_dense_lead) {
            if ((s = L.weight(N("ffn_gate_inp.weight"), E, n_expert, 0, true, &l.router)) != Status::ok) return s;
            int64_t n_hot = 0;
            if (const GgufTensorInfo* hot = m.file.find_tensor(N("ffn_gate_hot_exps.weight").c_str())) {
                n_hot = hot->ne[2];
                if ((s = hot_experts(has_hot_list ? &hot_list : nullptr, il, n_hot, n_expert, &hot_cursor, &l.expert_mat)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_gate_hot_exps.weight"), E, F, n_hot, true, &l.gate_hot)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_up_hot_exps.weight"), E, F, n_hot, true, &l.up_hot)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_down_hot_exps.weight"), F, E, n_hot, true, &l.down_hot)) != Status::ok) return s;
            }
            if ((s = L.weight(N("ffn_gate_exps.weight"), E, F, n_expert - n_hot, true, &l.gate_exps)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_up_exps.weight"), E, F, n_expert - n_hot, true, &l.up_exps)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_down_exps.weight"), F, E, n_expert - n_hot, true, &l.down_exps)) != Status::ok) return s;
            if (is_gptoss) {
                if ((s = L.vector(N("ffn_gate_inp.bias"), n_expert, true, &l.router_bias)) != Status::ok) return s;
                if ((s = L.vector(N("ffn_gate_exps.bias"), F, true, &l.gate_exps_b, n_expert)) != Status::ok) return s;
                if ((s = L.vector(N("ffn_up_exps.bias"), F, true, &l.up_exps_b, n_expert)) != Status::ok) return s;
                if ((s = L.vector(N("ffn_down_exps.bias"), E, true, &l.down_exps_b, n_expert)) != Status::ok) return s;
            }
            if ((is_glm4moe || is_deepseek2 || is_lfm2moe) && (s = L.vector(N("exp_probs_b.bias"), n_expert, !is_deepseek2, &l.selection_bias)) != Status::ok)
                return s;
            if ((is_qwen2moe || is_glm4moe || is_deepseek2 || is_delta) && m.file.find_tensor(N("ffn_up_shexp.weight").c_str())) {
                const int64_t FS = hp.n_ff_shared > 0 ? hp.n_ff_shared : 0;
                if ((s = L.weight(N("ffn_gate_shexp.weight"), E, FS, 0, true, &l.gate_shexp)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_up_shexp.weight"), E, l.gate_shexp.rows, 0, true, &l.up_shexp)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_down_shexp.weight"), l.gate_shexp.rows, E, 0, true, &l.down_shexp)) != Status::ok) return s;
                if ((is_qwen2moe || is_delta) && (s = L.vector(N("ffn_gate_inp_shexp.weight"), E, true, &l.router_shexp)) != Status::ok) return s;
                if (hp.n_ff_shared > 0 && hp.n_ff_shared != l.gate_shexp.rows) return fail(Status::shape_mismatch, "layer %u's shared expert width differs", il);
                hp.n_ff_shared = (int32_t)l.gate_shexp.rows;
            } else if (is_glm4moe || is_deepseek2) {
                return fail(Status::missing_tensor, "missing tensor '%s'", N("ffn_up_shexp.weight").c_str());
            }
        } else {
            const int64_t FD = hp.n_ff_dense;
            if ((s = L.weight(N("ffn_gate.weight"), E, FD, 0, true, &l.gate)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_up.weight"), E, FD, 0, true, &l.up)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_down.weight"), FD, E, 0, true, &l.down)) != Status::ok) return s;
        }
    }
    if (hot_cursor != hot_list.size())
        return fail(Status::invalid_file, "%s lists %zu ids but the hot expert tensors hold %zu experts", kHotExpertsKey, hot_list.size(), hot_cursor);
    // K-quant activations are built in 256-element blocks, legacy ones in 32: every matmul input
    // length must tile (the file's block sizes guarantee it for ne0, checked above).

    // Bytes touched per decoded token: everything but the experts, plus k/n of the expert stacks,
    // plus one embedding row; the NextN layers' tensors are never read.
    uint64_t total = 0, experts = 0, unused = 0;
    for (size_t i = 0; i < m.file.n_tensors(); ++i) {
        const GgufTensorInfo& t = m.file.tensor_at(i);
        total += t.n_bytes;
        unsigned block = 0;
        if (n_nextn && std::sscanf(t.name.c_str(), "blk.%u.", &block) == 1 && block >= n_layer) {
            unused += t.n_bytes;
            const uint64_t at = (uint64_t)(t.data - m.file.data());
            m.unused_ranges.push_back({at, at + t.n_bytes});
        } else if (t.name.find("_exps.") != std::string::npos) {
            experts += t.n_bytes;
        }
    }
    hp.weight_bytes = total;
    m.unused_bytes = unused;
    hp.active_bytes_per_token = total - unused - experts - m.token_embd.mat_bytes + m.token_embd.row_bytes +
                                (n_expert ? experts / n_expert * n_used : 0) + (m.output.data == m.token_embd.data ? m.token_embd.mat_bytes : 0);

    plan_forward(m);

    const GgufKeyValue* tok = m.file.find("tokenizer.ggml.model");
    if (tok) {
        if ((s = Tokenizer::load(m.file, &m.tokenizer)) != Status::ok) return s;
        if (m.tokenizer.n_vocab() > hp.n_vocab)
            return fail(Status::invalid_file, "tokenizer has %d tokens but token_embd has %d rows", m.tokenizer.n_vocab(), hp.n_vocab);
    }
    return Status::ok;
}

}  // namespace detail

MOE_DETAIL_MEMBER Model::Model() = default;
MOE_DETAIL_MEMBER Model::~Model() = default;
MOE_DETAIL_MEMBER Model::Model(Model&&) noexcept = default;
MOE_DETAIL_MEMBER Model& Model::operator=(Model&&) noexcept = default;

namespace detail { inline Status attach_expert_store(ModelImpl& m, const LoadOptions& o, const char* path); }

static Status model_finish_load(std::unique_ptr<detail::ModelImpl>& impl, const LoadOptions& options, Model* out,
                                std::shared_ptr<const detail::ModelImpl>* slot, const char* path) {
    impl->log = options.log;
    impl->log_user = options.log_user;
    Status s = detail::load_model(*impl);
    if (s == Status::ok) s = detail::attach_expert_store(*impl, options, path);
    if (s == Status::ok && options.progress) {
        // Mapped and without a store: read every page of the file once, reporting as it goes.
        const uint8_t* data = impl->file.data();
        const uint64_t total = impl->file.file_size();
        const bool touch = options.use_mmap && !options.mem_budget;
        uint64_t done = touch ? 0 : total;
        volatile uint8_t sink = 0;
        while (s == Status::ok && done < total) {
            const uint64_t end = std::min<uint64_t>(total, done + (64u << 20));
            uint8_t acc = 0;
            for (uint64_t i = done; i < end; i += 4096) acc ^= data[i];
            sink = sink ^ acc;
            done = end;
            if (done < total && !options.progress(options.progress_user, done, total))
                s = detail::fail(Status::cancelled, "loading was stopped by the progress callback at %llu of %llu bytes", (unsigned long long)done,
                                 (unsigned long long)total);
        }
        if (s == Status::ok && !options.progress(options.progress_user, total, total))
            s = detail::fail(Status::cancelled, "loading was stopped by the progress callback at the end");
    }
    if (s != Status::ok) {
        if (options.log) options.log(options.log_user, last_error());
        return s;
    }
    (void)out;
    *slot = std::shared_ptr<const detail::ModelImpl>(impl.release());
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Model::load(const char* path, const LoadOptions& options, Model* out) {
    if (!out || !path) return detail::fail(Status::invalid_argument, "null argument");
    std::unique_ptr<detail::ModelImpl> impl(new (std::nothrow) detail::ModelImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = GgufFile::open(path, options.use_mmap, &impl->file, options.progress, options.progress_user);
    if (s != Status::ok) {
        if (options.log) options.log(options.log_user, last_error());
        return s;
    }
    return model_finish_load(impl, options, out, &out->impl_, options.use_mmap ? path : nullptr);
}

MOE_DETAIL_MEMBER Status Model::load_memory(const void* data, size_t size, const LoadOptions& options, Model* out) {
    if (!out) return detail::fail(Status::invalid_argument, "null argument");
    std::unique_ptr<detail::ModelImpl> impl(new (std::nothrow) detail::ModelImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = GgufFile::open_memory(data, size, &impl->file);
    if (s != Status::ok) return s;
    return model_finish_load(impl, options, out, &out->impl_, nullptr);
}

// An unloaded Model answers with empty objects (zero sizes, an invalid tokenizer, no tensors).
namespace detail {
inline const ModelImpl& empty_model() {
    static const ModelImpl empty;
    return empty;
}
}  // namespace detail
MOE_DETAIL_MEMBER bool Model::valid() const { return impl_ != nullptr; }
MOE_DETAIL_MEMBER const ModelInfo& Model::info() const { return (impl_ ? *impl_ : detail::empty_model()).info; }
MOE_DETAIL_MEMBER const Tokenizer& Model::tokenizer() const { return (impl_ ? *impl_ : detail::empty_model()).tokenizer; }
MOE_DETAIL_MEMBER const GgufFile& Model::file() const { return (impl_ ? *impl_ : detail::empty_model()).file; }

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] EXPERT STORE
//-----------------------------------------------------------------------------
// >>store  LoadOptions::mem_budget: routed experts served from a bounded cache of slots, each
// holding one (layer, expert)'s gate, up and down matrices. route() asks for a layer's experts at
// once (acquire): hits are pinned, misses evict the coldest unpinned slot and queue a demand read;
// predicted experts of later layers are queued behind them (prefetch) into slots that nothing
// recent uses. Pins last until the layer's FFN is done (release). One store per Model, shared by
// its Sessions under one mutex.

namespace moe {
namespace detail {

#if MOE_DETAIL_HAS_MMAP
// posix_fadvise on a byte range where the system has it (Linux, BSDs; not macOS, where only the
// madvise half of the expert store's hints applies).
inline void fadvise_range(int fd, uint64_t offset, uint64_t length, bool will_need) {
#if defined(POSIX_FADV_WILLNEED) && defined(POSIX_FADV_DONTNEED)
    if (fd >= 0) (void)posix_fadvise(fd, (off_t)offset, (off_t)length, will_need ? POSIX_FADV_WILLNEED : POSIX_FADV_DONTNEED);
#else
    (void)fd; (void)offset; (void)length; (void)will_need;
#endif
}
#endif

// Where the experts' bytes come from: pread on the model file, or a copy from memory (a model
// loaded from a buffer, or read whole without mmap).
class ExpertSource {
public:
    virtual ~ExpertSource() = default;
    // Thread-safe. Reads exactly `bytes` at `offset` (a short read only at the end of the file).
    virtual bool read(uint64_t offset, size_t bytes, uint8_t* dst) = 0;
};

class MemorySource : public ExpertSource {
public:
    MemorySource(const uint8_t* base, size_t size) : base_(base), size_(size) {}
    bool read(uint64_t offset, size_t bytes, uint8_t* dst) override {
        if (offset > size_) return false;
        std::memcpy(dst, base_ + offset, std::min<uint64_t>(bytes, size_ - offset));
        return true;
    }

private:
    const uint8_t* base_;
    size_t size_;
};

#if MOE_DETAIL_HAS_MMAP
class FileSource : public ExpertSource {
public:
    ~FileSource() override { if (fd_ >= 0) ::close(fd_); }
    Status open(const char* path, bool direct) {
        int flags = O_RDONLY;
#if defined(O_DIRECT)
        if (direct) flags |= O_DIRECT;
#else
        if (direct) return fail(Status::unsupported, "expert_reads = direct: O_DIRECT is not available on this system");
#endif
        fd_ = ::open(path, flags);
        if (fd_ < 0) return fail(Status::io_error, "cannot open '%s' for expert reads: %s", path, std::strerror(errno));
        if (direct) {  // some file systems accept O_DIRECT at open and refuse the reads
            AlignedBuffer<uint8_t> probe;
            if (!probe.allocate(8192, false)) return fail(Status::out_of_memory, "out of memory");
            uint8_t* aligned = probe.data + (4096 - reinterpret_cast<uintptr_t>(probe.data) % 4096) % 4096;
            if (::pread(fd_, aligned, 4096, 0) < 0) {
                ::close(fd_);
                fd_ = -1;
                return fail(Status::unsupported, "O_DIRECT reads fail on '%s'", path);
            }
        }
        return Status::ok;
    }
    bool read(uint64_t offset, size_t bytes, uint8_t* dst) override {
        while (bytes > 0) {
            const ssize_t got = ::pread(fd_, dst, bytes, (off_t)offset);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) return false;
            if (got == 0) return true;  // end of file (aligned reads may ask past it)
            dst += got; offset += (uint64_t)got; bytes -= (size_t)got;
        }
        return true;
    }

private:
    int fd_ = -1;
};
#endif

#if MOE_DETAIL_HAS_THREADS
typedef std::mutex StoreMutex;
#else
struct StoreMutex { void lock() {} void unlock() {} };
#endif

// Slots pinned by one caller for one layer.
struct ExpertPins {
    std::vector<int32_t> slots;
    double requested_at = 0;  // when request() issued the reads (the store's clock): waits count from it
};

struct ExpertPointers { const uint8_t *gate, *up, *down; };

struct ExpertStore {
    struct Piece { uint64_t offset; size_t bytes; };  // one matrix of one expert in the file
    struct Slot {
        enum State : uint8_t { empty, loading, ready };
        int32_t layer = -1, expert = -1;
        State state = empty;
        bool prefetched = false;  // loaded on a prediction, not used since
        bool failed = false;
        int32_t pins = 0;
        uint64_t last_use = 0;
        double ready_at = 0;      // simulated storage: virtual time the read completes
    };

    int32_t n_layer = 0, n_expert = 0, n_used = 0;
    size_t align = 64, slot_bytes = 0, piece_room[3] = {0, 0, 0};
    std::vector<Piece> pieces;     // [((layer * n_expert + e) * 3 + m]
    std::vector<int32_t> where;    // [layer * n_expert + e]: slot or -1
    std::vector<uint32_t> heat;    // [layer * n_expert + e]: lookups so far (hot experts stay longer)
    std::vector<Slot> slots;
    AlignedBuffer<uint8_t> memory;
    uint8_t* slot_base = nullptr;  // memory aligned up to `align` (O_DIRECT wants 4 KiB-aligned buffers)
    // ExpertReads::mapped: experts are used in place in the file mapping (no slot memory); a slot
    // only stands for the page-cache share of one resident expert. advise_fd: the file, for fadvise.
    const uint8_t* mapped_base = nullptr;
    int advise_fd = -1;
    std::unique_ptr<ExpertSource> source;
    bool simulated = false;
    SimulatedStorage sim;
    double now = 0, device_free = 0;  // virtual clock
    uint64_t tick = 0;                // one per layer lookup
    int32_t in_flight_prefetches = 0;
    ExpertStoreStats stats;
    mutable StoreMutex mu;
#if MOE_DETAIL_HAS_THREADS
    std::condition_variable changed;  // a slot became ready or was unpinned
    std::condition_variable work;     // a read was queued
    std::vector<int32_t> demand_queue, prefetch_queue;  // slots to read (demand first)
    std::vector<std::thread> io;
    bool stop = false;
#endif

    ExpertStore() = default;
    // Reads run on I/O threads that share the CPUs with the sessions' compute threads.
    bool reads_on_threads() const {
#if MOE_DETAIL_HAS_THREADS
        return !simulated && !io.empty();
#else
        return false;
#endif
    }
    ExpertStore(const ExpertStore&) = delete;
    ExpertStore& operator=(const ExpertStore&) = delete;
    ~ExpertStore() {
#if MOE_DETAIL_HAS_THREADS
        {
            std::lock_guard<StoreMutex> lock(mu);
            stop = true;
        }
        work.notify_all();
        for (std::thread& t : io) t.join();
#endif
#if MOE_DETAIL_HAS_MMAP
        if (advise_fd >= 0) ::close(advise_fd);
#endif
    }

    size_t cell(int32_t layer, int32_t e) const { return (size_t)layer * (size_t)n_expert + (size_t)e; }
    // Where piece m of the slot's expert starts in slot memory (reads are aligned down to `align`).
    const uint8_t* piece_data(int32_t s, int m) const {
        const Slot& sl = slots[(size_t)s];
        const Piece& p = pieces[cell(sl.layer, sl.expert) * 3 + (size_t)m];
        if (mapped_base) return mapped_base + p.offset;
        size_t at = 0;
        for (int i = 0; i < m; ++i) at += piece_room[i];
        return slot_base + (size_t)s * slot_bytes + at + (size_t)(p.offset % align);
    }
    ExpertPointers pointers(int32_t s) const { return {piece_data(s, 0), piece_data(s, 1), piece_data(s, 2)}; }

    // Reads slot s's expert (outside the lock: the slot is `loading`, so nobody else touches it).
    bool load(int32_t s, int32_t layer, int32_t e) {
        if (mapped_base) return map_in(layer, e);
        uint8_t* base = slot_base + (size_t)s * slot_bytes;
        bool ok = true;
        for (int m = 0; m < 3; ++m) {
            const Piece& p = pieces[cell(layer, e) * 3 + (size_t)m];
            const uint64_t start = p.offset / align * align;
            const size_t len = (size_t)((p.offset + p.bytes - start + align - 1) / align * align);
            ok = ok && source->read(start, len, base);
            base += piece_room[m];
        }
        return ok;
    }
    // ExpertReads::mapped. All three ranges are asked for at once (WILLNEED starts the reads in
    // large requests), then mapped in; MADV_POPULATE_READ (Linux 5.14) reports a read error where
    // touching the pages would raise SIGBUS, so pages are touched only on older kernels.
    bool map_in(int32_t layer, int32_t e) {
#if MOE_DETAIL_HAS_MMAP
        uint64_t start[3], end[3];
        for (int m = 0; m < 3; ++m) {
            const Piece& p = pieces[cell(layer, e) * 3 + (size_t)m];
            start[m] = p.offset / align * align;
            end[m] = (p.offset + p.bytes + align - 1) / align * align;
            fadvise_range(advise_fd, start[m], end[m] - start[m], true);
        }
        for (int m = 0; m < 3; ++m) {
            void* at = const_cast<uint8_t*>(mapped_base + start[m]);
#if defined(MADV_POPULATE_READ)
            if (madvise(at, (size_t)(end[m] - start[m]), MADV_POPULATE_READ) == 0) continue;
            if (errno != EINVAL) return false;
#endif
            volatile uint8_t sink = 0;
            for (uint64_t q = start[m]; q < end[m]; q += align) sink = (uint8_t)(sink ^ mapped_base[q]);
            (void)at;
        }
        return true;
#else
        (void)layer; (void)e;
        return false;
#endif
    }
    // ExpertReads::mapped: gives an evicted expert's pages back (only whole pages inside its
    // ranges: a neighbour in use keeps the pages it shares).
    void map_out(int32_t layer, int32_t e) {
#if MOE_DETAIL_HAS_MMAP
        for (int m = 0; m < 3; ++m) {
            const Piece& p = pieces[cell(layer, e) * 3 + (size_t)m];
            const uint64_t start = (p.offset + align - 1) / align * align, end = (p.offset + p.bytes) / align * align;
            if (end <= start) continue;
            (void)madvise(const_cast<uint8_t*>(mapped_base + start), (size_t)(end - start), MADV_DONTNEED);
            fadvise_range(advise_fd, start, end - start, false);
        }
#else
        (void)layer; (void)e;
#endif
    }
    uint64_t expert_bytes(int32_t layer, int32_t e) const {
        const size_t c = cell(layer, e) * 3;
        return pieces[c].bytes + pieces[c + 1].bytes + pieces[c + 2].bytes;
    }

    // The slot to reuse: empty first, else the unpinned ready slot with the lowest score (last use,
    // plus up to four tokens for a hot expert). `recent`: slots used since this tick are kept.
    int32_t victim(uint64_t recent) const {
        int32_t best = -1;
        uint64_t best_score = UINT64_MAX;
        for (size_t i = 0; i < slots.size(); ++i) {
            const Slot& sl = slots[i];
            if (sl.state == Slot::empty) return (int32_t)i;
            if (sl.pins > 0 || sl.state == Slot::loading || sl.last_use >= recent) continue;
            const uint64_t score = sl.last_use + (uint64_t)n_layer * std::min<uint32_t>(heat[cell(sl.layer, sl.expert)], 8) / 2;
            if (score < best_score) { best_score = score; best = (int32_t)i; }
        }
        return best;
    }
    // Gives slot s to (layer, e), evicting what it held.
    void assign(int32_t s, int32_t layer, int32_t e, bool prefetch) {
        Slot& sl = slots[(size_t)s];
        if (sl.state == Slot::ready) {
            if (sl.prefetched) { ++stats.prefetch_wasted; stats.prefetch_wasted_bytes += expert_bytes(sl.layer, sl.expert); }
            where[cell(sl.layer, sl.expert)] = -1;
            if (mapped_base) map_out(sl.layer, sl.expert);
        }
        sl.layer = layer; sl.expert = e; sl.state = Slot::loading; sl.prefetched = prefetch; sl.failed = false;
        sl.last_use = tick;
        where[cell(layer, e)] = s;
        stats.bytes_read += expert_bytes(layer, e);
    }
    // Starts the read of slot s: inline (simulated storage, or no I/O threads) or on the I/O pool.
    void start_read(int32_t s, bool demand, std::unique_lock<StoreMutex>& lock) {
        Slot& sl = slots[(size_t)s];
        if (simulated) {
            const double start = std::max(now, device_free);
            sl.ready_at = device_free = start + sim.latency_s + (double)expert_bytes(sl.layer, sl.expert) / sim.bytes_per_s;
        }
#if MOE_DETAIL_HAS_THREADS
        if (!simulated && !io.empty()) {
            (demand ? demand_queue : prefetch_queue).push_back(s);
            if (!demand) ++in_flight_prefetches;
            work.notify_one();
            return;
        }
#endif
        (void)demand;
        const int32_t layer = sl.layer, e = sl.expert;
        lock.unlock();
        const bool ok = load(s, layer, e);
        lock.lock();
        finish_read(s, ok);
#if MOE_DETAIL_HAS_THREADS
        changed.notify_all();
#endif
    }
    void finish_read(int32_t s, bool ok) {
        Slot& sl = slots[(size_t)s];
        sl.state = Slot::ready;
        sl.failed = !ok;  // reported to the caller waiting for it; read again at the next lookup
    }
#if MOE_DETAIL_HAS_THREADS
    void io_thread() {
        std::unique_lock<StoreMutex> lock(mu);
        for (;;) {
            work.wait(lock, [this] { return stop || !demand_queue.empty() || !prefetch_queue.empty(); });
            if (stop) return;
            const bool demand = !demand_queue.empty();
            std::vector<int32_t>& q = demand ? demand_queue : prefetch_queue;
            const int32_t s = q.front();
            q.erase(q.begin());
            const int32_t layer = slots[(size_t)s].layer, e = slots[(size_t)s].expert;
            lock.unlock();
            const bool ok = load(s, layer, e);
            lock.lock();
            if (!demand) --in_flight_prefetches;
            finish_read(s, ok);
            changed.notify_all();
        }
    }
#endif

    // Pins the experts `ids[0..n)` (distinct) of `layer` and issues the reads of the missing ones
    // (all before any wait), then queues the predictions (`predicted`: target layer, experts, may
    // be null) behind them; wait_ready() then waits for the pinned ones. All or nothing: a caller
    // waits for free slots holding no pins, so sessions sharing the store cannot deadlock. False
    // when the cache is too small.
    bool request(int32_t layer, const int32_t* ids, int n, ExpertPins* pins, const std::vector<std::pair<int32_t, std::vector<int32_t>>>* predicted) {
        std::unique_lock<StoreMutex> lock(mu);
        if (n > (int)slots.size()) return fail_locked("the expert cache (%d slots) cannot hold one layer's experts", (int)slots.size());
        for (int i = 0; i < n; ++i) {  // a slot whose read failed is a miss now (unless someone still holds it)
            const int32_t s = where[cell(layer, ids[i])];
            if (s >= 0 && slots[(size_t)s].failed && slots[(size_t)s].pins == 0 && slots[(size_t)s].state == Slot::ready) {
                slots[(size_t)s].state = Slot::empty;
                slots[(size_t)s].failed = false;
                where[cell(layer, ids[i])] = -1;
            }
        }
        for (;;) {
            int misses = 0, free_slots = 0;
            for (int i = 0; i < n; ++i) misses += where[cell(layer, ids[i])] < 0;
            for (const Slot& sl : slots)
                free_slots += sl.state == Slot::empty || (sl.pins == 0 && sl.state == Slot::ready && sl.layer != layer);
            for (const Slot& sl : slots)  // this layer's unpinned slots that are not asked for
                if (sl.state == Slot::ready && sl.pins == 0 && sl.layer == layer &&
                    std::find(ids, ids + n, sl.expert) == ids + n) ++free_slots;
            if (free_slots >= misses) break;
#if MOE_DETAIL_HAS_THREADS
            if (!simulated) { changed.wait(lock); continue; }  // reads in flight or other sessions' pins end
#endif
            return fail_locked("the expert cache (%d slots) is pinned by other sessions", (int)slots.size());
        }
        ++tick;
        if (simulated) now += sim.compute_s_per_layer;
        pins->requested_at = simulated ? now : now_seconds();
        // Hits first, pinned, so that the misses cannot evict them.
        for (int i = 0; i < n; ++i) {
            const size_t c = cell(layer, ids[i]);
            ++stats.lookups;
            ++heat[c];
            const int32_t s = where[c];
            if (s < 0) continue;
            Slot& sl = slots[(size_t)s];
            const bool ready = sl.state == Slot::ready && (!simulated || sl.ready_at <= now);
            if (ready) ++stats.hits; else ++stats.late;
            if (sl.prefetched) { ++stats.prefetch_hits; sl.prefetched = false; }
            sl.pins++;
            sl.last_use = tick;
            pins->slots.push_back(s);
        }
        for (int i = 0; i < n; ++i) {
            if (where[cell(layer, ids[i])] >= 0) continue;
            const int32_t s = victim(UINT64_MAX);  // exists: counted above
            ++stats.misses;
            assign(s, layer, ids[i], false);
            slots[(size_t)s].pins++;
            pins->slots.push_back(s);
            start_read(s, true, lock);
        }
        if (predicted) prefetch_locked(*predicted, lock);
        return true;
    }
    // Queues predicted experts behind the reads in flight (see prefetch_locked).
    void prefetch(const std::vector<std::pair<int32_t, std::vector<int32_t>>>& predicted) {
        std::unique_lock<StoreMutex> lock(mu);
        prefetch_locked(predicted, lock);
    }
    // Waits until the experts request() pinned are ready and fills out[i]. False on a read error.
    bool wait_ready(int32_t layer, const int32_t* ids, int n, ExpertPointers* out, const ExpertPins& pins) {
        std::unique_lock<StoreMutex> lock(mu);
        const double t0 = pins.requested_at;
        double ready = t0;
        bool failed = false;
        for (int i = 0; i < n; ++i) {
            Slot& sl = slots[(size_t)where[cell(layer, ids[i])]];
#if MOE_DETAIL_HAS_THREADS
            changed.wait(lock, [&sl] { return sl.state == Slot::ready; });
#endif
            if (simulated) ready = std::max(ready, sl.ready_at);
            failed = failed || sl.failed;
            out[i] = pointers(where[cell(layer, ids[i])]);
        }
        if (simulated) { stats.wait_seconds += ready - t0; now = ready; }
        else stats.wait_seconds += now_seconds() - t0;
        if (failed) return fail_locked("reading the experts of layer %d from the model file failed", layer);
        return true;
    }
    bool fail_locked(const char* what, int arg) {
        fail(Status::io_error, what, arg);
        return false;
    }
    // Predicted experts go into slots nothing used since the token before, only while few
    // prefetches are in flight: speculation never evicts what the current token needs.
    void prefetch_locked(const std::vector<std::pair<int32_t, std::vector<int32_t>>>& predicted, std::unique_lock<StoreMutex>& lock) {
        const uint64_t recent = tick > (uint64_t)n_layer ? tick - (uint64_t)n_layer : 0;
        for (const auto& target : predicted)
            for (int32_t e : target.second) {
                if (e < 0 || e >= n_expert || where[cell(target.first, e)] >= 0) continue;
                if (in_flight_prefetches >= 4 * n_used) return;
                const int32_t s = victim(recent);
                if (s < 0) return;
                ++stats.prefetches;
                assign(s, target.first, e, true);
                start_read(s, false, lock);
            }
    }
    void release(ExpertPins* pins) {
        if (pins->slots.empty()) return;
        {
            std::lock_guard<StoreMutex> lock(mu);
            for (int32_t s : pins->slots) --slots[(size_t)s].pins;
        }
        pins->slots.clear();
#if MOE_DETAIL_HAS_THREADS
        changed.notify_all();
#endif
    }
};

// Builds m.store for options.mem_budget (see LoadOptions).
inline Status attach_expert_store(ModelImpl& m, const LoadOptions& o, const char* path) {
    if (o.mem_budget == 0) return Status::ok;
    const ModelInfo& hp = m.info;
    if (hp.n_expert <= 0) return Status::ok;  // nothing to stream: a dense model stays mapped
    if (o.io_threads < 0 || o.io_threads > 64) return fail(Status::invalid_argument, "io_threads %d is out of range [0, 64]", o.io_threads);
    std::shared_ptr<ExpertStore> st = std::make_shared<ExpertStore>();
    ExpertStore& s = *st;
    s.n_layer = hp.n_layer;
    s.n_expert = hp.n_expert;
    s.n_used = hp.n_expert_used;
    if (o.simulated_storage) {
        s.simulated = true;
        s.sim = *o.simulated_storage;
        if (!(s.sim.bytes_per_s > 0) || !(s.sim.latency_s >= 0) || !(s.sim.compute_s_per_layer >= 0))
            return fail(Status::invalid_argument, "simulated_storage needs bytes_per_s > 0 and non-negative times");
    }
    bool direct = false;
    const uint8_t* base = m.file.data();
    if (o.expert_reads != ExpertReads::direct && o.expert_reads != ExpertReads::buffered && o.expert_reads != ExpertReads::mapped)
        return fail(Status::invalid_argument, "expert_reads %d is not an ExpertReads value", (int)o.expert_reads);
#if MOE_DETAIL_HAS_MMAP
    if (o.expert_reads == ExpertReads::mapped) {
        if (!path || !o.use_mmap)
            return fail(Status::invalid_argument, "expert_reads = mapped needs a model file loaded with use_mmap");
        s.advise_fd = ::open(path, O_RDONLY);
        if (s.advise_fd < 0) return fail(Status::io_error, "cannot open '%s' for expert reads: %s", path, std::strerror(errno));
        s.mapped_base = base;
    } else if (path && !s.simulated) {
        std::unique_ptr<FileSource> f(new FileSource());
        Status fs = o.expert_reads == ExpertReads::direct ? f->open(path, true) : Status::io_error;
        direct = fs == Status::ok;
        if (!direct) fs = f->open(path, false);  // no O_DIRECT here (tmpfs...): buffered reads
        if (fs != Status::ok) return fs;
        s.source = std::move(f);
    }
#else
    (void)path;
    if (o.expert_reads == ExpertReads::mapped)
        return fail(Status::unsupported, "expert_reads = mapped needs mmap/madvise, which this build does not have");
#endif
    size_t page = 4096;
#if MOE_DETAIL_HAS_MMAP
    if (s.mapped_base) page = std::max<size_t>(page, (size_t)sysconf(_SC_PAGESIZE));
#endif
    s.align = direct ? 4096 : s.mapped_base ? page : 64;
    uint64_t expert_total = 0;
    s.pieces.resize((size_t)hp.n_layer * (size_t)hp.n_expert * 3);
    for (int32_t l = 0; l < hp.n_layer; ++l) {
        const LayerWeights& lw = m.layers[(size_t)l];
        if (!lw.moe()) continue;  // a leading dense layer: nothing to stream
        for (int32_t e = 0; e < hp.n_expert; ++e) {
            const LayerWeights::ExpertMats em = lw.expert(e);
            const Weight* w[3] = {em.gate, em.up, em.down};
            for (int i = 0; i < 3; ++i) {
                expert_total += w[i]->mat_bytes;
                const size_t room = (w[i]->mat_bytes + 2 * s.align - 1) / s.align * s.align;
                s.piece_room[i] = std::max(s.piece_room[i], room);
                s.pieces[s.cell(l, e) * 3 + (size_t)i] = {(uint64_t)(w[i]->data - base) + (uint64_t)em.mat * w[i]->mat_bytes, w[i]->mat_bytes};
            }
        }
    }
    s.slot_bytes = s.piece_room[0] + s.piece_room[1] + s.piece_room[2];
#if MOE_DETAIL_HAS_MMAP
    if (path && o.use_mmap && !s.simulated) {
        // The kernel reads megabytes around a page fault (read_ahead_kb), which pulled experts
        // into the page cache while the loader read the header and small tensors. So: the
        // resident weights (everything but the expert stacks) are read now in large requests,
        // expert pages already cached are given back, and faults inside the stacks (mapped
        // reads) read no more than asked: the page cache of this file stays within the budget.
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        const size_t mapped_size = m.file.file_size();
        std::vector<std::pair<uint64_t, uint64_t>> stacks;  // [start, end) of each expert stack
        for (const LayerWeights& lw : m.layers)
            for (const Weight* w : {&lw.gate_exps, &lw.up_exps, &lw.down_exps, &lw.gate_hot, &lw.up_hot, &lw.down_hot})
                if (*w) stacks.push_back({(uint64_t)(w->data - base), (uint64_t)(w->data - base) + w->mat_bytes * (uint64_t)w->n_mats});
        stacks.insert(stacks.end(), m.unused_ranges.begin(), m.unused_ranges.end());  // NextN layers: never read either
        std::sort(stacks.begin(), stacks.end());
        const int fd = ::open(path, O_RDONLY);
        uint64_t from = 0;
        stacks.push_back({mapped_size, mapped_size});
        for (const auto& range : stacks) {
            const uint64_t start = from / page * page, end = std::min<uint64_t>((range.first + page - 1) / page * page, mapped_size);
            if (end > start) (void)madvise(const_cast<uint8_t*>(base + start), (size_t)(end - start), MADV_WILLNEED);
            const uint64_t drop_start = end, drop_end = range.second / page * page;  // whole pages of the stack
            if (drop_end > drop_start) {
                (void)madvise(const_cast<uint8_t*>(base + drop_start), (size_t)(drop_end - drop_start), MADV_RANDOM);
                (void)madvise(const_cast<uint8_t*>(base + drop_start), (size_t)(drop_end - drop_start), MADV_DONTNEED);
                fadvise_range(fd, drop_start, drop_end - drop_start, false);
            }
            from = std::max(from, range.second);
        }
        if (fd >= 0) ::close(fd);
    }
#endif
    const uint64_t resident = hp.weight_bytes - expert_total - m.unused_bytes;
    const size_t pad = s.align > 64 && !s.mapped_base ? s.align : 0;  // AlignedBuffer gives 64-byte alignment, O_DIRECT wants more
    const uint64_t need = resident + (uint64_t)hp.n_expert_used * s.slot_bytes + pad;
    if (o.mem_budget < need)
        return fail(Status::invalid_argument,
                    "mem_budget %.1f MiB is too small: the non-expert weights take %.1f MiB and one token needs %d experts of %.2f MiB "
                    "(at least %.1f MiB)", (double)o.mem_budget / (1 << 20), (double)resident / (1 << 20), hp.n_expert_used,
                    (double)s.slot_bytes / (1 << 20), (double)need / (1 << 20));
    const uint64_t n_slots = std::min<uint64_t>((o.mem_budget - resident - pad) / s.slot_bytes, (uint64_t)hp.n_layer * (uint64_t)hp.n_expert);
    s.slots.resize((size_t)n_slots);
    if (!s.mapped_base) {
        if (!s.memory.allocate((size_t)n_slots * s.slot_bytes + pad, false))
            return fail(Status::out_of_memory, "cannot allocate the expert cache (%.1f MiB)", (double)n_slots * (double)s.slot_bytes / (1 << 20));
        s.slot_base = s.memory.data + (s.align - (size_t)(reinterpret_cast<uintptr_t>(s.memory.data) % s.align)) % s.align;
    }
    s.where.assign((size_t)hp.n_layer * (size_t)hp.n_expert, -1);
    s.heat.assign(s.where.size(), 0);
    s.stats.mem_budget_bytes = o.mem_budget;
    s.stats.resident_bytes = resident;
    s.stats.cache_bytes = n_slots * s.slot_bytes + pad;
    s.stats.slots = (int32_t)n_slots;
    if (!s.source) s.source.reset(new MemorySource(base, m.file.file_size()));  // a buffer, or no pread here
    s.stats.reads = s.mapped_base ? ExpertReads::mapped : direct ? ExpertReads::direct : ExpertReads::buffered;
#if MOE_DETAIL_HAS_THREADS
    if (!s.simulated)
        for (int i = 0; i < o.io_threads; ++i) s.io.emplace_back([&s] { s.io_thread(); });
#endif
    m.store = st;
    return Status::ok;
}

}  // namespace detail

MOE_DETAIL_MEMBER ExpertStoreStats Model::expert_store_stats() const {
    if (!impl_ || !impl_->store) return ExpertStoreStats{};
    std::lock_guard<detail::StoreMutex> lock(impl_->store->mu);
    return impl_->store->stats;
}
MOE_DETAIL_MEMBER void Model::reset_expert_store_stats() const {
    if (!impl_ || !impl_->store) return;
    detail::ExpertStore& s = *impl_->store;
    std::lock_guard<detail::StoreMutex> lock(s.mu);
    ExpertStoreStats fresh;
    fresh.mem_budget_bytes = s.stats.mem_budget_bytes;
    fresh.resident_bytes = s.stats.resident_bytes;
    fresh.cache_bytes = s.stats.cache_bytes;
    fresh.slots = s.stats.slots;
    fresh.reads = s.stats.reads;
    s.stats = fresh;
}

MOE_API const char* expert_reads_name(ExpertReads r) {
    switch (r) {
        case ExpertReads::direct: return "direct";
        case ExpertReads::buffered: return "buffered";
        case ExpertReads::mapped: return "mapped";
    }
    return "unknown";
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] FORWARD PASS
//-----------------------------------------------------------------------------
// >>forward  One forward() handles a chunk of B tokens (B = 1 for decode) inside ONE thread-pool
// run; phases end at spin barriers. Per layer:
//   qkv        q|k|v rows as one matmul (+ bias)        rope_kv    QK-norm, RoPE, KV store (token x head)
//   attention  (token x KV head [x head subgroup x KV split])  att_out  merge KV splits, quantize
//   wo         attn_output rows added into x           router     router rows; the thread finishing
//              them does softmax + top-k + grouping by expert
//   expert_up  gate/up + SwiGLU over the rows of all active experts; whoever completes an expert
//              quantizes its hidden rows        expert_down  down rows + routing-weighted sum into x
// For B <= kSerialNormTokens the thread finishing wo (down) also runs ffn_norm (the next attn_norm),
// so decode has 8 barriers per layer (3 in the MoE part); larger B gets parallel norm phases
// (end_phase_then_norm() makes that choice for every norm).
// Matmuls hand out guided chunks of rows and prefetch ahead; weights are read once per chunk of
// tokens whatever B is (rows outside, tokens inside). Each input is quantized once to each
// activation format its consumers need. Attention reads each KV row once per query-head subgroup
// and splits long caches over threads (online softmax, merged in att_out) when heads cannot fill them.

namespace moe {
namespace detail {

//---- forward state: the model's plan, the KV cache, activations, routing, profile ---- >>forward-state
// The plan of dims and activation formats is the model's (ForwardPlan, fixed at load); a Session
// owns the rest. Everything is sized at create(), so eval() never allocates.

// Quantized copies of B rows of one input, one buffer per activation format; f32 reads `src`.
struct ActRows {
    const float* src = nullptr;  // (B, width)
    int64_t width = 0;
    AlignedBuffer<uint8_t> buf[kActFormatCount];
    size_t stride[kActFormatCount] = {};

    bool allocate(const float* src_, int64_t width_, int64_t rows) {
        src = src_; width = width_;
        for (int f = 1; f < kActFormatCount; ++f) {
            stride[f] = (act_row_bytes((ActFormat)f, width) + 63) / 64 * 64;
            if (!buf[f].allocate(std::max<size_t>(64, stride[f] * (size_t)rows))) return false;
        }
        return true;
    }
    const void* row(ActFormat f, int64_t t) const {
        return f == ActFormat::f32 ? (const void*)(src + t * width) : (const void*)(buf[(int)f].data + (size_t)t * stride[(int)f]);
    }
    // Quantizes elements [i0, i0 + len) of row t, a whole number of blocks, to every format in fmts.
    void quantize(uint8_t fmts, int64_t t, int64_t i0, int64_t len) {
        for (int f = 1; f < kActFormatCount; ++f)
            if (fmts & (1u << f))
                quantize_act((ActFormat)f, buf[f].data + (size_t)t * stride[f] + act_row_bytes((ActFormat)f, i0), src + t * width + i0, len);
    }
};

// Keys and values of every layer and position, float32.
// Keys and values of every layer and position: float32, or Q8_0 (SessionOptions::kv_type; blocks
// of 32 within each head, so head_dim must be a multiple of 32).
struct KvCache {
    AlignedBuffer<uint8_t> k, v;    // (n_layer, n_ctx, row_bytes), (n_layer, n_ctx, v_row_bytes)
    AlignedBuffer<int32_t> tokens;  // (n_ctx): the token at each filled position (prefix reuse, state files)
    int32_t n_ctx = 0;          // capacity in positions
    int32_t pos = 0;            // positions filled
    int64_t kv_dim = 0;
    bool q8 = false;            // rows of BlockQ8_0 instead of floats
    size_t row_bytes = 0, v_row_bytes = 0;  // v_row_bytes 0: values are read from the keys (MLA)

    static size_t row_size(int64_t dim, bool q8) { return q8 ? (size_t)(dim / kQK) * sizeof(BlockQ8_0) : (size_t)dim * 4; }
    std::vector<int32_t> slot;  // (n_layer): a layer's rows in k / v; -1 for a layer without attention
    // Not zeroed: attention reads only positions < pos, all written first.
    bool allocate(const std::vector<bool>& no_attention, int32_t n_layer, int32_t n_ctx_, int64_t kv_dim_, int64_t v_dim, bool q8_) {
        n_ctx = n_ctx_; kv_dim = kv_dim_; q8 = q8_;
        row_bytes = row_size(kv_dim, q8);
        v_row_bytes = row_size(v_dim, q8);
        slot.assign((size_t)n_layer, -1);
        int32_t used = 0;
        for (int32_t il = 0; il < n_layer; ++il)
            if ((size_t)il >= no_attention.size() || !no_attention[(size_t)il]) slot[(size_t)il] = used++;
        const size_t n = (size_t)used * (size_t)n_ctx;
        return k.allocate(n * row_bytes, false) && v.allocate(std::max<size_t>(64, n * v_row_bytes), false) && tokens.allocate((size_t)n_ctx_, false);
    }
    size_t offset(int il, int32_t p) const { return ((size_t)slot[(size_t)il] * (size_t)n_ctx + (size_t)p) * row_bytes; }  // bytes
    size_t v_offset(int il, int32_t p) const { return ((size_t)slot[(size_t)il] * (size_t)n_ctx + (size_t)p) * v_row_bytes; }
    // Short-convolution layers: the convolution's inputs (b * x) of the last conv_ring positions,
    // position p in slot p % conv_ring; a rewind within the ring keeps an exact state.
    AlignedBuffer<float> conv;  // (n_conv, conv_ring, conv_width)
    int32_t conv_ring = 0;
    int64_t conv_width = 0;
    std::vector<int32_t> conv_pos;  // (conv_ring): the position each slot holds for sure, -1: none
    bool allocate_conv(int32_t n_conv, int32_t ring, int64_t width) {
        conv_ring = ring; conv_width = width;
        conv_pos.assign(n_conv ? (size_t)ring : 0, -1);
        return n_conv == 0 || conv.allocate((size_t)n_conv * (size_t)ring * (size_t)width, true);
    }
    // Slots of positions >= p no longer hold what a continuation from p will read.
    void forget_conv_from(int32_t p) {
        for (int32_t& q : conv_pos)
            if (q >= p) q = -1;
    }
    bool conv_holds(int32_t first, int32_t end) const {  // positions [first, end), those >= 0
        for (int32_t p = std::max(first, 0); p < end; ++p)
            if (conv_pos[(size_t)(p % conv_ring)] != p) return false;
        return true;
    }
    float* conv_row(int32_t ci, int32_t p) { return conv.data + ((size_t)ci * (size_t)conv_ring + (size_t)(p % conv_ring)) * (size_t)conv_width; }
    const float* conv_row(int32_t ci, int32_t p) const { return conv.data + ((size_t)ci * (size_t)conv_ring + (size_t)(p % conv_ring)) * (size_t)conv_width; }
    // Gated delta-net layers: per layer ForwardPlan::ssm_floats, the raw conv inputs of the last
    // kernel - 1 positions (oldest first), then each v head's state (ForwardPlan::ssm_head floats).
    // They describe the sequence up to recr_pos only: a rewind (or a chunk that failed midway)
    // re-evaluates.
    AlignedBuffer<float> recr;
    int64_t recr_floats = 0;
    int32_t n_recr = 0;
    int32_t recr_pos = 0;  // -1: stale
    bool allocate_recr(int32_t n, int64_t floats) {
        n_recr = n; recr_floats = floats;
        return n == 0 || recr.allocate((size_t)n * (size_t)floats, true);
    }
    float* recr_layer(int32_t ri) { return recr.data + (size_t)ri * (size_t)recr_floats; }
    static uint64_t bytes(int32_t n_layer, int32_t n_ctx, int64_t kv_dim, int64_t v_dim, bool q8) {
        return (uint64_t)n_layer * (uint64_t)n_ctx * (uint64_t)(row_size(kv_dim, q8) + row_size(v_dim, q8));
    }
};

// Activations of the chunk in flight (up to n_batch tokens) and per-thread scratch.
struct Activations {
    AlignedBuffer<float> x, xb;          // (B, n_embd): residual stream, normed input of the next matmuls
    AlignedBuffer<float> q, k, v;        // (B, q_dim), (B, kv_dim) x2
    AlignedBuffer<float> att_out;        // (B, att_dim)
    AlignedBuffer<float> att_wo;         // MLA: (B, n_head * value_dim), the heads' values for attn_output
    AlignedBuffer<float> conv_bcx;       // short convolution: (B, 3 * n_embd) = gates b, c and input x
    AlignedBuffer<float> conv_y;         // (B, n_embd): c * conv(b * x), out_proj's input
    AlignedBuffer<float> q_gate;         // attention output gate: (B, 2 * q_dim), attn_q's rows ([query, gate] per head)
    AlignedBuffer<float> ssm_qkv, ssm_conv;  // delta net: (B, ssm_ch) raw and convolved q, k, v
    AlignedBuffer<float> ssm_z;          // (B, ssm_v): the output gate
    AlignedBuffer<float> ssm_ba;         // (B, 2 * v heads): beta, then alpha, before their functions (qwen3next: ssm_ba's order)
    AlignedBuffer<float> ssm_o;          // (B, ssm_v): the gated heads, ssm_out's input
    AlignedBuffer<float> ssm_scratch;    // per thread: one head's normed q and k, S^T k and S^T q (4 * state)
    ActRows act_ssm;
    ActRows act_conv;
    AlignedBuffer<float> q_proj;         // MLA: (B, n_head * head_dim), queries before absorption
    AlignedBuffer<float> q_lora;         // MLA: (B, q_lora_rank), the normed query bottleneck
    AlignedBuffer<uint8_t> mla_act;      // MLA: per thread, one head's q_nope or latent in wk_b's / wv_b's activation format
    size_t mla_act_stride = 0;
    ActRows act_q_lora;
    AlignedBuffer<float> rope_cs;        // (B, n_rot / 2, 2): cos, sin per position of the chunk
    AlignedBuffer<float> rope_cs_swa;    // the same for sliding-window layers with a base of their own
    AlignedBuffer<float> att_scratch;    // per thread: scores, accumulators, max, sum of one head group
    size_t att_scratch_stride = 0;
    AlignedBuffer<float> att_part;       // KV-split partials: (max, sum, head_dim values) per head and split
    AlignedBuffer<float> router_logits;  // (B, n_expert)
    AlignedBuffer<float> router_select;  // (B, n_expert): top-k scores, then the chosen experts' weights
    AlignedBuffer<float> hidden;         // (B * slots, max_ff): SwiGLU output per (token, slot)
    AlignedBuffer<uint8_t> hidden_q;     // (B * slots, hidden_q_stride): the same, quantized for down
    size_t hidden_q_stride = 0;
    AlignedBuffer<float> down_part;      // per thread: down-row dot products of a sub-chunk of rows
    size_t down_part_per_thread = 0;     // max(kDownRows, kGemmRows * B) * slots floats
    AlignedBuffer<float> logits_batch;   // (B, n_vocab)
    AlignedBuffer<float> logits;         // (n_vocab): after the last evaluated token
    ActRows act_x, act_att;              // xb and att_out quantized to what their matmuls read
};

// One (token, slot) use of an FFN: the hidden row it fills and its routing weight.
struct ExpertUse { int32_t token, slot; };

// An FFN used by at least one token of the chunk (a routed expert, the shared expert, or the
// dense FFN), resolved once by route() for the phases after it.
struct ActiveExpert {
    const Weight *gate, *up, *down;
    int64_t mat;                   // matrix in the stacks (0 for shared and dense)
    int32_t expert;                // routed expert id; -1 for shared and dense
    const uint8_t *gate_mat, *up_mat, *down_mat;  // its matrices: in the mapping, or in an expert-store slot
    const float *gate_b, *up_b, *down_b;          // its biases (gpt-oss's routed experts), else null
    int32_t use_begin, use_end;    // its uses in Routing::uses
    // Its gate/up work units (rows, or kGemmRows-row tiles when gemm_up) in the concatenated units
    // of all active experts.
    int64_t unit_begin, unit_end;
    bool gemm_up, gemm_down;       // its gate/up, its down projection run as panels (GEMM PANELS)
};

// Work finished in a phase. The thread whose piece completes the total runs the small serial step
// the next phase needs (routing, a norm, quantizing an expert's hidden rows) instead of everyone
// meeting at one more barrier for it.
struct alignas(64) DoneCounter {
    std::atomic<int64_t> n{0};
    // Adds `amount`; true for exactly one caller, the one reaching `total` (the counter restarts).
    bool finish(int64_t amount, int64_t total) {
        if (n.fetch_add(amount, std::memory_order_acq_rel) + amount != total) return false;
        n.store(0, std::memory_order_relaxed);
        return true;
    }
};

// Routing of the chunk in flight. Targets number the FFNs of a layer for the counting sort:
// 0 the shared expert, 1 the dense FFN, 2 + e routed expert e.
struct Routing {
    static constexpr int32_t kNoTarget = -1, kSharedTarget = 0, kDenseTarget = 1, kFirstExpertTarget = 2;  // kNoTarget: slot unused
    std::vector<int32_t> slot_target;   // (B * slots)
    std::vector<float> slot_weight;     // (B * slots)
    std::vector<int32_t> target_first;  // (n_expert + 3): CSR offsets of the uses per target
    std::vector<ExpertUse> uses;        // (B * slots), grouped by target
    std::vector<ActiveExpert> active;   // targets with uses, in target order
    std::unique_ptr<DoneCounter[]> expert_done;  // (n_expert + 2): gate/up rows done per active expert
    std::vector<std::pair<float, int32_t>> topk;
    std::vector<std::pair<float, int32_t>> group_rank;  // grouped top-k: (group score, group)
    std::vector<int32_t> last_experts;  // (n_layer * n_expert_used): experts of the last token
    std::vector<int32_t> token_experts; // (B, n_layer * n_expert_used): every token's (Session::eval_batch)
    std::vector<int32_t> lead_experts;  // eval_batch: the first session's, kept while later passes run
    bool down_tiles = false;            // some active expert's down projection runs as panels
    bool shared_first = false;          // active[0], the shared expert, ran before the others (prediction)
    int64_t active_units() const { return active.empty() ? 0 : active.back().unit_end; }
};

// Wall time per phase (SessionOptions::profile): thread 0 stamps the end of every phase.
struct PhaseProfile {
    enum Phase { embed, attn_norm, qkv, rope_kv, attention, att_out, wo, ffn_norm, router, route, expert_up, expert_down,
                 out_norm, head, count };
    static const char* name(int ph) {
        static const char* const names[count] = {"embed", "attn_norm", "qkv", "rope_kv", "attention", "att_out", "wo",
                                                 "ffn_norm", "router", "route", "expert_up", "expert_down", "out_norm", "head"};
        return names[ph];
    }
    bool enabled = false;
    double seconds[count] = {};
    std::chrono::steady_clock::time_point mark;
    void start() { if (enabled) mark = std::chrono::steady_clock::now(); }
    void stamp(Phase ph) {
        const auto now = std::chrono::steady_clock::now();
        seconds[ph] += std::chrono::duration<double>(now - mark).count();
        mark = now;
    }
};

// Expert prediction inside a chunk: route(l) predicts layers l+1 .. l+depth for each token, and
// route(target) scores what was predicted for it. Storage is sized at create().
struct ExpertPrediction {
    std::shared_ptr<ExpertPredictor> predictor;  // null: prediction off
    int32_t depth = 0, per_layer = 0, batch = 0;  // per_layer = n_expert_used + predict_extra
    std::vector<int32_t> ids;    // [((target * depth + d - 1) * batch + t) * per_layer + i]
    std::vector<int32_t> count;  // [(target * depth + d - 1) * batch + t]: ids written
    PredictionStats stats;
    // Layers with a shared expert, in chunks of up to kSerialNormTokens tokens: the shared expert runs
    // before the routed ones so that the predictor sees the residual stream with its output.
    std::vector<float> shared_out;  // (kSerialNormTokens, n_embd): the shared expert's down rows
    std::vector<float> input;       // (n_embd): residual + shared gate x shared_out, one token
    size_t at(int target, int d, int32_t t) const { return ((size_t)target * (size_t)depth + (size_t)(d - 1)) * (size_t)batch + (size_t)t; }
};

// Arguments of one forward() over a chunk of tokens, shared by all threads of its pool run.
struct ForwardCall {
    const int32_t* tokens = nullptr;
    int32_t n = 0;             // tokens in the chunk
    int32_t first_logit = 0;   // first row of the output head (0 = all, n - 1 = last only)
    int32_t att_groups = 1;    // query-head subgroups per KV head
    int32_t att_split = 1;     // KV-range splits
    bool serial_norms = false; // n <= kSerialNormTokens: the thread finishing a matmul runs the norm after it
    KvCache* const* seq_kv = nullptr;  // batched decode: token t's own cache (at its position); else the session's
};

// A norm step: rms_norm(x rows [t0, t0 + n)) * weight into xb, quantized to fmts.
struct NormStep {
    const float* weight;
    int32_t t0, n;
    uint8_t fmts;
    PhaseProfile::Phase phase;  // its own phase when it is not folded into the previous one
};

// One matrix of a matmul phase: out[(t - t0) * out_stride + r] (= or +=) W[mat] row r . in row t + bias[r].
struct MatTask {
    const Weight* w;
    int64_t mat;
    const ActRows* in;
    float* out;
    int64_t out_stride;
    const float* bias;  // nullptr: none
    bool accumulate;
};

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
// gpt-oss's SwiGLU: the gate clamped above, the linear part clamped both ways and offset by 1.
inline float swiglu_oai(float gate, float up) {
    const float g = std::min(gate, 7.f), u = std::max(-7.f, std::min(up, 7.f));
    return g / (1.f + std::exp(-1.702f * g)) * (u + 1.f);
}

struct SessionImpl {
    static constexpr int kAttBlock = 64;         // KV positions scored at once (online softmax step)
    static constexpr int kAttTokens = 8;         // prefill tokens per attention unit (one cache read for all)
    static constexpr int kMinSplitLen = 128;     // shortest KV range worth its own thread
    static constexpr int kSerialNormTokens = 4;  // up to this many tokens one thread norms them (no barrier)
    static constexpr int kDownRows = 64;         // down-projection rows per expert stream before the weighted sum
    static constexpr int kDefaultGemmMinTokens = 8;  // SessionOptions::gemm_min_tokens = 0
    // Matmuls prefetch the weights prefetch_bytes ahead of the row they compute: hardware prefetchers
    // stop at 4 KiB page boundaries, and a core streaming alone cannot otherwise keep enough loads in
    // flight (measured on Sapphire Rapids: decode +18% at 16 threads, +40% at 1 thread).
    static constexpr size_t kDefaultPrefetch = 2048;
    // Short-convolution inputs are kept for the last n_batch + kConvRing positions (slots tagged by
    // position): a chunk never overwrites the window before it, and a truncate()/eval_prompt() whose
    // window is still in the ring keeps an exact state; otherwise the kept prefix is evaluated again.
    static constexpr int32_t kConvRing = 64;

    std::shared_ptr<const ModelImpl> model;  // keeps the weights alive as long as the session
    const ModelInfo* hp = nullptr;
    const ForwardPlan* plan = nullptr;
    ThreadPool pool;
    int32_t n_batch = 0;
    bool float_activations = false;  // SessionOptions::float_activations
    InputObserverFn observer = nullptr;  // SessionOptions::observe_inputs
    void* observer_user = nullptr;
    size_t prefetch_bytes = 0;
    VecDotFn dot_f32 = nullptr;      // float . float, for attention scores
    // A float cache's attention through the att_* kernels where the ISA has them (att_simd);
    // elsewhere dot_f32 and plain loops.
    bool att_simd = false;
    AttKernels att;
    VecDotFn dot_q8 = nullptr;       // Q8_0 . Q8_0, for scores against a Q8_0 KV cache
    KvCache kv;
    Activations a;
    Routing r;
    PhaseProfile profile;
    DoneCounter rows_done;           // rows of the current matmul phase
    ExpertStats stats;               // router statistics (Session::expert_stats)
    ExpertPrediction prediction;     // SessionOptions::predict_depth > 0
    ExpertStore* store = nullptr;    // the model's (LoadOptions::mem_budget), else null
    ExpertPins pins;                 // store slots held for the layer in flight
    std::vector<int32_t> store_ids;  // routed experts of the layer, for the store
    std::vector<ExpertPointers> store_ptrs;
    std::vector<std::pair<int32_t, std::vector<int32_t>>> store_predicted;  // (target layer, experts) to prefetch
    bool store_failed = false;       // a read failed in this forward(): it returns io_error
    std::string store_error;         // its message (set on a pool thread, reported on the caller's)
    std::vector<KvCache*> batch_kv;  // Session::eval_batch: each token's cache
    std::atomic<bool> cancel_requested{false};  // Session::cancel
    bool stop_layers = false;        // written by thread 0 before a barrier, read by all after it
    bool (*progress)(void* user, size_t done, size_t total) = nullptr;
    void* progress_user = nullptr;
    int32_t gemm_min_tokens = 0;     // SessionOptions::gemm_min_tokens resolved; 0 = never
    bool gemm_chunk = false;         // the chunk in flight may use panels (set by forward())
    AlignedBuffer<uint8_t> gemm_buf;
    std::vector<GemmScratch> gemm_scratch;  // two per thread (gate and up)

    explicit SessionImpl(int n_threads) : pool(n_threads) {}
    Status init(const std::shared_ptr<const ModelImpl>& m, const SessionOptions& o);
    Status forward(const int32_t* tokens, int32_t n, float* all_logits, KvCache* const* seq_kv = nullptr);
    // Token t of the chunk: its cache and position.
    KvCache& kv_of(const ForwardCall& c, int32_t t) { return c.seq_kv ? *c.seq_kv[t] : kv; }
    int32_t pos_of(const ForwardCall& c, int32_t t) const { return c.seq_kv ? c.seq_kv[t]->pos : kv.pos + t; }

    const RowKernel& kt(const Weight& w) const { return float_activations ? w.kernel_f32 : w.kernel; }
    const LayerFormats& formats(int il) const { return plan->layer_formats[float_activations][(size_t)il]; }
    void prefetch_ahead(const uint8_t* row, size_t bytes) const {
#if defined(__GNUC__) || defined(__clang__)
        const uintptr_t p = reinterpret_cast<uintptr_t>(row) + prefetch_bytes;  // may pass the tensor's end: prefetches never fault
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(p + o), 0, 3);
#else
        (void)row; (void)bytes;
#endif
    }
    void end_phase(int ith, int nth, PhaseProfile::Phase ph) {
        pool.barrier(ith, nth);
        if (profile.enabled && ith == 0) profile.stamp(ph);
    }
    // Next rows of a matmul phase for this thread; the smallest chunk shrinks as tokens per row grow.
    bool next_rows(int64_t total, int32_t n_tok, int64_t* begin, int64_t* end) {
        return pool.grab_guided(total, std::max<int64_t>(1, 8 / std::max(1, n_tok)), pool.size(), begin, end);
    }

    void forward_thread(const ForwardCall& c, int ith, int nth);
    bool panels_for(const Weight& w, int64_t tokens) const { return gemm_chunk && tokens >= gemm_min_tokens && kt(w).has_gemm(); }
    // The panel formats of an input quantized to `base` (what its row kernels read), for this chunk.
    uint8_t gemm_fmts(uint8_t base) const {
        if (!gemm_chunk) return 0;
        return (uint8_t)((base & (fmt_bit(ActFormat::q8_0) | fmt_bit(ActFormat::q8_1) | fmt_bit(ActFormat::q8_0_split)) ? fmt_bit(ActFormat::q8_gemm) : 0) |
                         (base & fmt_bit(ActFormat::q8_k) ? fmt_bit(ActFormat::q8_gemm_k) : 0));
    }
    void observe(int il, MatInput what, int32_t n, int ith, int nth);
    NormStep norm_before_layer(const ForwardCall& c, int il) const;
    void end_phase_then_norm(const NormStep& step, bool finisher, const ForwardCall& c, int ith, int nth, PhaseProfile::Phase ph);
    void norm_rows(const NormStep& step, int ith, int nth);
    bool matmul_phase(const MatTask* tasks, int n_tasks, int32_t t0, int32_t n, int ith);
    void matmul_tile(const MatTask& mt, int64_t row0, int32_t t0, int32_t n, int ith);
    void rope_phase(const ForwardCall& c, int il, int ith, int nth);
    void mla_qkv(const ForwardCall& c, int il, int ith, int nth);
    void conv_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth);
    void delta_conv_phase(const ForwardCall& c, int il, int ith, int nth);
    void delta_rule_phase(const ForwardCall& c, int il, int ith, int nth);
    void quantize_phase(ActRows* rows, int32_t n, uint8_t fmts, int ith, int nth);
    Status rewind(int32_t n);
    Status replay_prefix(int32_t n);
    void mla_rope_phase(const ForwardCall& c, int il, int ith, int nth);
    void mla_values_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth);
    void attention_phase(const ForwardCall& c, int il, int ith);
    void att_out_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth);
    void route(int il, int32_t n);
    void score_predictions(int il, int32_t t);
    void predict(int il, int32_t t, const float* hidden);
    bool shared_down_phase(int32_t n);
    void predict_after_shared(int il, int32_t n);
    int collect_predictions(int il, int32_t n);
    void use_store(int il, int32_t n);
    void await_experts(int il);
    void expert_up_phase(int32_t n, int ith, bool shared_only = false);
    void up_row(const ActiveExpert& e, int64_t r);
    float gated(float gate, float up) const { return model->ffn_act == FfnAct::swiglu_oai ? swiglu_oai(gate, up) : silu(gate) * up; }
    void up_tile(const ActiveExpert& e, int64_t row0, int ith);
    void down_tile(const ActiveExpert& e, int64_t row0, int rows, float* part_rows, int64_t n_uses, int ith);
    void quantize_hidden(const ActiveExpert& e);
    bool expert_down_phase(int32_t n, int ith);
};

// 1 / rms(x) with double partial sums (four, so the loop pipelines).
inline float rms_scale(const float* x, int64_t n, float eps) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)x[i] * x[i]; s1 += (double)x[i + 1] * x[i + 1];
        s2 += (double)x[i + 2] * x[i + 2]; s3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; ++i) s0 += (double)x[i] * x[i];
    return (float)(1.0 / std::sqrt((s0 + s1 + s2 + s3) / (double)n + eps));
}

inline void rms_norm(float* out, const float* x, const float* w, int64_t n, float eps) {
    const float scale = rms_scale(x, n, eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Rotates pairs of one head by the angles whose (cos, sin) are in cs: NEOX pairs (i, i + n_rot/2),
// normal pairs (2i, 2i+1).
inline void rope(float* head, const float* cs, int n_rot, bool neox) {
    for (int i = 0; i < n_rot / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const int a = neox ? i : 2 * i, b = neox ? i + n_rot / 2 : 2 * i + 1;
        const float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}


//---- expert statistics and prediction ---- >>experts

// One token's router logits lg (n_expert) become the gate's scores (softmax, sigmoid, or the logits
// for softmax_weight; the weights' source) and sel what the top-k ranks: the scores plus any
// selection bias, with grouped top-k (DeepSeek-V3: a group scores the sum of its two best experts;
// only the n_group_used best groups, ties to the lower group, keep their experts) setting the
// other experts to -inf. route() and the look-ahead predictor rank alike through it.
inline void gate_scores(const LayerWeights& l, const ModelInfo& hp, float* lg, float* sel, std::vector<std::pair<float, int32_t>>* group_rank) {
    const int n_expert = hp.n_expert;
    if (!l.router_bias.empty())
        for (int e = 0; e < n_expert; ++e) lg[e] += l.router_bias[(size_t)e];
    if (hp.expert_gating == ExpertGating::softmax) {
        const float mx = *std::max_element(lg, lg + n_expert);
        float sum = 0;
        for (int e = 0; e < n_expert; ++e) { lg[e] = std::exp(lg[e] - mx); sum += lg[e]; }
        for (int e = 0; e < n_expert; ++e) lg[e] /= sum;
    } else if (hp.expert_gating == ExpertGating::sigmoid) {
        for (int e = 0; e < n_expert; ++e) lg[e] = 1.f / (1.f + std::exp(-lg[e]));
    }
    for (int e = 0; e < n_expert; ++e) sel[e] = l.selection_bias.empty() ? lg[e] : lg[e] + l.selection_bias[(size_t)e];
    if (hp.n_expert_groups > 1) {
        const int n_groups = hp.n_expert_groups, per = n_expert / n_groups;
        group_rank->clear();
        for (int g = 0; g < n_groups; ++g) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; ++e) {
                if (sel[e] > b1) { b2 = b1; b1 = sel[e]; } else if (sel[e] > b2) { b2 = sel[e]; }
            }
            group_rank->emplace_back(per > 1 ? b1 + b2 : b1, g);
        }
        std::partial_sort(group_rank->begin(), group_rank->begin() + hp.n_group_used, group_rank->end(),
                          [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
                              return x.first > y.first || (x.first == y.first && x.second < y.second);
                          });
        for (int j = hp.n_group_used; j < n_groups; ++j)
            std::fill(sel + (*group_rank)[(size_t)j].second * per, sel + ((*group_rank)[(size_t)j].second + 1) * per, -INFINITY);
    }
}

// The k best of sel (ties to the lower id) into topk's first k entries.
inline void top_experts(const float* sel, int n_expert, int k, std::vector<std::pair<float, int32_t>>* topk) {
    topk->clear();
    for (int e = 0; e < n_expert; ++e) topk->emplace_back(sel[e], e);
    std::partial_sort(topk->begin(), topk->begin() + k, topk->end(), [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
        return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
}

// The built-in predictor: the target layer's ffn_norm and router applied to the current residual
// stream ("gate look-ahead"; ~70-90% recall one layer ahead in the literature, see prefetch.md).
class GateLookahead : public ExpertPredictor {
public:
    explicit GateLookahead(const ModelImpl* m)
        : m_(m), h_((size_t)m->info.n_embd), logits_((size_t)m->info.n_expert), select_((size_t)m->info.n_expert) {
        order_.reserve((size_t)m->info.n_expert);
        groups_.reserve((size_t)std::max(1, m->info.n_expert_groups));
    }
    int predict(int /*layer*/, int target, const float* hidden, int32_t* experts, int max) override {
        const ModelInfo& hp = m_->info;
        if (target < 0 || target >= hp.n_layer || !m_->layers[(size_t)target].moe()) return 0;
        const LayerWeights& l = m_->layers[(size_t)target];
        const float scale = rms_scale(hidden, hp.n_embd, hp.rms_eps);
        for (int64_t i = 0; i < hp.n_embd; ++i) h_[(size_t)i] = hidden[i] * scale * l.ffn_norm[(size_t)i];
        for (int e = 0; e < hp.n_expert; ++e)
            logits_[(size_t)e] = l.router.kernel_f32.vec_dot(l.router.row(0, e), h_.data(), hp.n_embd) * (l.router.scaled() ? l.router.scale(0) : 1.f);
        gate_scores(l, hp, logits_.data(), select_.data(), &groups_);  // ranked as route() ranks
        const int k = std::min(max, hp.n_expert);
        top_experts(select_.data(), hp.n_expert, k, &order_);
        for (int i = 0; i < k; ++i) experts[i] = order_[(size_t)i].second;
        return k;
    }

private:
    const ModelImpl* m_;  // kept alive by the Session that owns this predictor
    std::vector<float> h_, logits_, select_;
    std::vector<std::pair<float, int32_t>> order_, groups_;
};

inline int32_t n_conv_layers(const ModelInfo& info) { return (int32_t)std::count(info.layer_conv.begin(), info.layer_conv.end(), true); }

// Moves the session back to position n. Short-convolution state comes from the ring when its slots
// still hold the window before n (tagged by position); delta-net states cannot be rewound. Otherwise
// the kept prefix is evaluated again (on a failure there the session stays at the position it reached).
inline Status SessionImpl::rewind(int32_t n) {
    if (n >= kv.pos || (hp->shortconv_l_cache == 0 && kv.n_recr == 0)) {
        kv.pos = std::min(n, kv.pos);
        return Status::ok;
    }
    if (kv.n_recr == 0) {
        kv.forget_conv_from(n);
        if (kv.conv_holds(n - (hp->shortconv_l_cache - 1), n)) {
            kv.pos = n;
            return Status::ok;
        }
    }
    return replay_prefix(n);
}

// Evaluates the first n tokens of the session again, from position 0 (the KV rows are rewritten
// with what they held; the recurrent and convolution states are rebuilt).
inline Status SessionImpl::replay_prefix(int32_t n) {
    std::vector<int32_t> prefix(kv.tokens.data, kv.tokens.data + n);
    kv.pos = 0;
    kv.recr_pos = 0;
    kv.forget_conv_from(0);
    for (int32_t done = 0; done < n;) {
        const int32_t chunk = std::min(n - done, n_batch);
        Status s = forward(prefix.data() + done, chunk, nullptr, nullptr);
        if (s != Status::ok) return s;
        done += chunk;
    }
    return Status::ok;
}

inline int32_t session_n_ctx(const ModelInfo& info, int32_t requested) {
    return requested > 0 ? requested : std::min(info.n_ctx_train, 4096);
}

inline Status SessionImpl::init(const std::shared_ptr<const ModelImpl>& m, const SessionOptions& o) {
    model = m;
    hp = &m->info;
    plan = &m->plan;
    const int32_t n_ctx = session_n_ctx(*hp, o.n_ctx);
    if (n_ctx <= 0 || n_ctx > kMaxContextLength)
        return fail(Status::invalid_argument, "n_ctx %d is out of range [1, %d]", n_ctx, kMaxContextLength);
    n_batch = o.n_batch > 0 ? std::min(o.n_batch, 4096) : 64;
    store = m->store.get();
    // With an expert store, a chunk's layer must fit in the cache: at most slots / k tokens.
    if (store && hp->n_expert_used > 0) n_batch = std::max(1, std::min(n_batch, store->stats.slots / hp->n_expert_used));
    // The store's I/O threads need CPU time to issue and complete reads: a compute thread spinning
    // at a barrier delays them (2 vCPUs, prediction on: decode +14% when barriers yield at once).
    if (store && store->reads_on_threads()) pool.set_yield_after(std::chrono::microseconds(0));
    float_activations = o.float_activations;
    observer = o.observe_inputs;
    observer_user = o.observe_user;
    progress = o.progress;
    progress_user = o.progress_user;
    profile.enabled = o.profile;
    const int64_t B = n_batch, nth = pool.size(), hk = plan->att_k, hv = plan->att_v, slots = plan->slots, group = plan->group;
    if (o.kv_type != TensorType::f32 && o.kv_type != TensorType::q8_0)
        return fail(Status::invalid_argument, "kv_type %s: the KV cache is F32 or Q8_0", tensor_type_name(o.kv_type));
    const bool kv_q8 = o.kv_type == TensorType::q8_0;
    if (kv_q8 && (hk % kQK || hv % kQK || (model->mla && hp->n_rot % kQK)))
        return fail(Status::invalid_argument, "a Q8_0 KV cache needs head_dim (the cached key and value head sizes) to be a multiple of %d (the model's are %lld and %lld%s)",
                    kQK, (long long)hk, (long long)hv, model->mla ? ", and its rope part must be one too" : "");
    std::vector<bool> no_attention((size_t)hp->n_layer, false);
    int32_t n_recr = 0;
    for (int il = 0; il < hp->n_layer; ++il) {
        no_attention[(size_t)il] = hp->layer_conv[(size_t)il] || hp->layer_recurrent[(size_t)il];
        n_recr += hp->layer_recurrent[(size_t)il] ? 1 : 0;
    }
    const int32_t n_att = (int32_t)std::count(no_attention.begin(), no_attention.end(), false);
    if (!kv.allocate(no_attention, hp->n_layer, n_ctx, plan->kv_dim, plan->v_dim, kv_q8))
        return fail(Status::out_of_memory, "cannot allocate the KV cache for n_ctx %d (%.1f MiB)", n_ctx,
                    (double)KvCache::bytes(n_att, n_ctx, plan->kv_dim, plan->v_dim, kv_q8) / (1 << 20));
    if (!kv.allocate_recr(n_recr, plan->ssm_floats))
        return fail(Status::out_of_memory, "cannot allocate the delta-net states (%.1f MiB)", (double)n_recr * (double)plan->ssm_floats * 4 / (1 << 20));
    // Split-K is used only while B * n_kv < 2 * threads, so splits never exceed 4 * threads units.
    // + with a Q8_0 cache: the unit's queries as Q8_0 and one dequantized value row.
    const int64_t q8_floats = kv_q8 ? (kAttTokens * group * (hk / kQK) * (int64_t)sizeof(BlockQ8_0) + 3) / 4 + hv : 0;
    a.att_scratch_stride = (size_t)((kAttTokens * group * (kAttBlock + hv + 2) + q8_floats + 15) / 16 * 16);
    a.down_part_per_thread = (size_t)std::max<int64_t>(kDownRows, kGemmRows * B) * (size_t)slots;
    a.hidden_q_stride = (size_t)plan->max_ff * 4;  // f32, and every quantized format's row (+ one block)
    for (int f = 1; f < kActFormatCount; ++f) {
        const int64_t be = act_type((ActFormat)f).block_elems;
        a.hidden_q_stride = std::max(a.hidden_q_stride, act_row_bytes((ActFormat)f, plan->max_ff / be * be + be));
    }
    a.hidden_q_stride = (a.hidden_q_stride + 63) / 64 * 64;  // rows aligned for every block type
    if (model->mla) {
        const int64_t widest = std::max<int64_t>(hp->head_dim, hp->kv_lora_rank);
        a.mla_act_stride = (size_t)widest * 4;
        for (int f = 1; f < kActFormatCount; ++f) a.mla_act_stride = std::max(a.mla_act_stride, act_row_bytes((ActFormat)f, widest));
        a.mla_act_stride = (a.mla_act_stride + 63) / 64 * 64;
        if (!a.mla_act.allocate(a.mla_act_stride * (size_t)nth)) return fail(Status::out_of_memory, "cannot allocate the MLA scratch");
    }
    const bool ok = a.x.allocate((size_t)(B * plan->n_embd)) && a.xb.allocate((size_t)(B * plan->n_embd)) &&
                    a.q.allocate((size_t)(B * plan->q_dim)) && a.k.allocate((size_t)(B * plan->kv_dim)) &&
                    a.v.allocate((size_t)(B * std::max<int64_t>(1, plan->v_dim))) && a.att_out.allocate((size_t)(B * plan->att_dim)) &&
                    a.rope_cs.allocate((size_t)(B * std::max(2, hp->n_rot))) && a.rope_cs_swa.allocate((size_t)(B * std::max(2, hp->n_rot))) && a.att_scratch.allocate(a.att_scratch_stride * (size_t)nth) &&
                    a.att_part.allocate((size_t)(4 * nth * group * (hv + 2))) &&
                    a.router_logits.allocate((size_t)(B * std::max(1, hp->n_expert))) && a.router_select.allocate((size_t)(B * std::max(1, hp->n_expert))) &&
                    a.hidden.allocate((size_t)(B * slots * plan->max_ff)) && a.hidden_q.allocate(a.hidden_q_stride * (size_t)(B * slots)) &&
                    a.down_part.allocate((size_t)nth * a.down_part_per_thread) && a.logits.allocate((size_t)hp->n_vocab) &&
                    a.logits_batch.allocate((size_t)(B * hp->n_vocab)) && a.act_x.allocate(a.xb.data, plan->n_embd, B) &&
                    (!model->mla || (a.att_wo.allocate((size_t)(B * plan->wo_dim)) && a.q_proj.allocate((size_t)(B * hp->n_head * hp->head_dim)) &&
                                     a.q_lora.allocate((size_t)(B * std::max(1, hp->q_lora_rank))) &&
                                     a.act_q_lora.allocate(a.q_lora.data, std::max(1, hp->q_lora_rank), B))) &&
                    a.act_att.allocate(model->mla ? a.att_wo.data : a.att_out.data, plan->wo_dim, B) &&
                    (hp->shortconv_l_cache == 0 || (a.conv_bcx.allocate((size_t)(B * 3 * plan->n_embd)) && a.conv_y.allocate((size_t)(B * plan->n_embd)) &&
                                                     a.act_conv.allocate(a.conv_y.data, plan->n_embd, B) &&
                                                     kv.allocate_conv(n_conv_layers(*hp), n_batch + kConvRing, plan->n_embd)));
    const bool ok_gated = !hp->attn_output_gate || a.q_gate.allocate((size_t)(B * 2 * plan->q_dim));
    const bool ok_delta = n_recr == 0 || (a.ssm_qkv.allocate((size_t)(B * plan->ssm_ch)) && a.ssm_conv.allocate((size_t)(B * plan->ssm_ch)) &&
                                          a.ssm_z.allocate((size_t)(B * plan->ssm_v)) && a.ssm_ba.allocate((size_t)(B * 2 * hp->ssm_v_heads)) &&
                                          a.ssm_o.allocate((size_t)(B * plan->ssm_v)) && a.ssm_scratch.allocate((size_t)(nth * 4 * hp->ssm_state)) &&
                                          a.act_ssm.allocate(a.ssm_o.data, plan->ssm_v, B));
    if (!ok || !ok_gated || !ok_delta) return fail(Status::out_of_memory, "cannot allocate the activation buffers for n_batch %d", n_batch);
    dot_f32 = row_kernel(*quant_type((uint32_t)TensorType::f32), active_isa(), 1).vec_dot;
    att_simd = active_isa() != Isa::scalar && att_kernels(active_isa(), &att);
    dot_q8 = pick_for_isa(quant_type((uint32_t)TensorType::q8_0)->dot, active_isa());
    gemm_min_tokens = o.gemm_min_tokens < 0 || float_activations || !gemm_tile_kernel(active_isa()) ? 0
                      : o.gemm_min_tokens == 0 ? kDefaultGemmMinTokens : o.gemm_min_tokens;
    if (gemm_min_tokens > 0 && n_batch >= gemm_min_tokens) {
        const int64_t max_k = std::max(std::max(plan->n_embd, plan->wo_dim), std::max<int64_t>(plan->max_ff, hp->q_lora_rank));
        const size_t per = (GemmScratch::bytes(max_k) + 63) / 64 * 64;
        if (!gemm_buf.allocate(per * 2 * (size_t)nth)) return fail(Status::out_of_memory, "cannot allocate the prefill panels");
        gemm_scratch.resize(2 * (size_t)nth);
        for (size_t i = 0; i < gemm_scratch.size(); ++i) gemm_scratch[i].carve(gemm_buf.data + i * per, max_k);
    } else {
        gemm_min_tokens = 0;
    }
    prefetch_bytes = o.prefetch_distance < 0 ? kDefaultPrefetch : (size_t)o.prefetch_distance;
#if !defined(__GNUC__) && !defined(__clang__)
    prefetch_bytes = 0;
#endif
    r.slot_target.assign((size_t)(B * slots), 0);
    r.slot_weight.assign((size_t)(B * slots), 0.f);
    r.target_first.assign((size_t)hp->n_expert + 3, 0);
    r.uses.resize((size_t)(B * slots));
    r.active.reserve((size_t)hp->n_expert + 2);
    r.topk.reserve((size_t)hp->n_expert);
    r.group_rank.reserve((size_t)std::max(1, hp->n_expert_groups));
    r.last_experts.assign((size_t)hp->n_layer * (size_t)std::max(1, hp->n_expert_used), -1);
    r.token_experts.assign((size_t)B * r.last_experts.size(), -1);
    r.lead_experts.assign(r.last_experts.size(), -1);
    r.expert_done.reset(new (std::nothrow) DoneCounter[(size_t)hp->n_expert + 2]);
    if (!r.expert_done) return fail(Status::out_of_memory, "out of memory");
    if (hp->n_expert > 0) {
        stats.n_layer = hp->n_layer;
        stats.n_expert = hp->n_expert;
        stats.count.assign((size_t)hp->n_layer * (size_t)hp->n_expert, 0);
        stats.weight.assign((size_t)hp->n_layer * (size_t)hp->n_expert, 0.0);
    }
    ExpertPrediction& p = prediction;
    p.stats.n_layer = hp->n_layer;
    p.stats.max_depth = hp->n_expert > 0 ? std::min(o.predict_depth, hp->n_layer - 1) : 0;
    if (p.stats.max_depth > 0) {
        p.depth = p.stats.max_depth;
        p.per_layer = std::min(hp->n_expert, hp->n_expert_used + o.predict_extra);
        p.batch = (int32_t)B;
        p.predictor = o.predictor ? o.predictor : std::make_shared<GateLookahead>(m.get());
        const size_t cells = (size_t)hp->n_layer * (size_t)p.depth;
        p.ids.assign(cells * (size_t)B * (size_t)p.per_layer, -1);
        p.count.assign(cells * (size_t)B, 0);
        p.stats.predicted.assign(cells, 0);
        p.stats.correct.assign(cells, 0);
        p.stats.routed.assign(cells, 0);
        store_predicted.resize((size_t)p.depth);
        for (auto& target : store_predicted) target.second.reserve((size_t)p.per_layer);
        if (std::any_of(m->layers.begin(), m->layers.end(), [](const LayerWeights& l) { return l.moe() && (bool)l.gate_shexp; })) {
            p.shared_out.assign((size_t)kSerialNormTokens * (size_t)hp->n_embd, 0.f);
            p.input.assign((size_t)hp->n_embd, 0.f);
        }
    }
    store_ids.reserve((size_t)hp->n_expert);
    store_ptrs.reserve((size_t)hp->n_expert);
    return Status::ok;
}

//---- the forward pass of one chunk: eval() -> forward() -> forward_thread() on every thread ---- >>forward-chunk

inline Status SessionImpl::forward(const int32_t* tokens, int32_t n, float* all_logits, KvCache* const* seq_kv) {
    if (!seq_kv && kv.n_recr && kv.recr_pos != kv.pos) {  // stale delta-net states (a chunk failed midway)
        Status s = replay_prefix(kv.pos);
        if (s != Status::ok) return s;
    }
    ForwardCall c;
    c.tokens = tokens;
    c.n = n;
    c.first_logit = all_logits || seq_kv ? 0 : n - 1;
    c.seq_kv = seq_kv;
    int32_t longest = kv.pos + n;  // attention length of the last token
    if (seq_kv)
        for (int32_t t = 0; t < n; ++t) longest = std::max(longest, seq_kv[t]->pos + 1);
    c.serial_norms = n <= kSerialNormTokens;
    // Panels only for one session's chunk: eval_batch stays bit-identical to each session's solo decode.
    gemm_chunk = gemm_min_tokens > 0 && !seq_kv && n >= gemm_min_tokens;
    // Split query-head groups, then the KV range, only when (token, KV head) units cannot keep every
    // thread busy; short caches are not split (each split must cover kMinSplitLen positions).
    const int32_t nth = pool.size(), group = plan->group;
    while (n * hp->n_head_kv * c.att_groups < nth && c.att_groups < group) {
        int32_t g = c.att_groups + 1;
        while (group % g) ++g;  // next divisor of group
        c.att_groups = g;
    }
    const int32_t units = n * hp->n_head_kv * c.att_groups;
    c.att_split = units >= 2 * nth ? 1 : std::max(1, std::min((2 * nth + units - 1) / units, longest / kMinSplitLen));
    profile.start();
    store_failed = false;
    stop_layers = false;
    if (hp->shortconv_l_cache)  // the chunk overwrites these ring slots; they count once it is kept
        for (int32_t t = 0; t < n; ++t) {
            KvCache& cache = kv_of(c, t);
            cache.conv_pos[(size_t)(pos_of(c, t) % cache.conv_ring)] = -1;
        }
    for (int32_t t = 0; t < n && kv.n_recr; ++t) kv_of(c, t).recr_pos = -1;  // the chunk moves the states on
    pool.parallel_for([this, &c](int ith, int nth_) { forward_thread(c, ith, nth_); });
    if (store) {
        store->release(&pins);
        if (store_failed) return fail(Status::io_error, "%s", store_error.c_str());  // the chunk is not kept
    }
    if (stop_layers) {  // the chunk is not kept
        cancel_requested.store(false);
        return fail(Status::cancelled, "evaluation cancelled (Session::cancel) at position %d", kv.pos);
    }
    if (all_logits) std::memcpy(all_logits, a.logits_batch.data, (size_t)n * (size_t)hp->n_vocab * 4);
    if (hp->shortconv_l_cache)
        for (int32_t t = 0; t < n; ++t) {
            KvCache& cache = kv_of(c, t);
            cache.conv_pos[(size_t)(pos_of(c, t) % cache.conv_ring)] = pos_of(c, t);
        }
    for (int32_t t = 0; t < n && kv.n_recr; ++t) kv_of(c, t).recr_pos = pos_of(c, t) + 1;
    if (seq_kv) {  // the caller hands each row to its session
        for (int32_t t = 0; t < n; ++t) seq_kv[t]->tokens.data[seq_kv[t]->pos++] = tokens[t];
        return Status::ok;
    }
    std::memcpy(a.logits.data, a.logits_batch.data + (int64_t)(n - c.first_logit - 1) * hp->n_vocab, (size_t)hp->n_vocab * 4);
    std::memcpy(kv.tokens.data + kv.pos, tokens, (size_t)n * 4);
    kv.pos += n;
    return Status::ok;
}

// Per layer: attn_norm, qkv, rope_kv, attention, [att_out], wo (+= x), ffn_norm, router (+ route),
// expert_up, expert_down (+= x). Norms run where end_phase_then_norm() puts them.
inline void SessionImpl::forward_thread(const ForwardCall& c, int ith, int nth) {
    const ModelImpl& m = *model;
    const int32_t n = c.n;
    const int64_t n_embd = plan->n_embd;
    {
        int64_t t0, t1;
        split_range(n, ith, nth, &t0, &t1);
        for (int64_t t = t0; t < t1; ++t) {
            m.token_embd.qt->dequantize_ref(m.token_embd.row(0, c.tokens[t]), a.x.data + t * n_embd, n_embd);
            if (m.token_embd.scaled())
                for (int64_t i = 0; i < n_embd; ++i) a.x[(size_t)(t * n_embd + i)] *= m.token_embd.scale(0);
            m.rope.angles(pos_of(c, (int32_t)t), a.rope_cs.data + t * hp->n_rot);
            if (!m.rope_swa.inv_freq.empty()) m.rope_swa.angles(pos_of(c, (int32_t)t), a.rope_cs_swa.data + t * hp->n_rot);
        }
    }
    end_phase(ith, nth, PhaseProfile::embed);
    // The first norm has a phase of its own whatever the chunk size: nothing before it is a matmul.
    norm_rows(norm_before_layer(c, 0), ith, nth);
    end_phase(ith, nth, norm_before_layer(c, 0).phase);
    for (int il = 0; il < hp->n_layer; ++il) {
        const LayerWeights& l = m.layers[(size_t)il];
        const LayerFormats& f = formats(il);
        const bool gated = hp->attn_output_gate;  // attn_q holds [query, gate] per head: rope_phase splits them
        const MatTask qkv[3] = {
            {&l.wq, 0, &a.act_x, gated ? a.q_gate.data : a.q.data, gated ? 2 * plan->q_dim : plan->q_dim, l.bq.empty() ? nullptr : l.bq.data(), false},
            {&l.wk, 0, &a.act_x, a.k.data, plan->kv_dim, l.bk.empty() ? nullptr : l.bk.data(), false},
            {&l.wv, 0, &a.act_x, a.v.data, plan->kv_dim, l.bv.empty() ? nullptr : l.bv.data(), false}};
        if (observer) observe(il, MatInput::attn_in, n, ith, nth);
        if (l.recr_index >= 0) {  // a gated delta-net layer in place of attention
            const int64_t HV = hp->ssm_v_heads;
            const MatTask in_proj[4] = {{&l.ssm_qkv, 0, &a.act_x, a.ssm_qkv.data, plan->ssm_ch, nullptr, false},
                                        {&l.ssm_z, 0, &a.act_x, a.ssm_z.data, plan->ssm_v, nullptr, false},
                                        {l.ssm_ba ? &l.ssm_ba : &l.ssm_beta, 0, &a.act_x, a.ssm_ba.data, 2 * HV, nullptr, false},
                                        {&l.ssm_alpha, 0, &a.act_x, a.ssm_ba.data + HV, 2 * HV, nullptr, false}};
            matmul_phase(in_proj, l.ssm_ba ? 3 : 4, 0, n, ith);
            end_phase(ith, nth, PhaseProfile::qkv);
            delta_conv_phase(c, il, ith, nth);
            end_phase(ith, nth, PhaseProfile::rope_kv);
            delta_rule_phase(c, il, ith, nth);
            end_phase(ith, nth, PhaseProfile::attention);
            quantize_phase(&a.act_ssm, n, (uint8_t)(f.att_out | gemm_fmts(f.att_out)), ith, nth);
            end_phase(ith, nth, PhaseProfile::att_out);
            if (observer) observe(il, MatInput::attn_out, n, ith, nth);
            const MatTask out_proj{&l.ssm_out, 0, &a.act_ssm, a.x.data, n_embd, nullptr, true};
            const NormStep delta_ffn_norm{l.ffn_norm.data(), 0, n, (uint8_t)(f.ffn_in | gemm_fmts(f.ffn_in)), PhaseProfile::ffn_norm};
            end_phase_then_norm(delta_ffn_norm, matmul_phase(&out_proj, 1, 0, n, ith), c, ith, nth, PhaseProfile::wo);
        } else if (l.conv_index >= 0) {  // a short-convolution layer in place of attention
            const MatTask in_proj{&l.conv_in, 0, &a.act_x, a.conv_bcx.data, 3 * n_embd, nullptr, false};
            matmul_phase(&in_proj, 1, 0, n, ith);
            end_phase(ith, nth, PhaseProfile::qkv);
            conv_phase(c, il, (uint8_t)(f.att_out | gemm_fmts(f.att_out)), ith, nth);
            end_phase(ith, nth, PhaseProfile::attention);
            const MatTask out_proj{&l.conv_out, 0, &a.act_conv, a.x.data, n_embd, nullptr, true};
            const NormStep conv_ffn_norm{l.ffn_norm.data(), 0, n, (uint8_t)(f.ffn_in | gemm_fmts(f.ffn_in)), PhaseProfile::ffn_norm};
            end_phase_then_norm(conv_ffn_norm, matmul_phase(&out_proj, 1, 0, n, ith), c, ith, nth, PhaseProfile::wo);
        } else {
        if (m.mla) {
            mla_qkv(c, il, ith, nth);
        } else {
            matmul_phase(qkv, 3, 0, n, ith);
            end_phase(ith, nth, PhaseProfile::qkv);
            rope_phase(c, il, ith, nth);
            end_phase(ith, nth, PhaseProfile::rope_kv);
        }
        attention_phase(c, il, ith);
        end_phase(ith, nth, PhaseProfile::attention);
        const uint8_t att_fmts = f.att_out | gemm_fmts(f.att_out);
        if (m.mla) {
            mla_values_phase(c, il, att_fmts, ith, nth);
            end_phase(ith, nth, PhaseProfile::att_out);
        } else if (c.att_split > 1 || (att_fmts & ~fmt_bit(ActFormat::f32)) || gated) {
            att_out_phase(c, il, att_fmts, ith, nth);
            end_phase(ith, nth, PhaseProfile::att_out);
        }
        if (observer) observe(il, MatInput::attn_out, n, ith, nth);
        const MatTask wo{&l.wo, 0, &a.act_att, a.x.data, n_embd, l.bo.empty() ? nullptr : l.bo.data(), true};
        const NormStep ffn_norm{l.ffn_norm.data(), 0, n, (uint8_t)(f.ffn_in | gemm_fmts(f.ffn_in)), PhaseProfile::ffn_norm};
        end_phase_then_norm(ffn_norm, matmul_phase(&wo, 1, 0, n, ith), c, ith, nth, PhaseProfile::wo);
        }
        if (observer) observe(il, MatInput::ffn_in, n, ith, nth);
        if (l.moe()) {
            const MatTask router{&l.router, 0, &a.act_x, a.router_logits.data, hp->n_expert, nullptr, false};
            if (matmul_phase(&router, 1, 0, n, ith)) route(il, n);
            end_phase(ith, nth, PhaseProfile::router);
            if (r.shared_first) {  // prediction from the residual stream with the shared expert's output
                expert_up_phase(n, ith, true);
                end_phase(ith, nth, PhaseProfile::expert_up);
                if (shared_down_phase(n)) predict_after_shared(il, n);
                end_phase(ith, nth, PhaseProfile::expert_down);
            }
        } else {
            if (ith == 0) route(il, n);
            end_phase(ith, nth, PhaseProfile::route);
        }
        expert_up_phase(n, ith);  // also quantizes each expert's hidden rows once they are complete
        end_phase(ith, nth, PhaseProfile::expert_up);
        if (observer) observe(il, MatInput::expert_hidden, n, ith, nth);
        if (ith == 0) stop_layers = cancel_requested.load(std::memory_order_relaxed);
        end_phase_then_norm(norm_before_layer(c, il + 1), expert_down_phase(n, ith), c, ith, nth, PhaseProfile::expert_down);
        if (stop_layers) return;  // Session::cancel: every thread saw thread 0's value after the barrier
    }
    // Output head: every row when all logits are wanted, else the last only.
    const MatTask head{&m.output, 0, &a.act_x, a.logits_batch.data, hp->n_vocab, nullptr, false};
    matmul_phase(&head, 1, c.first_logit, n - c.first_logit, ith);
    end_phase(ith, nth, PhaseProfile::head);
}

// SessionOptions::observe_inputs: thread 0 shows the complete rows, between two barriers.
// expert_hidden covers every FFN of the layer (routed, shared, dense) and, first, each routed
// expert's input rows (expert_in, from the same routing).
inline void SessionImpl::observe(int il, MatInput what, int32_t n, int ith, int nth) {
    pool.barrier(ith, nth);
    if (ith == 0) {
        const int64_t n_embd = plan->n_embd;
        if (what == MatInput::attn_in || what == MatInput::ffn_in)
            for (int32_t t = 0; t < n; ++t) observer(observer_user, il, what, -1, a.xb.data + t * n_embd, n_embd);
        else if (what == MatInput::attn_out) {  // attn_output's input, or a delta-net layer's ssm_out's
            const ActRows& rows = model->layers[(size_t)il].recr_index >= 0 ? a.act_ssm : a.act_att;
            for (int32_t t = 0; t < n; ++t) observer(observer_user, il, what, -1, rows.src + t * rows.width, rows.width);
        }
        else {
            const LayerWeights& l = model->layers[(size_t)il];
            for (const ActiveExpert& e : r.active)
                for (int32_t j = e.use_begin; j < e.use_end; ++j) {
                    const ExpertUse& use = r.uses[(size_t)j];
                    const bool routed = e.expert >= 0;
                    if (routed) observer(observer_user, il, MatInput::expert_in, e.expert, a.xb.data + use.token * n_embd, n_embd);
                    const MatInput kind = routed ? MatInput::expert_hidden : e.down == &l.down_shexp ? MatInput::shared_hidden : MatInput::dense_hidden;
                    observer(observer_user, il, kind, e.expert,
                             a.hidden.data + (use.token * plan->slots + use.slot) * plan->max_ff, e.down->cols);
                }
        }
    }
    pool.barrier(ith, nth);
}

// The norm in front of layer il: its attn_norm, or after the last layer the output norm of the rows
// the head will read.
inline NormStep SessionImpl::norm_before_layer(const ForwardCall& c, int il) const {
    if (il < hp->n_layer)
        return {model->layers[(size_t)il].attn_norm.data(), 0, c.n, (uint8_t)(formats(il).attn_in | gemm_fmts(formats(il).attn_in)), PhaseProfile::attn_norm};
    return {model->output_norm.data(), c.first_logit, c.n - c.first_logit, (uint8_t)(plan->output_formats[float_activations] | gemm_fmts(plan->output_formats[float_activations])),
            PhaseProfile::out_norm};
}

// Where a norm runs (the one decision for all of them): for a few tokens (decode), the one thread
// that finished the matmul before it (`finisher`) runs it alone before the barrier, saving a
// barrier; for more tokens every thread takes a share in a phase of its own.
inline void SessionImpl::end_phase_then_norm(const NormStep& step, bool finisher, const ForwardCall& c, int ith, int nth,
                                             PhaseProfile::Phase ph) {
    if (c.serial_norms && finisher) norm_rows(step, 0, 1);
    end_phase(ith, nth, ph);
    if (!c.serial_norms) {
        norm_rows(step, ith, nth);
        end_phase(ith, nth, step.phase);
    }
}

// This thread's share of a norm step. Units are (token, span); every unit recomputes its row's
// scale, which is cheaper than a barrier.
inline void SessionImpl::norm_rows(const NormStep& step, int ith, int nth) {
    const int64_t n_embd = plan->n_embd;
    const int64_t span = n_embd % 256 == 0 ? 256 : std::max<int64_t>(act_block(step.fmts), n_embd % kQK == 0 ? kQK : n_embd);
    const int64_t spans = n_embd / span;
    int64_t u0, u1;
    split_range((int64_t)step.n * spans, ith, nth, &u0, &u1);
    int64_t row = -1;
    float scale = 0;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = step.t0 + u / spans, i0 = (u % spans) * span;
        const float* xt = a.x.data + t * n_embd;
        if (t != row) { scale = rms_scale(xt, n_embd, hp->rms_eps); row = t; }
        float* o = a.xb.data + t * n_embd;
        for (int64_t i = i0; i < i0 + span; ++i) o[i] = xt[i] * scale * step.weight[i];
        a.act_x.quantize(step.fmts, t, i0, span);
    }
}

// Returns true on the one thread that finished the phase's last rows. Work units are rows, or
// tiles of kGemmRows rows for a matrix that runs as panels.
inline bool SessionImpl::matmul_phase(const MatTask* tasks, int n_tasks, int32_t t0, int32_t n, int ith) {
    auto units = [&](const MatTask& mt) { return panels_for(*mt.w, n) ? (mt.w->rows + kGemmRows - 1) / kGemmRows : mt.w->rows; };
    int64_t total = 0;
    for (int i = 0; i < n_tasks; ++i) total += units(tasks[i]);
    int64_t begin = 0, end = 0;
    bool last = false;
    for (; next_rows(total, n, &begin, &end); last = rows_done.finish(end - begin, total)) {
        int i = 0;
        int64_t base = 0;
        while (begin >= base + units(tasks[i])) base += units(tasks[i++]);
        for (int64_t vu = begin; vu < end; ++vu) {
            if (vu >= base + units(tasks[i])) base += units(tasks[i++]);
            const MatTask& mt = tasks[i];
            if (panels_for(*mt.w, n)) {
                matmul_tile(mt, (vu - base) * kGemmRows, t0, n, ith);
                continue;
            }
            const int64_t row = vu - base;
            const RowKernel& k = kt(*mt.w);
            const uint8_t* wrow = mt.w->row(mt.mat, row);
            if (prefetch_bytes) prefetch_ahead(wrow, mt.w->row_bytes);
            const float bias = mt.bias ? mt.bias[row] : 0.f;
            for (int32_t t = t0; t < t0 + n; ++t) {
                float val = k.vec_dot(wrow, mt.in->row(k.act, t), mt.w->cols);
                if (mt.w->scaled()) val *= mt.w->scale(mt.mat);
                val += bias;
                float& o = mt.out[(t - t0) * mt.out_stride + row];
                o = mt.accumulate ? o + val : val;
            }
        }
    }
    return last;
}

// Rows [row0, row0 + kGemmRows) of one matrix of a matmul phase as a panel, for tokens t0 .. t0 + n.
inline void SessionImpl::matmul_tile(const MatTask& mt, int64_t row0, int32_t t0, int32_t n, int ith) {
    const RowKernel& k = kt(*mt.w);
    GemmScratch& s = gemm_scratch[2 * (size_t)ith];
    const int rows = (int)std::min<int64_t>(kGemmRows, mt.w->rows - row0);
    gemm_pack(k.gemm, mt.w->row(mt.mat, row0), mt.w->row_bytes, rows, mt.w->cols, &s);
    const float scale = mt.w->scaled() ? mt.w->scale(mt.mat) : 1.f;
    const BlockQ8G* x[kGemmTokens];
    alignas(64) float out[kGemmTokens * kGemmRows];
    for (int32_t t = t0; t < t0 + n; t += kGemmTokens) {
        const int nt = std::min<int>(kGemmTokens, t0 + n - t);
        for (int j = 0; j < nt; ++j) x[j] = static_cast<const BlockQ8G*>(mt.in->row(k.gemm_act, t + j));
        k.gemm_tile(s.panel, x, nt, out);
        for (int j = 0; j < nt; ++j) {
            float* o = mt.out + (t + j - t0) * mt.out_stride + row0;
            for (int r = 0; r < rows; ++r) {
                float val = out[j * kGemmRows + r];
                if (mt.w->scaled()) val *= scale;
                if (mt.bias) val += mt.bias[row0 + r];
                o[r] = mt.accumulate ? o[r] + val : val;
            }
        }
    }
}

// The short convolution of a chunk. Units are spans of channels over all the chunk's tokens, in
// token order: store the token's b * x in the ring, convolve its window (positions before 0 are
// zeros), gate with c, quantize the span for out_proj.
inline void SessionImpl::conv_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int64_t E = plan->n_embd, LC = hp->shortconv_l_cache;
    const int64_t span = E % 256 == 0 ? 256 : std::max<int64_t>(act_block(fmts), E % kQK == 0 ? kQK : E);
    int64_t s0, s1;
    split_range(E / span, ith, nth, &s0, &s1);
    for (int64_t sp = s0; sp < s1; ++sp) {
        const int64_t ch0 = sp * span, ch1 = ch0 + span;
        for (int32_t t = 0; t < c.n; ++t) {  // in order: the ring may be shorter than the chunk
            KvCache& cache = kv_of(c, t);
            const int32_t pos = pos_of(c, t);
            const float* bcx = a.conv_bcx.data + (int64_t)t * 3 * E;
            float* in_now = cache.conv_row(l.conv_index, pos);
            for (int64_t ch = ch0; ch < ch1; ++ch) in_now[ch] = bcx[ch] * bcx[2 * E + ch];
            const float* gate_c = bcx + E;
            float* y = a.conv_y.data + (int64_t)t * E;
            for (int64_t ch = ch0; ch < ch1; ++ch) y[ch] = 0;
            for (int64_t k = 0; k < LC; ++k) {  // tap k reads position pos - (LC - 1) + k
                const int32_t p = pos - (int32_t)(LC - 1) + (int32_t)k;
                if (p < 0) continue;
                const float* in = cache.conv_row(l.conv_index, p);
                for (int64_t ch = ch0; ch < ch1; ++ch) y[ch] += in[ch] * l.conv_kernel[(size_t)(ch * LC + k)];
            }
            for (int64_t ch = ch0; ch < ch1; ++ch) y[ch] *= gate_c[ch];
            a.act_conv.quantize(fmts, t, ch0, span);
        }
    }
}

// Gated delta net, step 1: the causal depthwise convolution of the raw q, k, v channels over the
// token and the kernel - 1 positions before it (the state; zeros before position 0), then silu.
// Threads take ranges of channels and walk the chunk's tokens in order.
inline void SessionImpl::delta_conv_phase(const ForwardCall& c, int il, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int64_t CH = plan->ssm_ch, KC = hp->ssm_conv_kernel;
    int64_t ch0, ch1;
    split_range(CH, ith, nth, &ch0, &ch1);
    for (int32_t t = 0; t < c.n; ++t) {
        float* window = kv_of(c, t).recr_layer(l.recr_index);  // (KC - 1, CH), oldest first
        if (pos_of(c, t) == 0)
            for (int64_t k = 0; k < KC - 1; ++k) std::fill(window + k * CH + ch0, window + k * CH + ch1, 0.f);
        const float* in = a.ssm_qkv.data + (int64_t)t * CH;
        float* out = a.ssm_conv.data + (int64_t)t * CH;
        for (int64_t ch = ch0; ch < ch1; ++ch) {
            const float* w = l.ssm_conv1d.data() + ch * KC;
            float acc = 0;
            for (int64_t k = 0; k < KC - 1; ++k) acc += w[k] * window[k * CH + ch];
            acc += w[KC - 1] * in[ch];
            for (int64_t k = 0; k + 1 < KC - 1; ++k) window[k * CH + ch] = window[(k + 1) * CH + ch];
            window[(KC - 2) * CH + ch] = in[ch];
            out[ch] = silu(acc);
        }
    }
}

// Gated delta net, step 2, per v head h (reading q/k head h % k_heads, or h / (v_heads / k_heads)
// with grouped heads) and token in order:
//   q, k l2-normalised; beta = sigmoid(b); g = exp(softplus(alpha + dt_bias) * ssm_a);
//   S = g S + k d^T with d = beta (v - g S^T k); o = S^T q / sqrt(state);
//   out = rmsnorm(o) * ssm_norm * silu(z).
// S (key dim i, value dim j, row-major) is the largest state in the model (a v head's is 64 KiB at
// state 128), so each token streams it once: the head keeps S before the last token's update plus
// that update (its k, d and g); a token first applies the pending update row by row while forming
// S^T k and S^T q from the updated rows, then o = g S^T q + (k . q) d and its own update waits for
// the next token. Per head: S (state^2), pending k, pending d (state each), pending g.
// A unit is a head over the chunk's tokens, or one (token, head) when the tokens are separate
// sequences (eval_batch).
inline void SessionImpl::delta_rule_phase(const ForwardCall& c, int il, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int64_t DS = hp->ssm_state, HK = hp->ssm_k_heads, HV = hp->ssm_v_heads, CH = plan->ssm_ch, VD = plan->ssm_v;
    const int64_t state_at = (hp->ssm_conv_kernel - 1) * CH;  // the heads follow the conv window
    const int32_t tokens_per_unit = c.seq_kv ? 1 : c.n;
    const float eps = hp->rms_eps, q_scale = 1.f / std::sqrt((float)DS);
    float* __restrict q = a.ssm_scratch.data + (size_t)ith * 4 * (size_t)DS;
    float* __restrict k = q + DS;
    float* __restrict sk = k + DS;  // S^T k
    float* __restrict sq = sk + DS; // S^T q
    auto l2_normed = [&](float* out, const float* x) {  // x / sqrt(sum x^2 + eps), as llama.cpp's rms_norm(x, eps / n) / sqrt(n)
        const float scale = rms_scale(x, DS, eps / (float)DS) / std::sqrt((float)DS);
        for (int64_t i = 0; i < DS; ++i) out[i] = x[i] * scale;
    };
    int64_t u0, u1;
    split_range(HV * (c.n / tokens_per_unit), ith, nth, &u0, &u1);
    const int64_t per_k = HV / HK;  // v heads per q/k head
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t hv = u % HV, hk = model->ssm_grouped ? hv / per_k : hv % HK;
        // beta and alpha of this head: [beta (HV) | alpha (HV)], or per q/k head [beta (per_k) | alpha (per_k)]
        const int64_t beta_at = model->ssm_grouped ? hk * 2 * per_k + hv % per_k : hv;
        const int64_t alpha_at = model->ssm_grouped ? beta_at + per_k : HV + hv;
        const int32_t t_first = (int32_t)(u / HV) * tokens_per_unit;
        for (int32_t t = t_first; t < t_first + tokens_per_unit; ++t) {
            float* __restrict S = kv_of(c, t).recr_layer(l.recr_index) + state_at + hv * plan->ssm_head;
            float* __restrict pk = S + DS * DS;  // the pending update: S = pg S + pk pd^T
            float* __restrict pd = pk + DS;
            float& pg = pd[DS];
            if (pos_of(c, t) == 0) {  // a fresh sequence: S = 0, nothing pending
                std::fill(S, S + plan->ssm_head, 0.f);
                pg = 1.f;
            }
            const float* conv = a.ssm_conv.data + (int64_t)t * CH;
            l2_normed(q, conv + hk * DS);
            l2_normed(k, conv + (HK + hk) * DS);
            const float* v = conv + 2 * HK * DS + hv * DS;
            const float* ba = a.ssm_ba.data + (int64_t)t * 2 * HV;
            const float beta = 1.f / (1.f + std::exp(-ba[beta_at]));
            const float dt = ba[alpha_at] + l.ssm_dt[(size_t)hv];
            const float g = std::exp((dt > 20.f ? dt : std::log(1.f + std::exp(dt))) * l.ssm_a[(size_t)hv]);
            std::fill(sk, sk + DS, 0.f);
            std::fill(sq, sq + DS, 0.f);
            const float gp = pg;
            for (int64_t i = 0; i < DS; ++i) {
                float* __restrict row = S + i * DS;
                const float ki = k[i], qi = q[i], pki = pk[i];
                for (int64_t j = 0; j < DS; ++j) {
                    const float sij = gp * row[j] + pki * pd[j];
                    row[j] = sij;
                    sk[j] += sij * ki;
                    sq[j] += sij * qi;
                }
            }
            float kq = 0;
            for (int64_t i = 0; i < DS; ++i) kq += k[i] * q[i];
            float* __restrict o = a.ssm_o.data + (int64_t)t * VD + hv * DS;
            for (int64_t j = 0; j < DS; ++j) {
                const float d = beta * (v[j] - g * sk[j]);
                o[j] = (g * sq[j] + kq * d) * q_scale;
                pd[j] = d;
            }
            std::memcpy(pk, k, (size_t)DS * 4);
            pg = g;
            const float norm = rms_scale(o, DS, eps);
            const float* z = a.ssm_z.data + (int64_t)t * VD + hv * DS;
            for (int64_t j = 0; j < DS; ++j) o[j] = o[j] * norm * l.ssm_norm[(size_t)j] * silu(z[j]);
        }
    }
}

// Quantizes rows [0, n) of `rows` to fmts; units are (token, span of whole activation blocks).
inline void SessionImpl::quantize_phase(ActRows* rows, int32_t n, uint8_t fmts, int ith, int nth) {
    const int64_t W = rows->width;
    const int64_t span = W % 256 == 0 ? 256 : std::max<int64_t>(act_block(fmts), W % kQK == 0 ? kQK : W);
    const int64_t spans = W / span;
    int64_t u0, u1;
    split_range((int64_t)n * spans, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) rows->quantize(fmts, u / spans, (u % spans) * span, span);
}

// Multi-head latent attention, the absorbed form (llama.cpp's for MLA files): the queries (through
// the q LoRA bottleneck where the file has one) and the latent + rope key, then mla_rope_phase.
inline void SessionImpl::mla_qkv(const ForwardCall& c, int il, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int32_t n = c.n;
    const int64_t q_proj_dim = (int64_t)hp->n_head * hp->head_dim;
    const MatTask first[2] = {
        {l.wq_a ? &l.wq_a : &l.wq, 0, &a.act_x, l.wq_a ? a.q_lora.data : a.q_proj.data, l.wq_a ? hp->q_lora_rank : q_proj_dim, nullptr, false},
        {&l.wkv_a, 0, &a.act_x, a.k.data, plan->kv_dim, nullptr, false}};
    matmul_phase(first, 2, 0, n, ith);
    end_phase(ith, nth, PhaseProfile::qkv);
    if (l.wq_a) {
        const uint8_t fmts = (uint8_t)(formats(il).q_b_in | gemm_fmts(formats(il).q_b_in));
        int64_t t0, t1;
        split_range(n, ith, nth, &t0, &t1);
        for (int64_t t = t0; t < t1; ++t) {
            float* row = a.q_lora.data + t * hp->q_lora_rank;
            rms_norm(row, row, l.q_a_norm.data(), hp->q_lora_rank, hp->rms_eps);
            a.act_q_lora.quantize(fmts, t, 0, hp->q_lora_rank);
        }
        end_phase(ith, nth, PhaseProfile::qkv);
        const MatTask qb{&l.wq_b, 0, &a.act_q_lora, a.q_proj.data, q_proj_dim, nullptr, false};
        matmul_phase(&qb, 1, 0, n, ith);
        end_phase(ith, nth, PhaseProfile::qkv);
    }
    mla_rope_phase(c, il, ith, nth);
    end_phase(ith, nth, PhaseProfile::rope_kv);
}

// Units (token, head) and (token, latent): a head's query becomes [wk_b . q_nope, rope(q_rope)]
// in the latent space; the latent (normed) and rope(k_rope) become the token's one cache row.
inline void SessionImpl::mla_rope_phase(const ForwardCall& c, int il, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int n_head = hp->n_head, rope_dims = hp->n_rot, nope = hp->head_dim - rope_dims, lora = hp->kv_lora_rank;
    const int64_t att_k = plan->att_k, per_token = n_head + 1;
    int64_t u0, u1;
    split_range((int64_t)c.n * per_token, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
        const int32_t t = (int32_t)(u / per_token);
        const int unit = (int)(u % per_token);
        const float* cs = a.rope_cs.data + (int64_t)t * hp->n_rot;
        if (unit == n_head) {
            float* kv_row = a.k.data + t * plan->kv_dim;  // [latent | k_rope]
            rms_norm(kv_row, kv_row, l.kv_a_norm.data(), lora, hp->rms_eps);
            rope(kv_row + lora, cs, rope_dims, hp->rope_neox);
            KvCache& cache = kv_of(c, t);
            uint8_t* dst = cache.k.data + cache.offset(il, pos_of(c, t));
            if (cache.q8) quantize_row_q8_0_ref(reinterpret_cast<BlockQ8_0*>(dst), kv_row, att_k);
            else std::memcpy(dst, kv_row, (size_t)att_k * 4);
            continue;
        }
        const float* qh = a.q_proj.data + ((int64_t)t * n_head + unit) * hp->head_dim;  // [q_nope | q_rope]
        float* out = a.q.data + t * plan->q_dim + (int64_t)unit * att_k;
        // As llama.cpp's mul_mat: q_nope in wk_b's activation format (Q8_0 for Q8_0 weights).
        const RowKernel& kb = kt(l.wk_b);
        const void* q_in = qh;
        if (kb.act != ActFormat::f32) {
            void* scratch = a.mla_act.data + (size_t)ith * a.mla_act_stride;
            quantize_act(kb.act, scratch, qh, nope);
            q_in = scratch;
        }
        const float kb_scale = l.wk_b.scaled() ? l.wk_b.scale(unit) : 1.f;
        for (int r = 0; r < lora; ++r) out[r] = kb.vec_dot(l.wk_b.row(unit, r), q_in, nope) * kb_scale;
        std::memcpy(out + lora, qh + nope, (size_t)rope_dims * 4);
        rope(out + lora, cs, rope_dims, hp->rope_neox);
    }
}

// Units (token, group of heads whose values fill whole activation blocks): merges the KV splits of
// each head's attended latent, turns it into the head's value (wv_b), quantizes for attn_output.
inline void SessionImpl::mla_values_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth) {
    const LayerWeights& l = model->layers[(size_t)il];
    const int S = c.att_split, n_head = hp->n_head, hv = (int)plan->att_v, vd = hp->value_dim;
    int heads = 1;
    while (heads < n_head && ((int64_t)heads * vd % act_block(fmts) || n_head % heads)) ++heads;
    const int64_t groups = n_head / heads;
    int64_t u0, u1;
    split_range((int64_t)c.n * groups, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = u / groups;
        const int h0 = (int)(u % groups) * heads;
        for (int h = h0; h < h0 + heads; ++h) {
            float* lat = a.att_out.data + t * plan->att_dim + (int64_t)h * hv;
            if (S > 1) {
                const float* p = a.att_part.data + ((size_t)t * (size_t)n_head + (size_t)h) * (size_t)S * (size_t)(hv + 2);
                float m = -INFINITY, den = 0;
                for (int sp = 0; sp < S; ++sp) m = std::max(m, p[(size_t)sp * (hv + 2)]);
                std::fill(lat, lat + hv, 0.f);
                for (int sp = 0; sp < S; ++sp) {
                    const float* ps = p + (size_t)sp * (hv + 2);
                    const float w = std::exp(ps[0] - m);
                    den += w * ps[1];
                    for (int i = 0; i < hv; ++i) lat[i] += w * ps[2 + i];
                }
                for (int i = 0; i < hv; ++i) lat[i] /= den;
            }
            float* val = a.att_wo.data + t * plan->wo_dim + (int64_t)h * vd;
            const RowKernel& kv = kt(l.wv_b);
            const void* lat_in = lat;
            if (kv.act != ActFormat::f32) {
                void* scratch = a.mla_act.data + (size_t)ith * a.mla_act_stride;
                quantize_act(kv.act, scratch, lat, hv);
                lat_in = scratch;
            }
            const float vb_scale = l.wv_b.scaled() ? l.wv_b.scale(h) : 1.f;
            for (int r = 0; r < vd; ++r) val[r] = kv.vec_dot(l.wv_b.row(h, r), lat_in, hv) * vb_scale;
        }
        a.act_att.quantize(fmts, t, (int64_t)h0 * vd, (int64_t)heads * vd);
    }
}

// QK-norm, RoPE and the KV store; units are (token, head) (or one per token for a whole-projection
// QK-norm, which needs the whole row).
inline void SessionImpl::rope_phase(const ForwardCall& c, int il, int ith, int nth) {
    const int32_t n = c.n;
    const ModelImpl& m = *model;
    const LayerWeights& l = m.layers[(size_t)il];
    const int hd = hp->head_dim, n_head = hp->n_head, n_kv = hp->n_head_kv;
    const int64_t q_dim = plan->q_dim, kv_dim = plan->kv_dim;
    const bool whole = m.qk_norm == QkNorm::whole, per_head = m.qk_norm == QkNorm::per_head && !l.q_norm.empty();
    const int per_token = whole ? 1 : n_head + n_kv;
    int64_t u0, u1;
    split_range((int64_t)n * per_token, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
        const int32_t t = (int32_t)(u / per_token);
        const int unit = (int)(u % per_token);
        const float* cs = (l.swa && !m.rope_swa.inv_freq.empty() ? a.rope_cs_swa.data : a.rope_cs.data) + (int64_t)t * hp->n_rot;
        float* qt = a.q.data + t * q_dim;
        float* kt_ = a.k.data + t * kv_dim;
        KvCache& cache = kv_of(c, t);
        const size_t cache_row = cache.offset(il, pos_of(c, t));
        int h0 = 0, h1 = n_head, g0 = 0, g1 = n_kv;  // query heads and KV heads of this unit
        if (!whole && unit < n_head) {
            h0 = unit; h1 = unit + 1; g0 = g1 = 0;
        } else if (!whole) {
            h0 = h1 = 0; g0 = unit - n_head; g1 = g0 + 1;
        }
        if (hp->attn_output_gate)  // the query part of each head's [query, gate] rows
            for (int h = h0; h < h1; ++h) std::memcpy(qt + h * hd, a.q_gate.data + t * 2 * q_dim + (int64_t)h * 2 * hd, (size_t)hd * 4);
        if (whole) {
            rms_norm(qt, qt, l.q_norm.data(), q_dim, hp->rms_eps);
            rms_norm(kt_, kt_, l.k_norm.data(), kv_dim, hp->rms_eps);
        }
        for (int h = h0; h < h1; ++h) {
            if (per_head) rms_norm(qt + h * hd, qt + h * hd, l.q_norm.data(), hd, hp->rms_eps);
            rope(qt + h * hd, cs, hp->n_rot, hp->rope_neox);
        }
        for (int h = g0; h < g1; ++h) {
            if (per_head) rms_norm(kt_ + h * hd, kt_ + h * hd, l.k_norm.data(), hd, hp->rms_eps);
            rope(kt_ + h * hd, cs, hp->n_rot, hp->rope_neox);
            if (cache.q8) {
                const size_t at = cache_row + (size_t)(h * hd / kQK) * sizeof(BlockQ8_0);
                quantize_row_q8_0_ref(reinterpret_cast<BlockQ8_0*>(cache.k.data + at), kt_ + h * hd, hd);
                quantize_row_q8_0_ref(reinterpret_cast<BlockQ8_0*>(cache.v.data + at), a.v.data + t * kv_dim + h * hd, hd);
            } else {
                std::memcpy(cache.k.data + cache_row + (size_t)h * hd * 4, kt_ + h * hd, (size_t)hd * 4);
                std::memcpy(cache.v.data + cache_row + (size_t)h * hd * 4, a.v.data + t * kv_dim + h * hd, (size_t)hd * 4);
            }
        }
    }
}

// Causal GQA attention. A unit is (tokens, KV head, head subgroup, KV split): it scores each cached
// key once for all query heads of its subgroup, with an online softmax over blocks of kAttBlock
// positions. Subgroups and splits exist only when there are fewer (token, KV head) pairs than
// threads. In a chunk of one sequence without splits a unit takes kAttTokens consecutive tokens,
// which share their cache: each key and value row is read once for all of them (prefill would
// otherwise stream the cache from L2/L3 once per token). Each token's arithmetic is the same as
// when it is alone in its unit.
inline void SessionImpl::attention_phase(const ForwardCall& c, int il, int ith) {
    const int hk = (int)plan->att_k, hv = (int)plan->att_v, n_kv = hp->n_head_kv, S = c.att_split, G = c.att_groups, group = plan->group, gsize = group / G;
    const LayerWeights& l = model->layers[(size_t)il];
    const int32_t window = l.swa ? hp->sliding_window : 0;
    const float* sinks = l.sinks.empty() ? nullptr : l.sinks.data();
    const int64_t q_dim = plan->q_dim, att_dim = plan->att_dim;
    const float scale = plan->att_scale;
    const int T = c.seq_kv || S > 1 ? 1 : kAttTokens;
    float* sc = a.att_scratch.data + (size_t)ith * a.att_scratch_stride;  // (T, group, kAttBlock)
    float* acc = sc + T * group * kAttBlock;                                // (T, group, hv)
    float* mx = acc + T * group * hv;                                       // (T, group)
    float* sum = mx + T * group;                                            // (T, group)
    const int nbh = hk / kQK;  // Q8_0 blocks per key head (Q8_0 cache only)
    BlockQ8_0* q8_queries = reinterpret_cast<BlockQ8_0*>(sum + T * group);  // (T, group, nbh)
    float* v_row = sum + T * group + ((size_t)T * group * nbh * sizeof(BlockQ8_0) + 3) / 4;  // (hv)
    const int64_t units = ((int64_t)c.n + T - 1) / T * n_kv * G * S;
    for (;;) {
        const int64_t u = pool.grab(1);
        if (u >= units) break;
        const int32_t t0 = (int32_t)(u / ((int64_t)n_kv * G * S)) * T, nt = std::min<int32_t>(T, c.n - t0);
        const int kvh = (int)(u / ((int64_t)G * S) % n_kv), sub = (int)(u / S % G), split = (int)(u % S);
        const KvCache& cache = kv_of(c, t0);  // shared by the unit's tokens (T > 1 only without seq_kv)
        const uint8_t* kl = cache.k.data + cache.offset(il, 0);
        // Values: rows of their own, or (MLA) the first hv dims of the key rows.
        const bool v_in_k = cache.v_row_bytes == 0;
        const uint8_t* vl = v_in_k ? kl : cache.v.data + cache.v_offset(il, 0);
        const size_t rb = cache.row_bytes, vrb = v_in_k ? cache.row_bytes : cache.v_row_bytes;
        const size_t head_at = cache.q8 ? (size_t)(kvh * hk / kQK) * sizeof(BlockQ8_0) : (size_t)kvh * hk * 4;
        const size_t v_head_at = v_in_k ? head_at : cache.q8 ? (size_t)(kvh * hv / kQK) * sizeof(BlockQ8_0) : (size_t)kvh * hv * 4;
        // Token k attends positions [j0[k], j1[k]): its window (all of the cache, or the last
        // sliding_window positions), cut into S splits. Positions grow with k.
        int32_t j0[kAttTokens] = {}, j1[kAttTokens] = {};
        for (int k = 0; k < nt; ++k) {
            const int32_t len = pos_of(c, t0 + k) + 1, start = window ? std::max(0, len - window) : 0;
            j0[k] = start + (int32_t)((int64_t)(len - start) * split / S);
            j1[k] = start + (int32_t)((int64_t)(len - start) * (split + 1) / S);
        }
        const int32_t j_end = j1[nt - 1];
        const int h0 = kvh * group + sub * gsize;  // first query head of the unit
        for (int k = 0; k < nt; ++k)
            for (int g = 0; g < gsize; ++g) { mx[k * group + g] = -INFINITY; sum[k * group + g] = 0; }
        if (cache.q8)  // the unit's queries in Q8_0 (scores through the Q8_0 row kernel)
            for (int k = 0; k < nt; ++k)
                for (int g = 0; g < gsize; ++g)
                    quantize_act(ActFormat::q8_0, q8_queries + (size_t)(k * group + g) * nbh, a.q.data + (t0 + k) * q_dim + (int64_t)(h0 + g) * hk, hk);
        std::fill(acc, acc + (size_t)T * group * hv, 0.f);
        if (att_simd && !cache.q8) {  // the same steps through the attention kernels
            for (int32_t jb = j0[0]; jb < j_end; jb += kAttBlock)
                for (int k = 0; k < nt; ++k) {
                    const int nb = std::min<int32_t>(kAttBlock, j1[k] - jb), first = std::max(0, j0[k] - jb);
                    if (nb <= first) continue;
                    float* sk = sc + k * group * kAttBlock;
                    att.scores(a.q.data + (t0 + k) * q_dim + (int64_t)h0 * hk, hk, gsize, kl + (size_t)(jb + first) * rb + head_at, rb, nb - first, hk,
                               scale, sk + first, kAttBlock);
                    for (int g = 0; g < gsize; ++g) {
                        const int kg = k * group + g;
                        float* s = sc + kg * kAttBlock;
                        const float m_new = std::max(mx[kg], *std::max_element(s + first, s + nb));
                        const float corr = std::exp(mx[kg] - m_new);
                        for (int jj = first; jj < nb; ++jj) s[jj] -= m_new;
                        att.exp(s + first, nb - first);
                        float add = 0;
                        for (int jj = first; jj < nb; ++jj) add += s[jj];
                        sum[kg] = sum[kg] * corr + add;
                        mx[kg] = m_new;
                        if (corr != 1.f) for (int i = 0; i < hv; ++i) acc[kg * hv + i] *= corr;
                    }
                    att.values(sk + first, kAttBlock, gsize, vl + (size_t)(jb + first) * vrb + v_head_at, vrb, nb - first, hv, acc + k * group * hv);
                }
        } else
        for (int32_t jb = j0[0]; jb < j_end; jb += kAttBlock) {
            const int nb_max = std::min<int32_t>(kAttBlock, j_end - jb);
            for (int jj = 0; jj < nb_max; ++jj) {
                const uint8_t* kj = kl + (size_t)(jb + jj) * rb + head_at;
                for (int k = 0; k < nt; ++k) {
                    if (jb + jj >= j1[k] || jb + jj < j0[k]) continue;
                    const float* qg = a.q.data + (t0 + k) * q_dim + (int64_t)h0 * hk;
                    for (int g = 0; g < gsize; ++g)
                        sc[(k * group + g) * kAttBlock + jj] =
                            (cache.q8 ? dot_q8(kj, q8_queries + (size_t)(k * group + g) * nbh, hk) : dot_f32(qg + g * hk, kj, hk)) * scale;
                }
            }
            for (int k = 0; k < nt; ++k) {
                const int nb = std::min<int32_t>(kAttBlock, j1[k] - jb), first = std::max(0, j0[k] - jb);
                if (nb <= first) continue;
                for (int g = 0; g < gsize; ++g) {
                    const int kg = k * group + g;
                    float* s = sc + kg * kAttBlock;
                    const float m_new = std::max(mx[kg], *std::max_element(s + first, s + nb));
                    const float corr = std::exp(mx[kg] - m_new);
                    float add = 0;
                    for (int jj = first; jj < nb; ++jj) { s[jj] = std::exp(s[jj] - m_new); add += s[jj]; }
                    sum[kg] = sum[kg] * corr + add;
                    mx[kg] = m_new;
                    if (corr != 1.f) for (int i = 0; i < hv; ++i) acc[kg * hv + i] *= corr;
                }
            }
            for (int jj = 0; jj < nb_max; ++jj) {
                const float* __restrict vj = reinterpret_cast<const float*>(vl + (size_t)(jb + jj) * vrb + v_head_at);
                if (cache.q8) {
                    dequantize_row_q8_0(reinterpret_cast<const BlockQ8_0*>(vl + (size_t)(jb + jj) * vrb + v_head_at), v_row, hv);
                    vj = v_row;
                }
                for (int k = 0; k < nt; ++k) {
                    if (jb + jj >= j1[k] || jb + jj < j0[k]) continue;
                    for (int g = 0; g < gsize; ++g) {
                        float* __restrict acc_g = acc + (k * group + g) * hv;
                        const float p = sc[(k * group + g) * kAttBlock + jj];
                        for (int i = 0; i < hv; ++i) acc_g[i] += p * vj[i];
                    }
                }
            }
        }
        for (int k = 0; k < nt; ++k) {
            const int32_t t = t0 + k;
            for (int g = 0; g < gsize; ++g) {
                const int h = h0 + g, kg = k * group + g;
                if (S == 1) {
                    float* o = a.att_out.data + t * att_dim + (int64_t)h * hv;
                    float inv = 1.f / sum[kg];
                    if (sinks) {  // the sink's logit joins the softmax's denominator only
                        const float m2 = std::max(mx[kg], sinks[h]), keep = std::exp(mx[kg] - m2);
                        inv = keep / (sum[kg] * keep + std::exp(sinks[h] - m2));
                    }
                    for (int i = 0; i < hv; ++i) o[i] = acc[kg * hv + i] * inv;
                } else {
                    float* p = a.att_part.data + (((size_t)t * hp->n_head + (size_t)h) * (size_t)S + (size_t)split) * (size_t)(hv + 2);
                    p[0] = mx[kg]; p[1] = sum[kg];
                    std::memcpy(p + 2, acc + kg * hv, (size_t)hv * 4);
                }
            }
        }
    }
}

// Merges the KV splits (when att_split > 1) and quantizes att_out; units are (token, span of whole
// heads that is also a whole number of activation blocks).
inline void SessionImpl::att_out_phase(const ForwardCall& c, int il, uint8_t fmts, int ith, int nth) {
    const int hd = hp->head_dim, S = c.att_split;
    const std::vector<float>& layer_sinks = model->layers[(size_t)il].sinks;
    const float* sinks = layer_sinks.empty() ? nullptr : layer_sinks.data();
    const int64_t q_dim = plan->q_dim;
    int64_t span = hd;
    while (span % act_block(fmts)) span += hd;  // lcm(hd, block): q_dim is a multiple of both
    const int64_t spans = q_dim / span;
    int64_t u0, u1;
    split_range((int64_t)c.n * spans, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = u / spans, i0 = (u % spans) * span;
        if (S > 1) {
            for (int64_t h = i0 / hd; h < (i0 + span) / hd; ++h) {
                const float* p = a.att_part.data + ((size_t)t * (size_t)hp->n_head + (size_t)h) * (size_t)S * (size_t)(hd + 2);
                float m = sinks ? sinks[h] : -INFINITY, l = 0;
                for (int s = 0; s < S; ++s) m = std::max(m, p[(size_t)s * (hd + 2)]);
                if (sinks) l = std::exp(sinks[h] - m);  // the sink's logit joins the denominator only
                float* o = a.att_out.data + t * q_dim + h * hd;
                std::fill(o, o + hd, 0.f);
                for (int s = 0; s < S; ++s) {
                    const float* ps = p + (size_t)s * (hd + 2);
                    const float w = std::exp(ps[0] - m);
                    l += w * ps[1];
                    for (int i = 0; i < hd; ++i) o[i] += w * ps[2 + i];
                }
                const float inv = 1.f / l;
                for (int i = 0; i < hd; ++i) o[i] *= inv;
            }
        }
        if (hp->attn_output_gate)  // times sigmoid of the gate half of each head's attn_q rows
            for (int64_t h = i0 / hd; h < (i0 + span) / hd; ++h) {
                float* o = a.att_out.data + t * q_dim + h * hd;
                const float* gate = a.q_gate.data + t * 2 * q_dim + h * 2 * hd + hd;
                for (int i = 0; i < hd; ++i) o[i] *= 1.f / (1.f + std::exp(-gate[i]));
            }
        a.act_att.quantize(fmts, t, i0, span);
    }
}

// Routing for every token in a MoE layer (the gate's scores: softmax, sigmoid or the raw logits for
// softmax_weight; a selection bias and grouped top-k steer the choice only; top-k with ties to the
// lower id; weights: the chosen scores, a softmax over them, renormalised, scaled as the model says;
// the shared expert's sigmoid gate or 1). A dense layer uses slot 0 (the others kNoTarget). Then
// the uses grouped by target and each used FFN resolved into r.active, so that each expert row is
// read once per chunk.
inline void SessionImpl::route(int il, int32_t n) {
    const LayerWeights& l = model->layers[(size_t)il];
    if (store) store->release(&pins);  // the previous layer's FFN is done
    const int32_t slots = plan->slots, n_used = hp->n_expert_used, n_expert = hp->n_expert;
    const bool predicting = prediction.depth > 0 && n <= kSerialNormTokens;
    // The shared expert first when the predictor should see its output (as rows: its panels would
    // round differently from the path without prediction, and prediction never changes logits).
    r.shared_first = predicting && l.moe() && l.gate_shexp && !panels_for(l.gate_shexp, n) && !panels_for(l.up_shexp, n) &&
                     !panels_for(l.down_shexp, n);
    if (l.moe()) {
        const ExpertGating gating = hp->expert_gating;
        for (int32_t t = 0; t < n; ++t) {
            float* lg = a.router_logits.data + (int64_t)t * n_expert;
            float* sel = a.router_select.data + (int64_t)t * n_expert;
            gate_scores(l, *hp, lg, sel, &r.group_rank);
            top_experts(sel, n_expert, n_used, &r.topk);
            float* w = a.router_select.data + (int64_t)t * n_expert;  // sel is no longer needed: the weights
            for (int j = 0; j < n_used; ++j) w[j] = lg[r.topk[(size_t)j].second];
            if (gating == ExpertGating::softmax_weight) {
                const float mx = *std::max_element(w, w + n_used);
                float sum = 0;
                for (int j = 0; j < n_used; ++j) { w[j] = std::exp(w[j] - mx); sum += w[j]; }
                for (int j = 0; j < n_used; ++j) w[j] /= sum;
            }
            if (hp->expert_weights_norm) {
                float wsum = 0;
                for (int j = 0; j < n_used; ++j) wsum += w[j];
                wsum = std::max(wsum, 6.103515625e-5f);  // llama.cpp's clamp (smallest normal F16)
                for (int j = 0; j < n_used; ++j) w[j] /= wsum;
            }
            if (hp->expert_weights_scale != 1.f)
                for (int j = 0; j < n_used; ++j) w[j] *= hp->expert_weights_scale;
            for (int j = 0; j < n_used; ++j) {
                r.slot_target[(size_t)(t * slots + j)] = Routing::kFirstExpertTarget + r.topk[(size_t)j].second;
                r.slot_weight[(size_t)(t * slots + j)] = w[j];
            }
            for (int j = 0; j < n_used; ++j) r.token_experts[((size_t)t * (size_t)hp->n_layer + (size_t)il) * (size_t)n_used + (size_t)j] = r.topk[(size_t)j].second;
            if (t == n - 1)
                for (int j = 0; j < n_used; ++j) r.last_experts[(size_t)(il * n_used + j)] = r.topk[(size_t)j].second;
            for (int j = 0; j < n_used; ++j) {
                const size_t cell = (size_t)il * (size_t)n_expert + (size_t)r.topk[(size_t)j].second;
                ++stats.count[cell];
                stats.weight[cell] += r.slot_weight[(size_t)(t * slots + j)];
            }
            if (predicting) {
                score_predictions(il, t);
                if (!r.shared_first) predict(il, t, a.x.data + (int64_t)t * plan->n_embd);
            }
            if (l.gate_shexp) {
                float g = 1;
                if (!l.router_shexp.empty()) {
                    const float* xt = a.xb.data + t * plan->n_embd;
                    float dot = 0;
                    for (int64_t i = 0; i < plan->n_embd; ++i) dot += l.router_shexp[(size_t)i] * xt[i];
                    g = 1.f / (1.f + std::exp(-dot));
                }
                r.slot_target[(size_t)(t * slots + n_used)] = Routing::kSharedTarget;
                r.slot_weight[(size_t)(t * slots + n_used)] = g;
            }
        }
        if (il == hp->n_layer_dense_lead) stats.tokens += (uint64_t)n;
    } else {
        for (int32_t t = 0; t < n; ++t)
            for (int32_t sl = 0; sl < slots; ++sl) {
                r.slot_target[(size_t)(t * slots + sl)] = sl == 0 ? Routing::kDenseTarget : Routing::kNoTarget;
                r.slot_weight[(size_t)(t * slots + sl)] = sl == 0 ? 1.f : 0.f;
            }
        if (n_expert > 0) {  // a dense layer of a MoE model (leading dense layers): no experts
            for (int32_t t = 0; t < n; ++t)
                std::fill_n(r.token_experts.begin() + (std::ptrdiff_t)(((size_t)t * (size_t)hp->n_layer + (size_t)il) * (size_t)n_used), n_used, -1);
            std::fill_n(r.last_experts.begin() + (std::ptrdiff_t)((size_t)il * (size_t)n_used), n_used, -1);
        }
    }

    // Counting sort of the (token, slot) uses by target.
    const int n_targets = hp->n_expert + Routing::kFirstExpertTarget;
    std::vector<int32_t>& first = r.target_first;
    std::fill(first.begin(), first.end(), 0);
    for (int32_t u = 0; u < n * slots; ++u)
        if (r.slot_target[(size_t)u] >= 0) ++first[(size_t)r.slot_target[(size_t)u] + 1];
    for (int i = 0; i < n_targets; ++i) first[(size_t)i + 1] += first[(size_t)i];
    for (int32_t u = 0; u < n * slots; ++u)  // moving cursors, restored below
        if (r.slot_target[(size_t)u] >= 0) r.uses[(size_t)first[(size_t)r.slot_target[(size_t)u]]++] = ExpertUse{u / slots, u % slots};
    for (int i = n_targets; i > 0; --i) first[(size_t)i] = first[(size_t)i - 1];
    first[0] = 0;
    // Each used target, resolved to its weights once.
    r.active.clear();
    r.down_tiles = false;
    int64_t units = 0;
    for (int i = 0; i < n_targets; ++i) {
        if (first[(size_t)i + 1] == first[(size_t)i]) continue;
        ActiveExpert e;
        e.mat = 0;
        e.expert = -1;
        if (i == Routing::kSharedTarget) { e.gate = &l.gate_shexp; e.up = &l.up_shexp; e.down = &l.down_shexp; }
        else if (i == Routing::kDenseTarget) { e.gate = &l.gate; e.up = &l.up; e.down = &l.down; }
        else {
            e.expert = i - Routing::kFirstExpertTarget;
            const LayerWeights::ExpertMats em = l.expert(e.expert);
            e.gate = em.gate; e.up = em.up; e.down = em.down; e.mat = em.mat;
        }
        e.gate_mat = e.gate->row(e.mat, 0);
        e.up_mat = e.up->row(e.mat, 0);
        e.down_mat = e.down->row(e.mat, 0);
        const bool biased = e.expert >= 0 && !l.gate_exps_b.empty();
        e.gate_b = biased ? l.gate_exps_b.data() + (size_t)e.expert * (size_t)e.gate->rows : nullptr;
        e.up_b = biased ? l.up_exps_b.data() + (size_t)e.expert * (size_t)e.up->rows : nullptr;
        e.down_b = biased ? l.down_exps_b.data() + (size_t)e.expert * (size_t)e.down->rows : nullptr;
        e.use_begin = first[(size_t)i];
        e.use_end = first[(size_t)i + 1];
        const int32_t n_uses = e.use_end - e.use_begin;
        auto expert_panels = [&](const Weight& w) { return panels_for(w, n_uses) && (e.expert < 0 || n_uses >= kt(w).gemm.expert_min_tokens); };
        e.gemm_up = expert_panels(*e.gate) && expert_panels(*e.up);
        e.gemm_down = expert_panels(*e.down);
        r.down_tiles = r.down_tiles || e.gemm_down;
        e.unit_begin = units;
        e.unit_end = units += e.gemm_up ? (e.gate->rows + kGemmRows - 1) / kGemmRows : e.gate->rows;
        r.active.push_back(e);
    }
    if (store && l.moe()) use_store(il, n);
}

// Routed experts from the store: the layer's experts pinned in slots (misses read now, all at
// once), and in decode the predicted experts of the next layers queued behind them. With the
// shared expert first, the predictions and the wait come after it (predict_after_shared), so the
// demand reads overlap the shared expert.
inline void SessionImpl::use_store(int il, int32_t n) {
    store_ids.clear();
    for (const ActiveExpert& e : r.active)
        if (e.expert >= 0) store_ids.push_back(e.expert);
    const int n_targets = r.shared_first ? 0 : collect_predictions(il, n);
    if (!store->request(il, store_ids.data(), (int)store_ids.size(), &pins, n_targets ? &store_predicted : nullptr)) {
        if (!store_failed) store_error = last_error();
        store_failed = true;  // nothing pinned: the mapped bytes stay in r.active; forward() reports io_error
        store_ids.clear();
        return;
    }
    if (!r.shared_first) await_experts(il);
}

// The predictions made for the layers after il, as (target layer, experts) for the store (decode
// only: a prompt's chunk touches most experts anyway). Returns the number of targets.
inline int SessionImpl::collect_predictions(int il, int32_t n) {
    for (auto& target : store_predicted) target.second.clear();
    int n_targets = 0;
    if (n == 1 && prediction.depth > 0)
        for (int d = 1; d <= prediction.depth && il + d < hp->n_layer; ++d, ++n_targets) {
            const size_t at = prediction.at(il + d, d, 0);
            store_predicted[(size_t)n_targets].first = il + d;
            store_predicted[(size_t)n_targets].second.assign(prediction.ids.begin() + (std::ptrdiff_t)(at * (size_t)prediction.per_layer),
                                                             prediction.ids.begin() + (std::ptrdiff_t)(at * (size_t)prediction.per_layer) + prediction.count[at]);
        }
    return n_targets;
}

// Waits for the experts use_store() requested and points r.active at their slots.
inline void SessionImpl::await_experts(int il) {
    if (store_ids.empty()) return;
    store_ptrs.clear();
    for (const ActiveExpert& e : r.active)
        if (e.expert >= 0) store_ptrs.push_back({e.gate_mat, e.up_mat, e.down_mat});
    if (!store->wait_ready(il, store_ids.data(), (int)store_ids.size(), store_ptrs.data(), pins)) {
        if (!store_failed) store_error = last_error();
        store_failed = true;  // the slots hold stale bytes: forward() reports io_error
    }
    size_t k = 0;
    for (ActiveExpert& e : r.active) {
        if (e.expert < 0) continue;
        e.gate_mat = store_ptrs[k].gate;
        e.up_mat = store_ptrs[k].up;
        e.down_mat = store_ptrs[k].down;
        ++k;
    }
}

// Down rows of the shared expert (r.active[0], shared_first) into prediction.shared_out, as
// expert_down_phase computes them. True for the thread that finishes the rows.
inline bool SessionImpl::shared_down_phase(int32_t n) {
    const ActiveExpert& e = r.active[0];
    const RowKernel& kd = kt(*e.down);
    const int64_t n_embd = plan->n_embd;
    int64_t begin = 0, end = 0;
    bool last = false;
    for (; next_rows(n_embd, n, &begin, &end); last = rows_done.finish(end - begin, n_embd))
        for (int64_t row = begin; row < end; ++row) {
            const uint8_t* drow = e.down_mat + (size_t)row * e.down->row_bytes;
            if (prefetch_bytes) prefetch_ahead(drow, e.down->row_bytes);
            for (int32_t j = e.use_begin; j < e.use_end; ++j) {
                const ExpertUse& use = r.uses[(size_t)j];
                float v = kd.vec_dot(drow, a.hidden_q.data + (size_t)(use.token * plan->slots + use.slot) * a.hidden_q_stride, e.down->cols);
                if (e.down->scaled()) v *= e.down->scale(e.mat);
                prediction.shared_out[(size_t)(use.token * n_embd + row)] = v;
            }
        }
    return last;
}

// After the shared expert (shared_first): each token's predictions from residual + gate x shared
// output, then the store's prefetches and the wait for this layer's experts.
inline void SessionImpl::predict_after_shared(int il, int32_t n) {
    const int64_t n_embd = plan->n_embd;
    float* in = prediction.input.data();
    for (int32_t t = 0; t < n; ++t) {
        const float g = r.slot_weight[(size_t)(t * plan->slots + hp->n_expert_used)];
        const float* x = a.x.data + t * n_embd;
        const float* sh = prediction.shared_out.data() + t * n_embd;
        for (int64_t i = 0; i < n_embd; ++i) in[i] = x[i] + g * sh[i];
        predict(il, t, in);
    }
    if (!store || store_ids.empty()) return;
    if (collect_predictions(il, n)) store->prefetch(store_predicted);
    await_experts(il);
}

// For token t at layer il (r.topk holds its ranking): scores the predictions made earlier for this
// layer.
inline void SessionImpl::score_predictions(int il, int32_t t) {
    ExpertPrediction& p = prediction;
    const int n_used = hp->n_expert_used;
    for (int d = 1; d <= p.depth && d <= il; ++d) {
        const size_t at = p.at(il, d, t), cell = (size_t)il * (size_t)p.depth + (size_t)(d - 1);
        const int32_t* ids = p.ids.data() + at * (size_t)p.per_layer;
        uint64_t hits = 0;
        for (int32_t i = 0; i < p.count[at]; ++i)
            for (int j = 0; j < n_used; ++j) hits += ids[i] == r.topk[(size_t)j].second;
        p.stats.predicted[cell] += (uint64_t)p.count[at];
        p.stats.correct[cell] += hits;
        p.stats.routed[cell] += (uint64_t)n_used;
    }
}

// Token t's predictions for the layers after il from `hidden`: the residual stream after attention
// (plus the shared expert's gated output where the layer has one).
inline void SessionImpl::predict(int il, int32_t t, const float* hidden) {
    ExpertPrediction& p = prediction;
    for (int d = 1; d <= p.depth && il + d < hp->n_layer; ++d) {
        const size_t at = p.at(il + d, d, t);
        const int got = p.predictor->predict(il, il + d, hidden, p.ids.data() + at * (size_t)p.per_layer, p.per_layer);
        p.count[at] = std::max(0, std::min(got, p.per_layer));
    }
}

// gate/up rows of every active expert (one range of work units: rows, or tiles of an expert that
// runs as panels), SwiGLU into hidden[(token, slot)]. shared_only: the shared expert alone
// (r.shared_first); the phase after it skips it.
inline void SessionImpl::expert_up_phase(int32_t n, int ith, bool shared_only) {
    const int32_t uses_per_expert = std::max(1, n * plan->slots / std::max<int32_t>(1, (int32_t)r.active.size()));  // on average
    const int64_t first = r.shared_first && !shared_only ? r.active[0].unit_end : 0;
    const int64_t total = shared_only ? r.active[0].unit_end : r.active_units();
    int64_t begin, end;
    while (next_rows(total - first, uses_per_expert, &begin, &end)) {
        begin += first;
        end += first;
        size_t i = (size_t)(std::upper_bound(r.active.begin(), r.active.end(), begin,
                                             [](int64_t unit, const ActiveExpert& e) { return unit < e.unit_end; }) - r.active.begin());
        for (int64_t gu = begin; gu < end; ++gu) {
            while (gu >= r.active[i].unit_end) ++i;
            const ActiveExpert& e = r.active[i];
            if (e.gemm_up) up_tile(e, (gu - e.unit_begin) * kGemmRows, ith);
            else up_row(e, gu - e.unit_begin);
            // After the chunk's last unit of expert i: whoever completes the expert quantizes its hidden rows.
            if ((gu + 1 == end || gu + 1 == e.unit_end) &&
                r.expert_done[i].finish(gu + 1 - std::max(begin, e.unit_begin), e.unit_end - e.unit_begin))
                quantize_hidden(e);
        }
    }
}

// Row `row` of expert e's gate and up matrices, for every use of the expert.
inline void SessionImpl::up_row(const ActiveExpert& e, int64_t row) {
    const RowKernel &kg = kt(*e.gate), &ku = kt(*e.up);
    const uint8_t* grow = e.gate_mat + (size_t)row * e.gate->row_bytes;
    const uint8_t* urow = e.up_mat + (size_t)row * e.up->row_bytes;
    if (prefetch_bytes) { prefetch_ahead(grow, e.gate->row_bytes); prefetch_ahead(urow, e.up->row_bytes); }
    for (int32_t j = e.use_begin; j < e.use_end; ++j) {
        const ExpertUse& use = r.uses[(size_t)j];
        float gv = kg.vec_dot(grow, a.act_x.row(kg.act, use.token), e.gate->cols);
        float uv = ku.vec_dot(urow, a.act_x.row(ku.act, use.token), e.up->cols);
        if (e.gate->scaled()) gv *= e.gate->scale(e.mat);
        if (e.up->scaled()) uv *= e.up->scale(e.mat);
        if (e.gate_b) { gv += e.gate_b[row]; uv += e.up_b[row]; }
        a.hidden[(size_t)((use.token * plan->slots + use.slot) * plan->max_ff + row)] = gated(gv, uv);
    }
}

// Rows [row0, row0 + kGemmRows) of expert e's gate and up matrices as panels, for every use.
inline void SessionImpl::up_tile(const ActiveExpert& e, int64_t row0, int ith) {
    const RowKernel &kg = kt(*e.gate), &ku = kt(*e.up);
    GemmScratch &sg = gemm_scratch[2 * (size_t)ith], &su = gemm_scratch[2 * (size_t)ith + 1];
    const int rows = (int)std::min<int64_t>(kGemmRows, e.gate->rows - row0);
    gemm_pack(kg.gemm, e.gate_mat + (size_t)row0 * e.gate->row_bytes, e.gate->row_bytes, rows, e.gate->cols, &sg);
    gemm_pack(ku.gemm, e.up_mat + (size_t)row0 * e.up->row_bytes, e.up->row_bytes, rows, e.up->cols, &su);
    const float gs = e.gate->scaled() ? e.gate->scale(e.mat) : 1.f, us = e.up->scaled() ? e.up->scale(e.mat) : 1.f;
    const BlockQ8G *xg[kGemmTokens], *xu[kGemmTokens];
    alignas(64) float g[kGemmTokens * kGemmRows], u[kGemmTokens * kGemmRows];
    for (int32_t j = e.use_begin; j < e.use_end; j += kGemmTokens) {
        const int nt = std::min<int>(kGemmTokens, e.use_end - j);
        for (int k = 0; k < nt; ++k) {
            xg[k] = static_cast<const BlockQ8G*>(a.act_x.row(kg.gemm_act, r.uses[(size_t)(j + k)].token));
            xu[k] = static_cast<const BlockQ8G*>(a.act_x.row(ku.gemm_act, r.uses[(size_t)(j + k)].token));
        }
        kg.gemm_tile(sg.panel, xg, nt, g);
        ku.gemm_tile(su.panel, xu, nt, u);
        for (int k = 0; k < nt; ++k) {
            const ExpertUse& use = r.uses[(size_t)(j + k)];
            float* h = a.hidden.data + (use.token * plan->slots + use.slot) * plan->max_ff + row0;
            for (int rr = 0; rr < rows; ++rr) {
                float gv = g[k * kGemmRows + rr], uv = u[k * kGemmRows + rr];
                if (e.gate->scaled()) gv *= gs;
                if (e.up->scaled()) uv *= us;
                if (e.gate_b) { gv += e.gate_b[row0 + rr]; uv += e.up_b[row0 + rr]; }
                h[rr] = gated(gv, uv);
            }
        }
    }
}

// Quantizes the hidden rows of every use of expert e to its down projection's activation format
// (q8_gemm when the down projection runs as panels).
inline void SessionImpl::quantize_hidden(const ActiveExpert& e) {
    const ActFormat f = e.gemm_down ? kt(*e.down).gemm_act : kt(*e.down).act;
    for (int32_t j = e.use_begin; j < e.use_end; ++j) {
        const int64_t u = (int64_t)r.uses[(size_t)j].token * plan->slots + r.uses[(size_t)j].slot;
        quantize_act(f, a.hidden_q.data + (size_t)u * a.hidden_q_stride, a.hidden.data + u * plan->max_ff, e.down->cols);
    }
}

// Down rows in sub-chunks of up to kDownRows rows: each active expert streams its rows of the
// sub-chunk (one sequential read, or panels of kGemmRows rows) against all its uses, then each
// token sums its slots in slot order and adds into x. No two threads write one value. While some
// expert runs as panels, threads take whole tiles of kGemmRows rows.
inline bool SessionImpl::expert_down_phase(int32_t n, int ith) {
    const int32_t slots = plan->slots;
    const int64_t n_embd = plan->n_embd, n_uses = (int64_t)n * slots;
    const int64_t unit = r.down_tiles ? kGemmRows : 1, n_units = (n_embd + unit - 1) / unit;
    int64_t sub_rows = std::max<int64_t>(1, std::min<int64_t>(kDownRows, (int64_t)a.down_part_per_thread / n_uses));
    if (r.down_tiles) sub_rows = std::max<int64_t>(kGemmRows, sub_rows / kGemmRows * kGemmRows);  // the buffer holds kGemmRows * B * slots
    float* part = a.down_part.data + (size_t)ith * a.down_part_per_thread;  // (sub_rows, n_uses)
    int64_t ub = 0, ue = 0;
    bool last = false;
    for (; next_rows(n_units, (int32_t)n_uses, &ub, &ue); last = rows_done.finish(ue - ub, n_units)) {
        const int64_t begin = ub * unit, end = std::min(n_embd, ue * unit);
        for (int64_t r0 = begin; r0 < end; r0 += sub_rows) {
            const int64_t r1 = std::min(end, r0 + sub_rows);
            for (size_t ai = r.shared_first ? 1 : 0; ai < r.active.size(); ++ai) {
                const ActiveExpert& e = r.active[ai];
                if (e.gemm_down) {
                    for (int64_t row = r0; row < r1; row += kGemmRows)
                        down_tile(e, row, (int)std::min<int64_t>(kGemmRows, r1 - row), part + (row - r0) * n_uses, n_uses, ith);
                    continue;
                }
                const RowKernel& kd = kt(*e.down);
                for (int64_t row = r0; row < r1; ++row) {
                    const uint8_t* drow = e.down_mat + (size_t)row * e.down->row_bytes;
                    if (prefetch_bytes) prefetch_ahead(drow, e.down->row_bytes);
                    float* pr = part + (row - r0) * n_uses;
                    for (int32_t j = e.use_begin; j < e.use_end; ++j) {
                        const int32_t su = r.uses[(size_t)j].token * slots + r.uses[(size_t)j].slot;
                        pr[su] = kd.vec_dot(drow, a.hidden_q.data + (size_t)su * a.hidden_q_stride, e.down->cols);
                        if (e.down->scaled()) pr[su] *= e.down->scale(e.mat);
                        if (e.down_b) pr[su] += e.down_b[row];
                    }
                }
            }
            if (r.shared_first)  // computed before routing: its slot of each token
                for (int64_t row = r0; row < r1; ++row)
                    for (int32_t t = 0; t < n; ++t)
                        part[(row - r0) * n_uses + t * slots + hp->n_expert_used] = prediction.shared_out[(size_t)(t * n_embd + row)];
            for (int64_t row = r0; row < r1; ++row) {
                const float* pr = part + (row - r0) * n_uses;
                for (int32_t t = 0; t < n; ++t) {
                    float acc = 0;
                    for (int32_t sl = 0; sl < slots; ++sl)
                        if (r.slot_target[(size_t)(t * slots + sl)] != Routing::kNoTarget) acc += r.slot_weight[(size_t)(t * slots + sl)] * pr[t * slots + sl];
                    a.x[(size_t)(t * n_embd + row)] += acc;
                }
            }
        }
    }
    return last;
}

// Down rows [row0, row0 + rows) of expert e as a panel: part_rows[(row - row0) * n_uses + use].
inline void SessionImpl::down_tile(const ActiveExpert& e, int64_t row0, int rows, float* part_rows, int64_t n_uses, int ith) {
    const RowKernel& kd = kt(*e.down);
    GemmScratch& s = gemm_scratch[2 * (size_t)ith];
    gemm_pack(kd.gemm, e.down_mat + (size_t)row0 * e.down->row_bytes, e.down->row_bytes, rows, e.down->cols, &s);
    const float ds = e.down->scaled() ? e.down->scale(e.mat) : 1.f;
    const BlockQ8G* x[kGemmTokens];
    int32_t su[kGemmTokens];
    alignas(64) float out[kGemmTokens * kGemmRows];
    for (int32_t j = e.use_begin; j < e.use_end; j += kGemmTokens) {
        const int nt = std::min<int>(kGemmTokens, e.use_end - j);
        for (int k = 0; k < nt; ++k) {
            su[k] = r.uses[(size_t)(j + k)].token * plan->slots + r.uses[(size_t)(j + k)].slot;
            x[k] = reinterpret_cast<const BlockQ8G*>(a.hidden_q.data + (size_t)su[k] * a.hidden_q_stride);
        }
        kd.gemm_tile(s.panel, x, nt, out);
        for (int k = 0; k < nt; ++k)
            for (int rr = 0; rr < rows; ++rr) {
                float v = out[k * kGemmRows + rr];
                if (e.down->scaled()) v *= ds;
                if (e.down_b) v += e.down_b[row0 + rr];
                part_rows[rr * n_uses + su[k]] = v;
            }
    }
}

}  // namespace detail

MOE_API uint64_t kv_cache_bytes(const ModelInfo& info, int32_t n_ctx, TensorType kv_type) {
    const int32_t n = detail::session_n_ctx(info, n_ctx);
    if (n <= 0 || info.n_layer <= 0 || info.n_head_kv <= 0 || info.head_dim <= 0) return 0;
    if (info.kv_lora_rank > 0)  // MLA: the latent and the rope key, no values
        return detail::KvCache::bytes(info.n_layer, n, (int64_t)info.kv_lora_rank + info.n_rot, 0, kv_type == TensorType::q8_0);
    const int64_t dim = (int64_t)info.n_head_kv * info.head_dim;
    // (+ short-convolution layers' inputs over n_batch + 64 positions, which depend on SessionOptions)
    const int32_t n_recr = (int32_t)std::count(info.layer_recurrent.begin(), info.layer_recurrent.end(), true);
    const int64_t DS = info.ssm_state;  // delta-net states: a fixed size, whatever n_ctx (see ForwardPlan::ssm_floats)
    const uint64_t recr = DS > 0 ? (uint64_t)n_recr * 4 *
                                       (uint64_t)((int64_t)(info.ssm_conv_kernel - 1) * (2 * info.ssm_k_heads + info.ssm_v_heads) * DS +
                                                  (int64_t)info.ssm_v_heads * (DS * DS + 2 * DS + 1))
                                 : 0;
    return detail::KvCache::bytes(info.n_layer - detail::n_conv_layers(info) - n_recr, n, dim, dim, kv_type == TensorType::q8_0) + recr;
}

MOE_DETAIL_MEMBER Session::Session() = default;
MOE_DETAIL_MEMBER Session::~Session() = default;
MOE_DETAIL_MEMBER Session::Session(Session&&) noexcept = default;
MOE_DETAIL_MEMBER Session& Session::operator=(Session&&) noexcept = default;

MOE_DETAIL_MEMBER Status Session::create(const Model& model, const SessionOptions& options, Session* out) {
    if (!out || !model.valid()) return detail::fail(Status::invalid_argument, "invalid model or null output");
    int n_threads = options.n_threads;
    if (n_threads <= 0) {
#if MOE_DETAIL_HAS_THREADS
        n_threads = (int)std::min(16u, std::max(1u, std::thread::hardware_concurrency()));
#else
        n_threads = 1;
#endif
    }
    if (n_threads > 512) return detail::fail(Status::invalid_argument, "n_threads %d is out of range [1, 512]", n_threads);
#if !MOE_DETAIL_HAS_THREADS
    n_threads = 1;
#endif
    if (options.n_ctx < 0 || options.n_batch < 0) return detail::fail(Status::invalid_argument, "negative n_ctx or n_batch");
    if (options.predict_depth < 0 || options.predict_depth > 4)
        return detail::fail(Status::invalid_argument, "predict_depth %d is out of range [0, 4]", options.predict_depth);
    if (options.predict_extra < 0 || options.predict_extra > 1024)
        return detail::fail(Status::invalid_argument, "predict_extra %d is out of range [0, 1024]", options.predict_extra);
    if (options.prefetch_distance < -1 || options.prefetch_distance > (1 << 20))
        return detail::fail(Status::invalid_argument, "prefetch_distance %d is out of range [-1, 1 MiB]", options.prefetch_distance);
    std::unique_ptr<detail::SessionImpl> impl(new (std::nothrow) detail::SessionImpl(n_threads));
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = impl->init(model.impl_, options);
    if (s != Status::ok) return s;
    out->impl_ = std::move(impl);
    out->model_.impl_ = model.impl_;  // shares the weights: the caller's Model may move or go away
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Session::eval(const int32_t* tokens, size_t n, float* all_logits) {
    if (!impl_) return detail::fail(Status::invalid_argument, "session not created");
    if (!tokens || n == 0) return detail::fail(Status::invalid_argument, "no tokens to evaluate");
    detail::KvCache& kv = impl_->kv;
    // Sizes first: `tokens` is only known to hold n ids when n is plausible.
    if (n > (size_t)(kv.n_ctx - kv.pos))
        return detail::fail(Status::context_full, "%zu tokens do not fit: position %d of n_ctx %d", n, kv.pos, kv.n_ctx);
    const int32_t n_vocab = impl_->hp->n_vocab;
    for (size_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= n_vocab) return detail::fail(Status::invalid_argument, "token id %d is out of range [0, %d)", tokens[i], n_vocab);
    for (size_t done = 0; done < n;) {
        int32_t chunk = (int32_t)std::min<size_t>(n - done, (size_t)impl_->n_batch);
        Status s = impl_->forward(tokens + done, chunk, all_logits ? all_logits + done * (size_t)n_vocab : nullptr);
        if (s != Status::ok) return s;
        done += (size_t)chunk;
        if (impl_->progress && !impl_->progress(impl_->progress_user, done, n))
            return done < n ? detail::fail(Status::cancelled, "evaluation stopped by the progress callback after %zu of %zu tokens", done, n) : Status::ok;
    }
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Session::eval_batch(Session* const* sessions, const int32_t* tokens, size_t n) {
    if (!sessions || !tokens || n == 0) return detail::fail(Status::invalid_argument, "no sessions or tokens to evaluate");
    if (n > (1u << 20)) return detail::fail(Status::invalid_argument, "%zu sessions in one batch is too many", n);
    if (!sessions[0] || !sessions[0]->impl_) return detail::fail(Status::invalid_argument, "session 0 is null or not created");
    detail::SessionImpl& lead = *sessions[0]->impl_;
    std::vector<detail::KvCache*>& caches = lead.batch_kv;  // grows once, reused by later calls
    caches.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const Session* s = sessions[i];
        if (!s || !s->impl_) return detail::fail(Status::invalid_argument, "session %zu is null or not created", i);
        if (s->impl_->model != lead.model) return detail::fail(Status::invalid_argument, "session %zu belongs to another model than session 0", i);
        for (size_t j = 0; j < i; ++j)
            if (sessions[j] == s) return detail::fail(Status::invalid_argument, "session %zu appears twice (also at %zu)", i, j);
        detail::KvCache& kv = s->impl_->kv;
        if (kv.q8 != lead.kv.q8) return detail::fail(Status::invalid_argument, "session %zu has another KV-cache type than session 0", i);
        if (kv.n_recr && kv.recr_pos != kv.pos) {  // stale delta-net states: rebuilt alone first
            Status st = s->impl_->replay_prefix(kv.pos);
            if (st != Status::ok) return st;
        }
        if (kv.pos >= kv.n_ctx) return detail::fail(Status::context_full, "session %zu is full: position %d of n_ctx %d", i, kv.pos, kv.n_ctx);
        if (tokens[i] < 0 || tokens[i] >= lead.hp->n_vocab)
            return detail::fail(Status::invalid_argument, "token id %d (session %zu) is out of range [0, %d)", tokens[i], i, lead.hp->n_vocab);
        caches[i] = &kv;
    }
    const size_t n_vocab = (size_t)lead.hp->n_vocab;
    for (size_t done = 0; done < n;) {
        const int32_t chunk = (int32_t)std::min<size_t>(n - done, (size_t)lead.n_batch);
        Status st = lead.forward(tokens + done, chunk, nullptr, caches.data() + done);
        if (st != Status::ok) return st;
        const size_t per_token = lead.r.last_experts.size();
        for (int32_t t = 0; t < chunk; ++t) {
            detail::SessionImpl& si = *sessions[done + (size_t)t]->impl_;
            std::memcpy(si.a.logits.data, lead.a.logits_batch.data + (size_t)t * n_vocab, n_vocab * 4);
            if (lead.hp->n_expert > 0)  // the first session's own routing is rewritten by later passes
                std::copy(lead.r.token_experts.begin() + (std::ptrdiff_t)((size_t)t * per_token),
                          lead.r.token_experts.begin() + (std::ptrdiff_t)((size_t)(t + 1) * per_token),
                          done + (size_t)t == 0 ? lead.r.lead_experts.begin() : si.r.last_experts.begin());
        }
        done += (size_t)chunk;
    }
    if (lead.hp->n_expert > 0) std::copy(lead.r.lead_experts.begin(), lead.r.lead_experts.end(), lead.r.last_experts.begin());
    return Status::ok;
}

MOE_DETAIL_MEMBER void Session::cancel() {
    if (impl_) impl_->cancel_requested.store(true);
}

MOE_DETAIL_MEMBER const float* Session::logits() const { return impl_ ? impl_->a.logits.data : nullptr; }
MOE_DETAIL_MEMBER int32_t Session::position() const { return impl_ ? impl_->kv.pos : 0; }
MOE_DETAIL_MEMBER int32_t Session::n_ctx() const { return impl_ ? impl_->kv.n_ctx : 0; }
MOE_DETAIL_MEMBER void Session::reset() {
    if (!impl_) return;
    impl_->kv.pos = 0;
    impl_->kv.recr_pos = 0;
    impl_->kv.forget_conv_from(0);
}
MOE_DETAIL_MEMBER Status Session::truncate(int32_t n) {
    if (!impl_ || n < 0 || n > impl_->kv.pos) return detail::fail(Status::invalid_argument, "cannot truncate to %d", n);
    return impl_->rewind(n);
}
MOE_DETAIL_MEMBER const int32_t* Session::tokens() const { return impl_ ? impl_->kv.tokens.data : nullptr; }

MOE_DETAIL_MEMBER Status Session::eval_prompt(const int32_t* tokens, size_t n, size_t* reused) {
    if (reused) *reused = 0;
    if (!impl_) return detail::fail(Status::invalid_argument, "session not created");
    if (!tokens || n == 0) return detail::fail(Status::invalid_argument, "no tokens to evaluate");
    if (n > (size_t)impl_->kv.n_ctx)
        return detail::fail(Status::context_full, "%zu tokens do not fit: n_ctx %d", n, impl_->kv.n_ctx);
    const detail::KvCache& kv = impl_->kv;
    size_t keep = 0;
    while (keep + 1 < n && keep < (size_t)kv.pos && kv.tokens.data[keep] == tokens[keep]) ++keep;
    Status s = impl_->rewind((int32_t)keep);
    if (s != Status::ok) return s;
    if (reused) *reused = keep;
    return eval(tokens + keep, n - keep);
}

namespace detail {
// FNV-1a of the GGUF header (everything before the first tensor's data: metadata, tensor names,
// types, shapes and offsets): a session state belongs to the model it was computed with.
inline uint64_t model_fingerprint(const ModelImpl& m) {
    const GgufFile& f = m.file;
    size_t header = f.file_size();
    for (size_t i = 0; i < f.n_tensors(); ++i) header = std::min(header, (size_t)(f.tensor_at(i).data - f.data()));
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < header; ++i) h = (h ^ f.data()[i]) * 0x100000001b3ull;
    return h;
}
constexpr uint64_t kStateMagic = 0x4554415453454f4dull;  // "MOESTATE"
constexpr uint32_t kStateVersion = 1;
}  // namespace detail

MOE_DETAIL_MEMBER Status Session::save_state(std::vector<uint8_t>* out, const Sampler* sampler) const {
    if (!impl_ || !out) return detail::fail(Status::invalid_argument, "save_state: session not created or no output");
    const detail::SessionImpl& si = *impl_;
    const detail::KvCache& kv = si.kv;
    const int32_t n_layer = si.hp->n_layer, n_vocab = si.hp->n_vocab;
    std::vector<uint8_t> sampler_bytes;
    if (sampler) sampler->save_state(&sampler_bytes);
    out->clear();
    const size_t row = kv.row_bytes, v_row = kv.v_row_bytes, rows = (size_t)n_layer * (size_t)kv.pos;
    out->reserve(64 + (size_t)kv.pos * 4 + rows * (row + v_row) + (size_t)n_vocab * 4 + sampler_bytes.size());
    detail::ByteWriter w(out);
    w.put(detail::kStateMagic);
    w.put(detail::kStateVersion);
    w.put(detail::model_fingerprint(*si.model));
    w.put<int32_t>(n_layer);
    w.put<int64_t>(kv.kv_dim);
    w.put<int32_t>(n_vocab);
    w.put<int32_t>((int32_t)(kv.q8 ? TensorType::q8_0 : TensorType::f32));
    w.put<int32_t>(kv.pos);
    w.bytes(kv.tokens.data, (size_t)kv.pos * 4);
    for (int il = 0; il < n_layer; ++il) {
        if (kv.slot[(size_t)il] < 0) continue;  // a short-convolution layer
        w.bytes(kv.k.data + kv.offset(il, 0), (size_t)kv.pos * row);
        w.bytes(kv.v.data + kv.v_offset(il, 0), (size_t)kv.pos * v_row);
    }
    // Short-convolution layers: their inputs over the window before pos (the convolution state).
    const int32_t conv_rows = si.hp->shortconv_l_cache ? std::min(kv.pos, si.hp->shortconv_l_cache - 1) : 0;
    for (int32_t ci = 0; ci < detail::n_conv_layers(*si.hp); ++ci)
        for (int32_t p = kv.pos - conv_rows; p < kv.pos; ++p) w.bytes(kv.conv_row(ci, p), (size_t)kv.conv_width * 4);
    // Delta-net layers: their states, when they describe this position (else the loader re-evaluates).
    if (kv.n_recr) {
        const bool current = kv.recr_pos == kv.pos;
        w.put<int32_t>(current ? 1 : 0);
        if (current) w.bytes(kv.recr.data, (size_t)kv.n_recr * (size_t)kv.recr_floats * 4);
    }
    w.bytes(si.a.logits.data, (size_t)n_vocab * 4);
    w.put<uint64_t>(sampler_bytes.size());
    w.bytes(sampler_bytes.data(), sampler_bytes.size());
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Session::load_state(const uint8_t* data, size_t size, Sampler* sampler) {
    if (!impl_ || (!data && size)) return detail::fail(Status::invalid_argument, "load_state: session not created or no data");
    detail::SessionImpl& si = *impl_;
    detail::KvCache& kv = si.kv;
    const int32_t n_layer = si.hp->n_layer, n_vocab = si.hp->n_vocab;
    detail::ByteReader r(data, size);
    uint64_t magic = 0, fingerprint = 0, sampler_size = 0;
    uint32_t version = 0;
    int32_t layers = 0, vocab = 0, kv_type = 0, pos = 0;
    int64_t kv_dim = 0;
    if (!r.get(&magic) || magic != detail::kStateMagic) return detail::fail(Status::invalid_file, "not a moe_infer session state");
    if (!r.get(&version) || version != detail::kStateVersion)
        return detail::fail(Status::invalid_file, "session state version %u (this build reads %u)", version, detail::kStateVersion);
    if (!r.get(&fingerprint) || !r.get(&layers) || !r.get(&kv_dim) || !r.get(&vocab) || !r.get(&kv_type) || !r.get(&pos))
        return detail::fail(Status::invalid_file, "truncated session state");
    if (fingerprint != detail::model_fingerprint(*si.model) || layers != n_layer || kv_dim != kv.kv_dim || vocab != n_vocab)
        return detail::fail(Status::invalid_file, "the session state was saved with another model");
    const int32_t own_type = (int32_t)(kv.q8 ? TensorType::q8_0 : TensorType::f32);
    if (kv_type != own_type)
        return detail::fail(Status::invalid_argument, "the session state has a %s KV cache, this session %s",
                            tensor_type_name((TensorType)kv_type), tensor_type_name((TensorType)own_type));
    if (pos < 0) return detail::fail(Status::invalid_file, "corrupt session state (position %d)", pos);
    if (pos > kv.n_ctx) return detail::fail(Status::context_full, "the session state holds %d positions, n_ctx is %d", pos, kv.n_ctx);
    const size_t row = kv.row_bytes, v_row = kv.v_row_bytes;
    const int32_t conv_rows = si.hp->shortconv_l_cache ? std::min(pos, si.hp->shortconv_l_cache - 1) : 0, n_conv = detail::n_conv_layers(*si.hp);
    const size_t conv_bytes = (size_t)n_conv * (size_t)conv_rows * (size_t)kv.conv_width * 4;
    const size_t kv_layers = (size_t)std::count_if(kv.slot.begin(), kv.slot.end(), [](int32_t sl) { return sl >= 0; });  // layers with attention
    const size_t need = (size_t)pos * 4 + kv_layers * (size_t)pos * (row + v_row) + conv_bytes + (size_t)n_vocab * 4 + 8;
    if (r.left() < need) return detail::fail(Status::invalid_file, "truncated session state");
    // Validated before anything is overwritten: the tokens, then the sampler part's size.
    const uint8_t* token_bytes = r.skip((size_t)pos * 4);
    for (int32_t i = 0; i < pos; ++i) {
        int32_t t;
        std::memcpy(&t, token_bytes + (size_t)i * 4, 4);
        if (t < 0 || t >= n_vocab) return detail::fail(Status::invalid_file, "corrupt session state (token %d at position %d)", t, i);
    }
    const uint8_t* kv_bytes = r.skip(kv_layers * (size_t)pos * (row + v_row));
    const uint8_t* conv_state = r.skip(conv_bytes);
    int32_t recr_current = 0;
    const uint8_t* recr_state = nullptr;
    const size_t recr_bytes = (size_t)kv.n_recr * (size_t)kv.recr_floats * 4;
    if (kv.n_recr) {
        if (!r.get(&recr_current) || (recr_current != 0 && recr_current != 1)) return detail::fail(Status::invalid_file, "corrupt session state (delta-net part)");
        if (recr_current) {
            if (r.left() < recr_bytes + (size_t)n_vocab * 4 + 8) return detail::fail(Status::invalid_file, "truncated session state");
            recr_state = r.skip(recr_bytes);
            for (size_t i = 0; i < recr_bytes / 4; ++i) {
                float v;
                std::memcpy(&v, recr_state + i * 4, 4);
                if (!std::isfinite(v)) return detail::fail(Status::invalid_file, "corrupt session state (a delta-net state is not finite)");
            }
        }
        if (r.left() < (size_t)n_vocab * 4 + 8) return detail::fail(Status::invalid_file, "truncated session state");
    }
    const uint8_t* logit_bytes = r.skip((size_t)n_vocab * 4);
    for (int32_t i = 0; i < n_vocab; ++i) {
        float v;
        std::memcpy(&v, logit_bytes + (size_t)i * 4, 4);
        if (!std::isfinite(v)) return detail::fail(Status::invalid_file, "corrupt session state (logit %d is not finite)", i);
    }
    if (!r.get(&sampler_size) || sampler_size != r.left()) return detail::fail(Status::invalid_file, "corrupt session state (sampler part)");
    const uint8_t* sampler_bytes = r.skip((size_t)sampler_size);
    if (sampler) {
        if (sampler_size == 0) return detail::fail(Status::invalid_argument, "the session state holds no sampler state");
        Status s = sampler->load_state(sampler_bytes, (size_t)sampler_size);
        if (s != Status::ok) return s;
    }
    std::memcpy(kv.tokens.data, token_bytes, (size_t)pos * 4);
    for (int il = 0; il < n_layer; ++il) {
        if (kv.slot[(size_t)il] < 0) continue;
        std::memcpy(kv.k.data + kv.offset(il, 0), kv_bytes, (size_t)pos * row);
        kv_bytes += (size_t)pos * row;
        std::memcpy(kv.v.data + kv.v_offset(il, 0), kv_bytes, (size_t)pos * v_row);
        kv_bytes += (size_t)pos * v_row;
    }
    kv.forget_conv_from(0);
    for (int32_t ci = 0; ci < n_conv; ++ci)
        for (int32_t p = pos - conv_rows; p < pos; ++p) {
            std::memcpy(kv.conv_row(ci, p), conv_state, (size_t)kv.conv_width * 4);
            conv_state += (size_t)kv.conv_width * 4;
        }
    for (int32_t p = pos - conv_rows; p < pos && n_conv; ++p) kv.conv_pos[(size_t)(p % kv.conv_ring)] = p;
    if (recr_state) std::memcpy(kv.recr.data, recr_state, recr_bytes);
    std::memcpy(si.a.logits.data, logit_bytes, (size_t)n_vocab * 4);
    kv.pos = pos;
    kv.recr_pos = recr_state || pos == 0 ? pos : -1;  // -1: the next evaluation rebuilds the states
    return Status::ok;
}

MOE_DETAIL_MEMBER Status Session::save_state(const char* path, const Sampler* sampler) const {
    if (!path) return detail::fail(Status::invalid_argument, "save_state: null path");
    std::vector<uint8_t> bytes;
    Status s = save_state(&bytes, sampler);
    if (s != Status::ok) return s;
    return detail::write_whole_file(path, bytes.data(), bytes.size());
}

MOE_DETAIL_MEMBER Status Session::load_state(const char* path, Sampler* sampler) {
    if (!path) return detail::fail(Status::invalid_argument, "load_state: null path");
    detail::FileView view;
    Status s = view.open(path, false);
    if (s != Status::ok) return s;
    return load_state(view.data, view.size, sampler);
}

MOE_DETAIL_MEMBER const Model& Session::model() const { return model_; }
MOE_DETAIL_MEMBER const int32_t* Session::last_expert_ids() const { return impl_ ? impl_->r.last_experts.data() : nullptr; }

MOE_DETAIL_MEMBER int Session::profile(PhaseTime* out, int max) const {
    typedef detail::PhaseProfile P;
    if (!impl_ || !impl_->profile.enabled) return 0;
    for (int i = 0; i < P::count && i < max; ++i)
        if (out) out[i] = PhaseTime{P::name(i), impl_->profile.seconds[i]};
    return P::count;
}
MOE_DETAIL_MEMBER void Session::reset_profile() {
    if (impl_) std::fill(impl_->profile.seconds, impl_->profile.seconds + detail::PhaseProfile::count, 0.0);
}
MOE_DETAIL_MEMBER const ExpertStats& Session::expert_stats() const {
    static const ExpertStats empty;
    return impl_ ? impl_->stats : empty;
}
MOE_DETAIL_MEMBER void Session::reset_expert_stats() { if (impl_) impl_->stats.reset(); }
MOE_DETAIL_MEMBER const PredictionStats& Session::prediction_stats() const {
    static const PredictionStats empty;
    return impl_ ? impl_->prediction.stats : empty;
}
MOE_DETAIL_MEMBER void Session::reset_prediction_stats() {
    if (!impl_) return;
    PredictionStats& p = impl_->prediction.stats;
    std::fill(p.predicted.begin(), p.predicted.end(), 0);
    std::fill(p.correct.begin(), p.correct.end(), 0);
    std::fill(p.routed.begin(), p.routed.end(), 0);
}

MOE_DETAIL_MEMBER void ExpertStats::reset() {
    tokens = 0;
    std::fill(count.begin(), count.end(), 0);
    std::fill(weight.begin(), weight.end(), 0.0);
}
MOE_DETAIL_MEMBER Status ExpertStats::merge(const ExpertStats& other) {
    if (count.empty()) { *this = other; return Status::ok; }
    if (other.n_layer != n_layer || other.n_expert != n_expert || other.count.size() != count.size() || other.weight.size() != weight.size())
        return detail::fail(Status::invalid_argument, "expert statistics of %d x %d and %d x %d cannot be merged", n_layer, n_expert,
                            other.n_layer, other.n_expert);
    tokens += other.tokens;
    for (size_t i = 0; i < count.size(); ++i) { count[i] += other.count[i]; weight[i] += other.weight[i]; }
    return Status::ok;
}
MOE_DETAIL_MEMBER std::string ExpertStats::to_csv() const {
    std::string out = "layer,expert,count,weight,share\n";
    char line[128];
    for (int32_t l = 0; l < n_layer; ++l)
        for (int32_t e = 0; e < n_expert; ++e) {
            const size_t i = (size_t)l * (size_t)n_expert + (size_t)e;
            std::snprintf(line, sizeof line, "%d,%d,%llu,%.9g,%.6f\n", l, e, (unsigned long long)count[i], weight[i],
                          tokens ? (double)count[i] / (double)tokens : 0.0);
            out += line;
        }
    return out;
}
MOE_DETAIL_MEMBER std::string ExpertStats::to_json() const {
    char num[64];
    std::snprintf(num, sizeof num, "{\"n_layer\":%d,\"n_expert\":%d,\"tokens\":%llu,", n_layer, n_expert, (unsigned long long)tokens);
    std::string out = num;
    for (int pass = 0; pass < 2; ++pass) {
        out += pass == 0 ? "\"count\":[" : ",\"weight\":[";
        for (int32_t l = 0; l < n_layer; ++l) {
            out += l ? ",[" : "[";
            for (int32_t e = 0; e < n_expert; ++e) {
                const size_t i = (size_t)l * (size_t)n_expert + (size_t)e;
                if (pass == 0) std::snprintf(num, sizeof num, "%s%llu", e ? "," : "", (unsigned long long)count[i]);
                else std::snprintf(num, sizeof num, "%s%.9g", e ? "," : "", weight[i]);
                out += num;
            }
            out += "]";
        }
        out += "]";
    }
    return out + "}\n";
}
MOE_DETAIL_MEMBER Status ExpertStats::write(const char* path) const {
    if (!path) return detail::fail(Status::invalid_argument, "null path");
    const size_t len = std::strlen(path);
    const bool json = len >= 5 && std::strcmp(path + len - 5, ".json") == 0;
    const std::string text = json ? to_json() : to_csv();
    return detail::write_whole_file(path, text.data(), text.size());
}

MOE_DETAIL_MEMBER double PredictionStats::recall(int target, int depth) const {
    if (target < 0 || target >= n_layer || depth < 1 || depth > max_depth) return 0;
    const size_t i = (size_t)target * (size_t)max_depth + (size_t)(depth - 1);
    return routed[i] ? (double)correct[i] / (double)routed[i] : 0;
}
MOE_DETAIL_MEMBER double PredictionStats::precision(int target, int depth) const {
    if (target < 0 || target >= n_layer || depth < 1 || depth > max_depth) return 0;
    const size_t i = (size_t)target * (size_t)max_depth + (size_t)(depth - 1);
    return predicted[i] ? (double)correct[i] / (double)predicted[i] : 0;
}
MOE_DETAIL_MEMBER double PredictionStats::recall(int depth) const {
    uint64_t c = 0, n = 0;
    for (int l = 0; depth >= 1 && depth <= max_depth && l < n_layer; ++l) {
        c += correct[(size_t)l * (size_t)max_depth + (size_t)(depth - 1)];
        n += routed[(size_t)l * (size_t)max_depth + (size_t)(depth - 1)];
    }
    return n ? (double)c / (double)n : 0;
}
MOE_DETAIL_MEMBER double PredictionStats::precision(int depth) const {
    uint64_t c = 0, n = 0;
    for (int l = 0; depth >= 1 && depth <= max_depth && l < n_layer; ++l) {
        c += correct[(size_t)l * (size_t)max_depth + (size_t)(depth - 1)];
        n += predicted[(size_t)l * (size_t)max_depth + (size_t)(depth - 1)];
    }
    return n ? (double)c / (double)n : 0;
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] SAMPLER IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>sampler  Chain order as llama.cpp's default sampler list (see SamplerOptions). Probabilities
// are computed in double from max-subtracted logits. The RNG is xoshiro256** seeded through
// splitmix64, so a seed means the same stream everywhere; XTC draws from it only when enabled.

namespace moe {
namespace detail {

// The code points a UTF-8 sequence of `len` bytes may encode (shorter forms and surrogates are
// invalid UTF-8: a token spelling '{' as E0 81 BB must not pass for '{').
inline bool utf8_valid_code_point(uint32_t cp, size_t len) {
    return len == 1 ? cp < 0x80 : len == 2 ? cp >= 0x80 && cp < 0x800 : len == 3 ? cp >= 0x800 && cp < 0x10000 && (cp < 0xD800 || cp > 0xDFFF)
                                                                   : cp >= 0x10000 && cp <= 0x10FFFF;
}
inline void utf8_clamp_range(size_t len, uint32_t* lo, uint32_t* hi) {
    *lo = std::max(*lo, len == 2 ? 0x80u : len == 3 ? 0x800u : 0x10000u);
    *hi = std::min(*hi, len == 2 ? 0x7FFu : len == 3 ? 0xFFFFu : 0x10FFFFu);
}

// Bounds against hostile grammars: rules after desugaring, and the recognizer's parse stacks (how
// many ways the text so far can be read, and how deep each is). Legitimate grammars (JSON, lists,
// code) stay far below: tens of stacks, tens of frames.
constexpr size_t kMaxGrammarRules = 20000, kMaxGrammarStacks = 2048, kMaxGrammarDepth = 512;

struct GrammarElement {
    bool is_rule = false;   // a reference to rules[rule]; else a character class
    bool negated = false;   // [^...]
    int32_t rule = -1;
    std::vector<std::pair<uint32_t, uint32_t>> ranges;  // inclusive code-point ranges
    bool matches(uint32_t c) const {
        bool in = false;
        for (const auto& r : ranges) in = in || (c >= r.first && c <= r.second);
        return in != negated;
    }
    // Whether some code point in [lo, hi] matches (for a token that ends inside a UTF-8 sequence).
    bool matches_some(uint32_t lo, uint32_t hi) const {
        if (negated) {
            for (const auto& r : ranges)
                if (r.first <= lo && r.second >= hi) return false;
            return true;
        }
        for (const auto& r : ranges)
            if (r.first <= hi && r.second >= lo) return true;
        return false;
    }
};
typedef std::vector<GrammarElement> GrammarSequence;

struct Grammar {
    std::vector<std::vector<GrammarSequence>> rules;  // rule -> alternatives
    std::vector<std::string> names;
    int32_t root = -1;
};

// Recursive-descent GBNF parser. Repetitions become helper rules (x* -> r ::= x r | ; x+ -> x x*;
// x? -> r ::= x | ; x{m,n} -> m copies then optional ones).
class GbnfParser {
public:
    explicit GbnfParser(const std::string& src) : s_(src) {}
    Status parse(Grammar* g) {
        g_ = g;
        skip_space(true);
        while (p_ < s_.size()) {
            const std::string name = parse_name();
            if (name.empty()) return error("expected a rule name");
            skip_space(false);
            if (s_.compare(p_, 3, "::=") != 0) return error("expected '::=' after '" + name + "'");
            p_ += 3;
            const int32_t id = rule_id(name);
            if (defined_.size() <= (size_t)id) defined_.resize((size_t)id + 1, false);
            if (defined_[(size_t)id]) return error("rule '" + name + "' is defined twice");
            defined_[(size_t)id] = true;
            std::vector<GrammarSequence> alts;
            if (!parse_alternatives(&alts, false)) return status_;
            g_->rules[(size_t)id] = std::move(alts);
            if (g_->rules.size() > kMaxGrammarRules) return error("more than " + std::to_string(kMaxGrammarRules) + " rules (with repetitions)");
            skip_space(true);
        }
        for (size_t i = 0; i < g_->names.size(); ++i)
            if (!(i < defined_.size() && defined_[i]) && !helper_[i]) return fail(Status::invalid_argument, "grammar: rule '%s' is used but not defined", g_->names[i].c_str());
        const auto root = std::find(g_->names.begin(), g_->names.end(), "root");
        if (root == g_->names.end()) return fail(Status::invalid_argument, "grammar: no 'root' rule");
        g_->root = (int32_t)(root - g_->names.begin());
        return check_left_recursion();
    }

private:
    Status error(const std::string& what) {
        size_t line = 1;
        for (size_t i = 0; i < p_ && i < s_.size(); ++i) line += s_[i] == '\n';
        status_ = fail(Status::invalid_argument, "grammar line %zu: %s", line, what.c_str());
        return status_;
    }
    // Spaces and comments; newlines too when `newlines` (between rules, or inside parentheses).
    void skip_space(bool newlines) {
        while (p_ < s_.size()) {
            const char c = s_[p_];
            if (c == '#') { while (p_ < s_.size() && s_[p_] != '\n') ++p_; }
            else if (c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n')) ++p_;
            else break;
        }
    }
    std::string parse_name() {
        const size_t b = p_;
        while (p_ < s_.size() && (std::isalnum((unsigned char)s_[p_]) || s_[p_] == '-' || s_[p_] == '_')) ++p_;
        return s_.substr(b, p_ - b);
    }
    int32_t rule_id(const std::string& name) {
        const auto it = ids_.find(name);
        if (it != ids_.end()) return it->second;
        const int32_t id = (int32_t)g_->names.size();
        ids_.emplace(name, id);
        g_->names.push_back(name);
        g_->rules.emplace_back();
        helper_.push_back(false);
        return id;
    }
    int32_t new_helper(std::vector<GrammarSequence> alts) {
        const int32_t id = rule_id("(group " + std::to_string(g_->names.size()) + ")");  // not a GBNF name: no clash
        helper_[(size_t)id] = true;
        g_->rules[(size_t)id] = std::move(alts);
        return id;
    }
    static GrammarElement ref(int32_t rule) {
        GrammarElement e;
        e.is_rule = true;
        e.rule = rule;
        return e;
    }
    // One UTF-8 code point or escape of a literal or class; false at a bad escape.
    bool parse_char(uint32_t* out) {
        if (p_ >= s_.size()) return false;
        const unsigned char c = (unsigned char)s_[p_];
        if (c == '\\') {
            if (++p_ >= s_.size()) return false;
            const char e = s_[p_++];
            switch (e) {
                case 'n': *out = '\n'; return true;
                case 't': *out = '\t'; return true;
                case 'r': *out = '\r'; return true;
                case '\\': case '"': case '[': case ']': case '-': case '^': *out = (uint32_t)e; return true;
                case 'x': case 'u': case 'U': {
                    const int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                    uint32_t v = 0;
                    for (int i = 0; i < digits; ++i, ++p_) {
                        if (p_ >= s_.size() || !std::isxdigit((unsigned char)s_[p_])) return false;
                        const char h = s_[p_];
                        v = v * 16 + (uint32_t)(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
                    }
                    if (v > 0x10FFFF) return false;
                    *out = v;
                    return true;
                }
                default: return false;
            }
        }
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || p_ + len > s_.size()) return false;
        uint32_t v = len == 1 ? c : c & (0x7F >> len);
        for (size_t i = 1; i < len; ++i) {
            const unsigned char cc = (unsigned char)s_[p_ + i];
            if ((cc & 0xC0) != 0x80) return false;
            v = (v << 6) | (cc & 0x3F);
        }
        if (!utf8_valid_code_point(v, len)) return false;
        p_ += len;
        *out = v;
        return true;
    }
    bool parse_alternatives(std::vector<GrammarSequence>* alts, bool nested) {
        for (;;) {
            GrammarSequence seq;
            if (!parse_sequence(&seq, nested)) return false;
            alts->push_back(std::move(seq));
            skip_space(nested);
            if (p_ < s_.size() && s_[p_] == '|') { ++p_; skip_space(true); continue; }
            return true;
        }
    }
    bool parse_sequence(GrammarSequence* seq, bool nested) {
        for (;;) {
            skip_space(nested);
            if (p_ >= s_.size() || s_[p_] == '|' || s_[p_] == ')' || s_[p_] == '\n') {
                if (p_ < s_.size() && s_[p_] == ')' && !nested) { error("unmatched ')'"); return false; }
                return true;
            }
            if (++depth_ > 256) { error("nesting too deep"); return false; }
            GrammarSequence item;  // one primary: a literal's characters, or one element
            const char c = s_[p_];
            if (c == '"') {
                ++p_;
                while (p_ < s_.size() && s_[p_] != '"') {
                    uint32_t ch;
                    if (!parse_char(&ch)) { error("bad character or escape in a string"); return false; }
                    GrammarElement e;
                    e.ranges.push_back({ch, ch});
                    item.push_back(e);
                }
                if (p_ >= s_.size()) { error("unterminated string"); return false; }
                ++p_;
            } else if (c == '[') {
                ++p_;
                GrammarElement e;
                if (p_ < s_.size() && s_[p_] == '^') { e.negated = true; ++p_; }
                while (p_ < s_.size() && s_[p_] != ']') {
                    uint32_t lo, hi;
                    if (!parse_char(&lo)) { error("bad character or escape in a class"); return false; }
                    hi = lo;
                    if (p_ + 1 < s_.size() && s_[p_] == '-' && s_[p_ + 1] != ']') {
                        ++p_;
                        if (!parse_char(&hi) || hi < lo) { error("bad range in a class"); return false; }
                    }
                    e.ranges.push_back({lo, hi});
                }
                if (p_ >= s_.size()) { error("unterminated character class"); return false; }
                ++p_;
                item.push_back(e);
            } else if (c == '.') {
                ++p_;
                GrammarElement e;
                e.negated = true;  // no ranges, negated: any code point
                item.push_back(e);
            } else if (c == '(') {
                ++p_;
                skip_space(true);
                std::vector<GrammarSequence> alts;
                if (!parse_alternatives(&alts, true)) return false;
                skip_space(true);
                if (p_ >= s_.size() || s_[p_] != ')') { error("expected ')'"); return false; }
                ++p_;
                item.push_back(ref(new_helper(std::move(alts))));
            } else if (std::isalnum((unsigned char)c) || c == '-' || c == '_') {
                const size_t at = p_;
                const std::string name = parse_name();
                skip_space(false);
                if (s_.compare(p_, 3, "::=") == 0) { p_ = at; error("missing newline before rule '" + name + "'"); return false; }
                item.push_back(ref(rule_id(name)));
            } else {
                error(std::string("unexpected character '") + c + "'");
                return false;
            }
            --depth_;
            if (!parse_repetition(item, seq)) return false;
        }
    }
    // Appends `item` to seq, repeated as a following *, +, ?, {m}, {m,}, {m,n} says.
    bool parse_repetition(const GrammarSequence& item, GrammarSequence* seq) {
        const char op = p_ < s_.size() ? s_[p_] : 0;
        if (op != '*' && op != '+' && op != '?' && op != '{') {
            seq->insert(seq->end(), item.begin(), item.end());
            return true;
        }
        ++p_;
        long lo = 0, hi = -1;  // -1: unbounded
        if (op == '+') lo = 1;
        else if (op == '?') hi = 1;
        else if (op == '{') {
            auto number = [&](long* v) {
                skip_space(false);
                const size_t b = p_;
                while (p_ < s_.size() && std::isdigit((unsigned char)s_[p_]) && p_ - b < 6) ++p_;
                if (p_ == b) return false;
                *v = std::atol(s_.substr(b, p_ - b).c_str());
                skip_space(false);
                return true;
            };
            if (!number(&lo)) { error("expected a number after '{'"); return false; }
            hi = lo;
            if (p_ < s_.size() && s_[p_] == ',') {
                ++p_;
                skip_space(false);
                hi = -1;
                if (p_ < s_.size() && s_[p_] != '}' && !number(&hi)) { error("expected a number or '}'"); return false; }
            }
            if (p_ >= s_.size() || s_[p_] != '}') { error("expected '}'"); return false; }
            ++p_;
            if ((hi >= 0 && hi < lo) || lo > 1000 || hi > 1000) { error("bad repetition bounds (at most 1000)"); return false; }
        }
        if (item.empty()) return true;  // "" repeated is still nothing
        const GrammarElement one = item.size() == 1 ? item[0] : ref(new_helper({item}));
        for (long i = 0; i < lo; ++i) seq->push_back(one);
        if (hi < 0) {  // r ::= one r |
            const int32_t id = new_helper({});
            g_->rules[(size_t)id] = {{one, ref(id)}, {}};
            seq->push_back(ref(id));
        } else {  // t_k ::= one t_(k-1) | : at most hi - lo more
            int32_t tail = -1;
            for (long i = lo; i < hi; ++i) {
                GrammarSequence more{one};
                if (tail >= 0) more.push_back(ref(tail));
                tail = new_helper({more, {}});
            }
            if (tail >= 0) seq->push_back(ref(tail));
        }
        return true;
    }
    // Left recursion would make the recognizer expand forever: refused up front.
    Status check_left_recursion() {
        const size_t n = g_->rules.size();
        std::vector<uint8_t> nullable(n, 0);
        for (bool changed = true; changed;) {
            changed = false;
            for (size_t r = 0; r < n; ++r) {
                if (nullable[r]) continue;
                for (const GrammarSequence& alt : g_->rules[r]) {
                    bool all = true;
                    for (const GrammarElement& e : alt) all = all && e.is_rule && nullable[(size_t)e.rule];
                    if (all) { nullable[r] = 1; changed = true; break; }
                }
            }
        }
        // Depth-first over "can start with" edges, with an explicit stack (a chain of 10^5 rules
        // must not overflow the call stack): a rule reached again while on the path is left-recursive.
        std::vector<uint8_t> state(n, 0);  // 0 new, 1 on the path, 2 done
        std::vector<std::vector<int32_t>> starts(n);  // rules each rule can begin with
        for (size_t r = 0; r < n; ++r)
            for (const GrammarSequence& alt : g_->rules[r])
                for (const GrammarElement& e : alt) {
                    if (!e.is_rule) break;
                    starts[r].push_back(e.rule);
                    if (!nullable[(size_t)e.rule]) break;
                }
        std::vector<std::pair<size_t, size_t>> path;  // (rule, next edge)
        for (size_t r0 = 0; r0 < n; ++r0) {
            if (state[r0]) continue;
            path.push_back({r0, 0});
            state[r0] = 1;
            while (!path.empty()) {
                auto& top = path.back();
                if (top.second == starts[top.first].size()) {
                    state[top.first] = 2;
                    path.pop_back();
                    continue;
                }
                const size_t next = (size_t)starts[top.first][top.second++];
                if (state[next] == 1) return fail(Status::invalid_argument, "grammar: rule '%s' is left-recursive", g_->names[next].c_str());
                if (state[next] == 0) {
                    state[next] = 1;
                    path.push_back({next, 0});
                }
            }
        }
        return Status::ok;
    }

    const std::string& s_;
    size_t p_ = 0;
    int depth_ = 0;
    Grammar* g_ = nullptr;
    std::vector<bool> defined_, helper_;
    std::unordered_map<std::string, int32_t> ids_;
    Status status_ = Status::ok;
};


// One parse position: the next element of alternative `alt` of `rule`.
struct GrammarFrame {
    int32_t rule, alt, pos;
    bool operator<(const GrammarFrame& o) const { return rule != o.rule ? rule < o.rule : alt != o.alt ? alt < o.alt : pos < o.pos; }
    bool operator==(const GrammarFrame& o) const { return rule == o.rule && alt == o.alt && pos == o.pos; }
};
typedef std::vector<GrammarFrame> GrammarStack;  // return positions below, the current one on top

// The recognizer: every stack whose top is a character class is a way the text so far can go on;
// an empty stack means the text so far is a complete sentence. Tokens are UTF-8 pieces: a piece may
// end inside a code point, whose bytes are carried to the next one.
class GrammarMatcher {
public:
    explicit GrammarMatcher(std::shared_ptr<const Grammar> g) : g_(std::move(g)) { reset(); }
    void reset() {
        stacks_.clear();
        partial_.clear();
        bool ok = true;
        for (int32_t a = 0; a < (int32_t)g_->rules[(size_t)g_->root].size(); ++a) ok = ok && expand({{g_->root, a, 0}}, &stacks_);
        if (!ok) stacks_.clear();  // beyond the bounds: nothing is allowed (check_sampler_options says why)
        dedupe(&stacks_);
    }
    bool dead() const { return stacks_.empty(); }
    bool complete() const {
        for (const GrammarStack& s : stacks_)
            if (s.empty()) return true;
        return false;
    }
    // Whether `piece` can follow (it may end inside a code point); with `commit`, moves there.
    bool accept(const std::string& piece, bool commit) {
        std::vector<GrammarStack> cur, next;
        const std::vector<GrammarStack>* from = &stacks_;  // copied only as far as a code point matches
        const std::string bytes = partial_ + piece;
        size_t i = 0;
        while (i < bytes.size()) {
            const unsigned char c = (unsigned char)bytes[i];
            const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
            if (!len) return false;
            if (i + len > bytes.size()) break;  // a code point the next piece completes
            uint32_t cp = len == 1 ? c : c & (0x7Fu >> len);
            for (size_t k = 1; k < len; ++k) {
                const unsigned char cc = (unsigned char)bytes[i + k];
                if ((cc & 0xC0) != 0x80) return false;
                cp = (cp << 6) | (cc & 0x3F);
            }
            if (!utf8_valid_code_point(cp, len)) return false;
            next.clear();
            for (const GrammarStack& s : *from) {
                if (s.empty()) continue;
                const GrammarFrame& f = s.back();
                if (!g_->rules[(size_t)f.rule][(size_t)f.alt][(size_t)f.pos].matches(cp)) continue;
                GrammarStack t = s;
                ++t.back().pos;
                if (!expand(std::move(t), &next)) return false;  // past the bounds: refused
            }
            if (next.empty()) return false;
            dedupe(&next);
            cur.swap(next);
            from = &cur;
            i += len;
        }
        if (i < bytes.size()) {  // an incomplete code point: some stack must accept one it can become
            const unsigned char c = (unsigned char)bytes[i];
            const size_t len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4, have = bytes.size() - i;
            uint32_t lo = c & (0x7Fu >> len);
            for (size_t k = 1; k < have; ++k) {
                if (((unsigned char)bytes[i + k] & 0xC0) != 0x80) return false;
                lo = (lo << 6) | ((unsigned char)bytes[i + k] & 0x3F);
            }
            const size_t missing = len - have;
            uint32_t hi = (lo << (6 * missing)) | ((1u << (6 * missing)) - 1);
            lo <<= 6 * missing;
            utf8_clamp_range(len, &lo, &hi);
            if (lo > hi) return false;
            bool some = false;
            for (const GrammarStack& s : *from)
                if (!s.empty() && g_->rules[(size_t)s.back().rule][(size_t)s.back().alt][(size_t)s.back().pos].matches_some(lo, hi)) some = true;
            if (!some) return false;
        }
        if (commit) {
            if (from != &stacks_) stacks_.swap(cur);
            partial_ = bytes.substr(i);
        }
        return true;
    }

    // ok[b]: whether some piece starting with byte b can follow (false for no byte at all only when a
    // code point is pending: then every byte is let through to accept()). Prunes the vocabulary scan.
    void first_bytes(bool ok[256]) const {
        for (int b = 0; b < 256; ++b) {
            ok[b] = !partial_.empty();
            if (ok[b]) continue;
            uint32_t lo, hi;
            if (b < 0x80) lo = hi = (uint32_t)b;
            else if ((b >> 5) == 6) { lo = (uint32_t)(b & 0x1F) << 6; hi = lo | 0x3F; }
            else if ((b >> 4) == 14) { lo = (uint32_t)(b & 0x0F) << 12; hi = lo | 0xFFF; }
            else if ((b >> 3) == 30) { lo = (uint32_t)(b & 0x07) << 18; hi = lo | 0x3FFFF; }
            else continue;  // a continuation byte or 0xF8.. cannot start a piece
            if (b >= 0x80) utf8_clamp_range(b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4, &lo, &hi);
            if (lo > hi) continue;
            for (const GrammarStack& st : stacks_)
                if (!st.empty() && g_->rules[(size_t)st.back().rule][(size_t)st.back().alt][(size_t)st.back().pos].matches_some(lo, hi)) { ok[b] = true; break; }
        }
    }

private:
    // Follows rule references until every stack's top is a character class (or the stack is empty).
    // False when the result would pass kMaxGrammarStacks stacks or kMaxGrammarDepth frames.
    bool expand(GrammarStack s, std::vector<GrammarStack>* out, int depth = 0) const {
        for (;;) {
            while (!s.empty() && s.back().pos == (int32_t)g_->rules[(size_t)s.back().rule][(size_t)s.back().alt].size()) s.pop_back();
            if (s.empty() || !g_->rules[(size_t)s.back().rule][(size_t)s.back().alt][(size_t)s.back().pos].is_rule) {
                if (out->size() >= kMaxGrammarStacks) return false;
                out->push_back(std::move(s));
                return true;
            }
            if (depth > (int)kMaxGrammarDepth || s.size() > kMaxGrammarDepth) return false;
            const int32_t rule = g_->rules[(size_t)s.back().rule][(size_t)s.back().alt][(size_t)s.back().pos].rule;
            ++s.back().pos;  // the caller resumes after the reference; a finished caller is dropped (tail call)
            while (!s.empty() && s.back().pos == (int32_t)g_->rules[(size_t)s.back().rule][(size_t)s.back().alt].size()) s.pop_back();
            const int32_t n_alt = (int32_t)g_->rules[(size_t)rule].size();
            for (int32_t a = 0; a + 1 < n_alt; ++a) {
                GrammarStack t = s;
                t.push_back({rule, a, 0});
                if (!expand(std::move(t), out, depth + 1)) return false;
            }
            if (n_alt == 0) return true;
            s.push_back({rule, n_alt - 1, 0});
            ++depth;
        }
    }
    static void dedupe(std::vector<GrammarStack>* v) {
        std::sort(v->begin(), v->end());
        v->erase(std::unique(v->begin(), v->end()), v->end());
    }
    std::shared_ptr<const Grammar> g_;
    std::vector<GrammarStack> stacks_;
    std::string partial_;
};

inline Status parse_gbnf(const std::string& src, std::shared_ptr<const Grammar>* out) {
    auto g = std::make_shared<Grammar>();
    GbnfParser parser(src);
    Status s = parser.parse(g.get());
    if (s != Status::ok) return s;
    *out = std::move(g);
    return Status::ok;
}


// What a grammar needs of the vocabulary: each token's bytes and whether it ends generation.
struct SamplerVocab {
    std::vector<std::string> pieces;
    std::vector<uint8_t> end_of_generation;
};
}  // namespace detail

MOE_API Status check_sampler_options(const SamplerOptions& o, int32_t n_vocab) {
    auto bad = [](const char* what) { return detail::fail(Status::invalid_argument, "sampler option %s is out of range", what); };
    auto finite = [](float v) { return std::isfinite(v); };
    if (!finite(o.temperature)) return bad("temperature (not finite)");
    if (o.top_k < 0) return bad("top_k (< 0)");
    if (!(o.top_p > 0 && o.top_p <= 1)) return bad("top_p (not in (0, 1])");
    if (!(o.min_p >= 0 && o.min_p <= 1)) return bad("min_p (not in [0, 1])");
    if (!(o.typical_p > 0 && o.typical_p <= 1)) return bad("typical_p (not in (0, 1])");
    if (!finite(o.top_n_sigma)) return bad("top_n_sigma (not finite)");
    if (!(o.repeat_penalty > 0) || !finite(o.repeat_penalty)) return bad("repeat_penalty (not > 0)");
    if (!finite(o.frequency_penalty) || !finite(o.presence_penalty)) return bad("frequency_penalty / presence_penalty (not finite)");
    if (o.repeat_last_n < 0 || o.repeat_last_n > (1 << 20)) return bad("repeat_last_n (not in [0, 1048576])");
    if (!(o.xtc_probability >= 0 && o.xtc_probability <= 1)) return bad("xtc_probability (not in [0, 1])");
    if (!(o.xtc_threshold >= 0 && o.xtc_threshold <= 1)) return bad("xtc_threshold (not in [0, 1])");
    if (!(o.dry_multiplier >= 0) || !finite(o.dry_multiplier)) return bad("dry_multiplier (not >= 0)");
    if (!(o.dry_base >= 1) || !finite(o.dry_base)) return bad("dry_base (not >= 1)");
    if (o.dry_allowed_length < 1) return bad("dry_allowed_length (< 1)");
    if (o.dry_last_n < 0 || o.dry_last_n > (1 << 20)) return bad("dry_last_n (not in [0, 1048576])");
    if (o.mirostat != 0 && o.mirostat != 2) return bad("mirostat (only 0 = off and 2 = v2)");
    if (!(o.mirostat_tau >= 0) || !finite(o.mirostat_tau) || !(o.mirostat_eta >= 0) || !finite(o.mirostat_eta))
        return bad("mirostat_tau / mirostat_eta (not >= 0)");
    if (!o.grammar.empty()) {
        std::shared_ptr<const detail::Grammar> g;
        Status s = detail::parse_gbnf(o.grammar, &g);
        if (s != Status::ok) return s;
        if (detail::GrammarMatcher(g).dead())
            return detail::fail(Status::invalid_argument, "grammar: its start has more than %zu readings or nests deeper than %zu rules",
                                detail::kMaxGrammarStacks, detail::kMaxGrammarDepth);
    }
    for (const auto& lb : o.logit_bias) {
        if (std::isnan(lb.second)) return bad("logit_bias (NaN bias)");
        if (lb.first < 0 || (n_vocab > 0 && lb.first >= n_vocab))
            return detail::fail(Status::invalid_argument, "logit_bias token %d is not in the vocabulary (0..%d)", (int)lb.first, (int)n_vocab - 1);
    }
    return Status::ok;
}

MOE_DETAIL_MEMBER Sampler::Sampler(const SamplerOptions& options) : options_(options) {
    options_.repeat_last_n = std::min(std::max(0, options_.repeat_last_n), 1 << 20);
    options_.dry_last_n = std::min(std::max(0, options_.dry_last_n), 1 << 20);
    options_.dry_allowed_length = std::max(1, options_.dry_allowed_length);
    std::shared_ptr<const detail::Grammar> g;
    if (!options_.grammar.empty() && detail::parse_gbnf(options_.grammar, &g) == Status::ok) grammar_.reset(new detail::GrammarMatcher(g));
    reset();
}
MOE_DETAIL_MEMBER Sampler::Sampler(const Sampler& o)
    : options_(o.options_), history_(o.history_), history_pos_(o.history_pos_), history_len_(o.history_len_), mirostat_mu_(o.mirostat_mu_),
      breaker_(o.breaker_), grammar_(o.grammar_ ? new detail::GrammarMatcher(*o.grammar_) : nullptr), vocab_(o.vocab_),
      grammar_pending_(o.grammar_pending_) {
    std::memcpy(rng_state_, o.rng_state_, sizeof rng_state_);
    scratch_.reserve(o.scratch_.capacity());
    scratch2_.reserve(o.scratch2_.capacity());
}
MOE_DETAIL_MEMBER Sampler& Sampler::operator=(const Sampler& o) {
    if (this != &o) {
        Sampler copy(o);
        *this = std::move(copy);
    }
    return *this;
}
MOE_DETAIL_MEMBER Sampler::Sampler(Sampler&&) noexcept = default;
MOE_DETAIL_MEMBER Sampler& Sampler::operator=(Sampler&&) noexcept = default;
MOE_DETAIL_MEMBER Sampler::~Sampler() = default;

MOE_DETAIL_MEMBER bool Sampler::grammar_complete() const { return grammar_ && grammar_->complete(); }

MOE_DETAIL_MEMBER bool Sampler::grammar_allows(int32_t token) const {
    if (!grammar_ || !vocab_) return true;
    if (token < 0 || (size_t)token >= vocab_->pieces.size()) return false;
    if (vocab_->end_of_generation[(size_t)token]) return grammar_->complete();
    const std::string& piece = vocab_->pieces[(size_t)token];
    return !piece.empty() && grammar_->accept(piece, false);
}

// The logits with every token the grammar refuses at -inf (a copy; the caller's are left alone).
MOE_DETAIL_MEMBER const float* Sampler::apply_grammar(const float* logits, int32_t n_vocab) {
    masked_.assign(logits, logits + n_vocab);
    bool first_ok[256];
    grammar_->first_bytes(first_ok);
    const bool complete = grammar_->complete();
    for (int32_t t = 0; t < n_vocab; ++t) {
        const bool eog = (size_t)t < vocab_->end_of_generation.size() && vocab_->end_of_generation[(size_t)t];
        const std::string* piece = (size_t)t < vocab_->pieces.size() ? &vocab_->pieces[(size_t)t] : nullptr;
        const bool ok = eog ? complete : piece && !piece->empty() && first_ok[(unsigned char)(*piece)[0]] && grammar_->accept(*piece, false);
        if (!ok) masked_[(size_t)t] = -INFINITY;
    }
    return masked_.data();
}

MOE_DETAIL_MEMBER void Sampler::reset() {
    uint64_t z = options_.seed;
    for (uint64_t& s : rng_state_) {  // splitmix64
        z += 0x9e3779b97f4a7c15ull;
        uint64_t t = z;
        t = (t ^ (t >> 30)) * 0xbf58476d1ce4e5b9ull;
        t = (t ^ (t >> 27)) * 0x94d049bb133111ebull;
        s = t ^ (t >> 31);
    }
    const int keep = std::max(options_.repeat_last_n, options_.dry_multiplier > 0 ? options_.dry_last_n : 0);
    history_.assign((size_t)keep, -1);
    history_pos_ = history_len_ = 0;
    if (grammar_) grammar_->reset();
    grammar_pending_ = -1;
    scratch_.reserve((size_t)keep);  // the penalties' and DRY's window copies never grow while decoding
    scratch2_.reserve((size_t)keep);
    mirostat_mu_ = 2 * options_.mirostat_tau;
}

MOE_DETAIL_MEMBER void Sampler::save_state(std::vector<uint8_t>* out) const {
    if (!out) return;
    out->clear();
    detail::ByteWriter w(out);
    w.put<uint32_t>(0x4c504d53u);  // "SMPL"
    for (uint64_t v : rng_state_) w.put(v);
    w.put<uint64_t>(history_.size());
    w.put<uint64_t>(history_pos_);
    w.put<uint64_t>(history_len_);
    for (int32_t t : history_) w.put(t);
    w.put(mirostat_mu_);
}

MOE_DETAIL_MEMBER Status Sampler::load_state(const uint8_t* data, size_t size) {
    detail::ByteReader r(data, size);
    uint32_t magic = 0;
    uint64_t rng[4], cap = 0, pos = 0, len = 0;
    if (!r.get(&magic) || magic != 0x4c504d53u || !r.get(&rng[0]) || !r.get(&rng[1]) || !r.get(&rng[2]) || !r.get(&rng[3]) || !r.get(&cap) ||
        !r.get(&pos) || !r.get(&len))
        return detail::fail(Status::invalid_argument, "not a sampler state");
    if (cap != history_.size())
        return detail::fail(Status::invalid_argument, "sampler state keeps %llu history tokens, this sampler's options %zu", (unsigned long long)cap, history_.size());
    if ((cap && (pos >= cap || len > cap)) || (!cap && (pos || len))) return detail::fail(Status::invalid_argument, "corrupt sampler state");
    std::vector<int32_t> hist((size_t)cap);
    for (int32_t& t : hist)
        if (!r.get(&t)) return detail::fail(Status::invalid_argument, "truncated sampler state");
    float mu = 0;
    if (!r.get(&mu) || !r.at_end()) return detail::fail(Status::invalid_argument, "sampler state has the wrong size");
    std::memcpy(rng_state_, rng, sizeof rng_state_);
    history_.swap(hist);
    history_pos_ = (size_t)pos;
    history_len_ = (size_t)len;
    mirostat_mu_ = mu;
    if (grammar_) grammar_->reset();
    grammar_pending_ = -1;
    return Status::ok;
}

MOE_DETAIL_MEMBER double Sampler::next_uniform() {
    uint64_t* s = rng_state_;
    uint64_t x = s[1] * 5;
    uint64_t result = ((x << 7) | (x >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

MOE_DETAIL_MEMBER void Sampler::accept(int32_t token) {
    if (grammar_ && vocab_ && token == grammar_pending_ && token >= 0 && (size_t)token < vocab_->pieces.size() &&
        !vocab_->end_of_generation[(size_t)token])
        grammar_->accept(vocab_->pieces[(size_t)token], true);
    grammar_pending_ = -1;
    if (history_.empty()) return;
    history_[history_pos_] = token;
    history_pos_ = (history_pos_ + 1) % history_.size();
    history_len_ = std::min(history_len_ + 1, history_.size());
}

MOE_DETAIL_MEMBER void Sampler::set_vocabulary(const Tokenizer& tokenizer) {
    const int32_t n = std::max(0, tokenizer.n_vocab());
    breaker_.assign((size_t)n, 0);
    auto vocab = std::make_shared<detail::SamplerVocab>();
    vocab->pieces.resize((size_t)n);
    vocab->end_of_generation.resize((size_t)n);
    for (int32_t t = 0; t < n; ++t) {
        std::string& piece = vocab->pieces[(size_t)t];
        piece = tokenizer.token_to_piece(t);
        vocab->end_of_generation[(size_t)t] = tokenizer.is_end_of_generation(t);
        for (const std::string& b : options_.dry_sequence_breakers)
            if (!b.empty() && piece.find(b) != std::string::npos) { breaker_[(size_t)t] = 1; break; }
    }
    vocab_ = std::move(vocab);
}

// Repetition, frequency and presence penalties over the last repeat_last_n tokens, once per
// distinct token (counts from a sorted copy of the window).
MOE_DETAIL_MEMBER void Sampler::apply_penalties(int32_t n_vocab) {
    const SamplerOptions& o = options_;
    if (o.repeat_last_n == 0 || (o.repeat_penalty == 1.f && o.frequency_penalty == 0.f && o.presence_penalty == 0.f)) return;
    const size_t n = std::min(history_len_, (size_t)o.repeat_last_n), cap = history_.size();
    scratch_.clear();
    for (size_t k = 1; k <= n; ++k) scratch_.push_back(history_[(history_pos_ + cap - k) % cap]);
    std::sort(scratch_.begin(), scratch_.end());
    for (size_t i = 0; i < scratch_.size();) {
        size_t j = i;
        while (j < scratch_.size() && scratch_[j] == scratch_[i]) ++j;
        const int32_t tok = scratch_[i];
        if (tok >= 0 && tok < n_vocab) {
            float& lg = candidates_[(size_t)tok].logit;
            lg = lg <= 0 ? lg * o.repeat_penalty : lg / o.repeat_penalty;
            lg -= (float)(j - i) * o.frequency_penalty + o.presence_penalty;
        }
        i = j;
    }
}

// DRY: the reversed window r (r[0] = the last token) up to the first sequence breaker; the Z array
// of r gives, for each earlier position, how many tokens before it repeat the window's end; the
// token that followed there would extend that repeat.
MOE_DETAIL_MEMBER void Sampler::apply_dry(int32_t n_vocab) {
    const SamplerOptions& o = options_;
    if (o.dry_multiplier <= 0 || o.dry_last_n == 0) return;
    const size_t n = std::min(history_len_, (size_t)o.dry_last_n), cap = history_.size();
    if (n < 2) return;
    auto is_breaker = [&](int32_t t) { return t >= 0 && (size_t)t < breaker_.size() && breaker_[(size_t)t]; };
    std::vector<int32_t>& r = scratch_;
    std::vector<int32_t>& z = scratch2_;
    r.resize(n);
    for (size_t k = 0; k < n; ++k) r[k] = history_[(history_pos_ + cap - 1 - k) % cap];
    size_t tail = 0;  // tokens at the end before a breaker: no repeat may reach past it
    while (tail < n && !is_breaker(r[tail])) ++tail;
    if (tail == 0) return;
    z.assign(n, 0);
    for (size_t i = 1, left = 0, right = 0; i < n; ++i) {  // Z algorithm: z[i] = longest common prefix of r and r[i..]
        size_t len = i < right ? std::min(right - i, (size_t)z[i - left]) : 0;
        while (i + len < n && r[len] == r[i + len]) ++len;
        z[i] = (int32_t)len;
        if (i + len > right) { left = i; right = i + len; }
    }
    dry_penalty_.assign((size_t)n_vocab, 0.f);
    bool any = false;
    // r[i] ends a sequence that repeats the last z[i] tokens; the token after it is r[i - 1].
    for (size_t i = 1; i < n; ++i) {
        const size_t len = std::min((size_t)z[i], tail);
        const int32_t next = r[i - 1];
        if (len < (size_t)o.dry_allowed_length || next < 0 || next >= n_vocab) continue;
        const double exponent = std::min<double>((double)(len - (size_t)o.dry_allowed_length), 4096.0);
        const double penalty = std::min<double>((double)o.dry_multiplier * std::pow((double)o.dry_base, exponent), 3.0e38);
        float& p = dry_penalty_[(size_t)next];
        if ((float)penalty > p) { p = (float)penalty; any = true; }
    }
    if (!any) return;
    for (int32_t t = 0; t < n_vocab; ++t) candidates_[(size_t)t].logit -= dry_penalty_[(size_t)t];
}

// Everything before the draw; returns how many candidates survive, sorted most likely first in
// candidates_[0, n) with their (untempered, unnormalised) probabilities in probs_ - except with
// temperature <= 0 (returns 1: the argmax) and mirostat (returns the truncated set, probs_ at
// temperature). draw_steps: also the steps that use the RNG (XTC).
MOE_DETAIL_MEMBER size_t Sampler::filter(int32_t n_vocab, const float* logits, bool draw_steps) {
    const SamplerOptions& o = options_;
    candidates_.resize((size_t)n_vocab);
    probs_.reserve((size_t)n_vocab);  // sized once: later steps only shrink within these
    scratch_.reserve(std::max(scratch_.capacity(), (size_t)n_vocab));
    if (o.dry_multiplier > 0) dry_penalty_.reserve((size_t)n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) candidates_[(size_t)i] = Candidate{logits[i], i};
    for (const auto& lb : o.logit_bias)
        if (lb.first >= 0 && lb.first < n_vocab) candidates_[(size_t)lb.first].logit += lb.second;
    apply_penalties(n_vocab);
    apply_dry(n_vocab);
    auto better = [](const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
    // Tokens at +inf (a +inf logit bias) are the only candidates, as equals; tokens at -inf (a
    // grammar's refusals, a -inf bias) are out, unless nothing else is left.
    const size_t forced = (size_t)(std::partition(candidates_.begin(), candidates_.end(), [](const Candidate& c) { return c.logit == INFINITY; }) -
                                   candidates_.begin());
    if (forced > 0) {
        candidates_.resize(forced);
        for (Candidate& c : candidates_) c.logit = 0;
    }
    size_t live = (size_t)(std::partition(candidates_.begin(), candidates_.end(), [](const Candidate& c) { return c.logit != -INFINITY; }) -
                           candidates_.begin());
    if (live == 0) live = candidates_.size();
    candidates_.resize(live);
    if (o.temperature <= 0) {
        candidates_[0] = *std::min_element(candidates_.begin(), candidates_.end(), better);
        probs_.assign(1, 1.0);
        return 1;
    }
    size_t n = candidates_.size();
    auto probabilities = [&](size_t count, double temperature) {  // probs_[0, count) of the sorted prefix
        const double max_logit = candidates_[0].logit;
        probs_.resize(count);
        double sum = 0;
        for (size_t i = 0; i < count; ++i) sum += probs_[i] = std::exp(((double)candidates_[i].logit - max_logit) / temperature);
        return sum;
    };
    if (o.mirostat == 2) {
        std::sort(candidates_.begin(), candidates_.end(), better);
        const double sum = probabilities(n, o.temperature);
        size_t keep = 0;  // tokens whose surprise -log2 p is at most mu (at least one)
        while (keep < n && -std::log2(probs_[keep] / sum) <= (double)mirostat_mu_) ++keep;
        n = std::max<size_t>(1, keep);
        probs_.resize(n);
        return n;
    }
    if (o.top_n_sigma > 0) {  // over the finite logits
        double max_logit = -INFINITY, sum = 0, sum2 = 0;
        size_t finite = 0;
        for (const Candidate& c : candidates_)
            if (std::isfinite(c.logit)) { max_logit = std::max(max_logit, (double)c.logit); sum += c.logit; ++finite; }
        if (finite > 0) {
            const double mean = sum / (double)finite;
            for (const Candidate& c : candidates_)
                if (std::isfinite(c.logit)) sum2 += ((double)c.logit - mean) * ((double)c.logit - mean);
            const double floor = max_logit - (double)o.top_n_sigma * std::sqrt(sum2 / (double)finite);
            n = (size_t)(std::partition(candidates_.begin(), candidates_.end(), [&](const Candidate& c) { return (double)c.logit >= floor; }) -
                         candidates_.begin());
            n = std::max<size_t>(1, n);
        }
    }
    if (o.top_k > 0 && (size_t)o.top_k < n) {
        std::partial_sort(candidates_.begin(), candidates_.begin() + o.top_k, candidates_.begin() + (ptrdiff_t)n, better);
        n = (size_t)o.top_k;
    } else {
        std::sort(candidates_.begin(), candidates_.begin() + (ptrdiff_t)n, better);
    }
    double sum = probabilities(n, 1.0);
    if (o.typical_p < 1.f && n > 1) {
        // Keep the tokens whose surprise is closest to the entropy until their mass reaches typical_p.
        double entropy = 0;
        for (size_t i = 0; i < n; ++i) {
            const double p = probs_[i] / sum;
            if (p > 0) entropy -= p * std::log(p);
        }
        std::vector<int32_t>& order = scratch_;
        order.resize(n);
        for (size_t i = 0; i < n; ++i) order[i] = (int32_t)i;
        auto shift = [&](int32_t i) { return std::fabs(-std::log(probs_[(size_t)i] / sum) - entropy); };
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {  // stable by rank; std::stable_sort would allocate
            const double sa = shift(a), sb = shift(b);
            return sa < sb || (sa == sb && a < b);
        });
        double cum = 0;
        size_t keep = n;
        for (size_t k = 0; k < n; ++k) {
            cum += probs_[(size_t)order[k]] / sum;
            if (cum >= o.typical_p) { keep = k + 1; break; }
        }
        if (keep < n) {
            std::sort(order.begin(), order.begin() + (ptrdiff_t)keep);  // back to logit order
            for (size_t k = 0; k < keep; ++k) candidates_[k] = candidates_[(size_t)order[k]];
            n = keep;
            sum = probabilities(n, 1.0);
        }
    }
    if (o.top_p < 1.f) {
        double cum = 0;
        size_t keep = n;
        for (size_t i = 0; i < n; ++i) {
            cum += probs_[i] / sum;
            if (cum >= o.top_p) { keep = i + 1; break; }
        }
        n = std::max<size_t>(1, keep);
    }
    if (o.min_p > 0) {
        size_t keep = 1;
        while (keep < n && probs_[keep] >= o.min_p * probs_[0]) ++keep;
        n = keep;
    }
    if (draw_steps && o.xtc_probability > 0 && n > 1 && next_uniform() < o.xtc_probability) {
        sum = 0;
        for (size_t i = 0; i < n; ++i) sum += probs_[i];
        size_t above = 0;
        while (above < n && probs_[above] / sum >= o.xtc_threshold) ++above;
        if (above >= 2) {  // drop all but the least likely of them
            candidates_.erase(candidates_.begin(), candidates_.begin() + (ptrdiff_t)(above - 1));
            n -= above - 1;
            probabilities(n, 1.0);
        }
    }
    probs_.resize(n);
    return n;
}

MOE_DETAIL_MEMBER int32_t Sampler::sample(const float* logits, int32_t n_vocab) {
    if (!logits || n_vocab <= 0) return -1;
    if (grammar_ && vocab_) {
        // The chain's own draw first (usually allowed: cheap). Refused: the candidates the chain
        // kept that the grammar allows, if any (their probabilities renormalised); else the chain
        // again on the whole vocabulary with every refused token masked. mirostat's mu moves only
        // with the draw that counts; the RNG draws of a refused try stay used.
        const float mu = mirostat_mu_;
        const size_t n = filter(n_vocab, logits, true);
        const int32_t t = draw(n);
        if (grammar_allows(t)) {
            grammar_pending_ = t;
            return t;
        }
        mirostat_mu_ = mu;
        size_t kept = 0;
        for (size_t i = 0; i < n; ++i)
            if (grammar_allows(candidates_[i].id)) {
                candidates_[kept] = candidates_[i];
                if (i < probs_.size()) probs_[kept] = probs_[i];
                ++kept;
            }
        if (kept > 0 && options_.temperature > 0) {
            grammar_pending_ = draw(kept);
            return grammar_pending_;
        }
        const float* masked = apply_grammar(logits, n_vocab);
        bool any = false;
        for (int32_t i = 0; i < n_vocab && !any; ++i) any = masked[i] != -INFINITY;
        if (!any) return -1;  // the grammar allows nothing here (it cannot end, and no token continues it)
        grammar_pending_ = sample_free(masked, n_vocab);
        return grammar_pending_;
    }
    return sample_free(logits, n_vocab);
}

MOE_DETAIL_MEMBER int32_t Sampler::sample_free(const float* logits, int32_t n_vocab) { return draw(filter(n_vocab, logits, true)); }

// Draws from candidates_[0, n) (sorted, most likely first; filter() left mirostat's probabilities in probs_).
MOE_DETAIL_MEMBER int32_t Sampler::draw(size_t n) {
    if (options_.temperature <= 0) return candidates_[0].id;
    std::vector<double>& p = probs_;
    double sum = 0;
    if (options_.mirostat == 2) {
        for (size_t i = 0; i < n; ++i) sum += p[i];  // at temperature already
    } else {
        const double max_logit = candidates_[0].logit;
        for (size_t i = 0; i < n; ++i) sum += p[i] = std::exp(((double)candidates_[i].logit - max_logit) / options_.temperature);
    }
    double r = next_uniform() * sum;
    size_t pick = n - 1;
    for (size_t i = 0; i < n; ++i) {
        r -= p[i];
        if (r < 0) { pick = i; break; }
    }
    if (options_.mirostat == 2) {  // move mu by eta x (observed surprise - tau)
        const double surprise = -std::log2(p[pick] / sum);
        mirostat_mu_ -= options_.mirostat_eta * (float)(surprise - (double)options_.mirostat_tau);
    }
    return candidates_[pick].id;
}

MOE_DETAIL_MEMBER void Sampler::distribution(const float* logits, int32_t n_vocab, std::vector<std::pair<int32_t, float>>* out) {
    if (!out) return;
    out->clear();
    if (!logits || n_vocab <= 0) return;
    if (grammar_ && vocab_) logits = apply_grammar(logits, n_vocab);
    const size_t n = filter(n_vocab, logits, false);
    if (options_.temperature <= 0) { out->push_back({candidates_[0].id, 1.f}); return; }
    const double max_logit = candidates_[0].logit;
    double sum = 0;
    std::vector<double>& p = probs_;
    if (options_.mirostat != 2)
        for (size_t i = 0; i < n; ++i) p[i] = std::exp(((double)candidates_[i].logit - max_logit) / options_.temperature);
    for (size_t i = 0; i < n; ++i) sum += p[i];
    for (size_t i = 0; i < n; ++i) out->push_back({candidates_[i].id, (float)(p[i] / sum)});
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] GENERATION IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>generate  Prompt, then sample -> stream -> eval one token at a time. Text that could be the
// start of a stop string is held back until it is known not to be one.

namespace moe {

namespace detail {
// One sequence being generated: its sampler, detokenizer and stop-string hold-back.
struct Generation {
    const GenerateOptions& options;
    const Tokenizer& tok;
    GenerateResult& res;
    Sampler sampler;
    Detokenizer detok;
    std::string pending;  // decoded but not yet streamed (possible stop-string prefix)
    int32_t steps = 0;
    bool done = false;

    Generation(const GenerateOptions& o, const Tokenizer& t, GenerateResult& r) : options(o), tok(t), res(r), sampler(o.sampler), detok(t) {
        if ((o.sampler.dry_multiplier > 0 || !o.sampler.grammar.empty()) && t.valid()) sampler.set_vocabulary(t);
    }

    // Streams pending[0, n); false when the callback asks to stop.
    template <typename Emit>
    bool emit(int32_t token, size_t n, Emit&& call) {
        if (n == 0) return true;
        res.text.append(pending, 0, n);
        const bool go_on = call(token, pending.data(), n);
        pending.erase(0, n);
        if (!go_on) res.stopped_by_callback = true;
        return go_on;
    }
    // Samples from `logits` and streams what is safe to show. Returns the token to evaluate next,
    // or -1 when the sequence is done (then finish() has run).
    template <typename Emit>
    int32_t step(const float* logits, int32_t n_vocab, Emit&& call) {
        const int32_t token = sampler.sample(logits, n_vocab);
        if (token < 0) {  // a grammar that allows no token here: the sequence ends
            res.stopped_by_grammar = true;
            return finish(call);
        }
        sampler.accept(token);
        res.tokens.push_back(token);
        ++steps;
        if (options.stop_at_end_of_generation && tok.valid() && tok.is_end_of_generation(token)) { res.stopped_by_eog = true; return finish(call); }
        if (tok.valid()) detok.push(token, &pending);
        // Stop strings: cut at the first match; otherwise stream all but a possible match prefix.
        size_t cut = std::string::npos;
        for (const std::string& s : options.stop)
            if (!s.empty()) cut = std::min(cut, pending.find(s));
        if (cut != std::string::npos) {
            emit(token, cut, call);
            res.stopped_by_string = true;
            return finish(call);
        }
        size_t hold = 0;
        for (const std::string& s : options.stop)
            for (size_t k = std::min(s.size() - 1, pending.size()); k > hold; --k)
                if (pending.compare(pending.size() - k, k, s, 0, k) == 0) { hold = k; break; }
        if (!emit(token, pending.size() - hold, call)) return finish(call);
        if (steps == options.max_tokens) return finish(call);  // the last token needs no forward pass
        return token;
    }
    template <typename Emit>
    int32_t finish(Emit&& call) {
        if (!res.stopped_by_string && !res.stopped_by_callback) {
            if (tok.valid()) detok.flush(&pending);
            emit(res.tokens.empty() ? -1 : res.tokens.back(), pending.size(), call);
        }
        done = true;
        return -1;
    }
};
}  // namespace detail

MOE_API Status generate(Session& session, const std::vector<int32_t>& prompt, const GenerateOptions& options, StreamFn on_token, void* user,
                        GenerateResult* result) {
    GenerateResult local;
    GenerateResult& res = result ? *result : local;
    res = GenerateResult{};
    if (!session.logits()) return detail::fail(Status::invalid_argument, "session not created");
    if (options.max_tokens < 0) return detail::fail(Status::invalid_argument, "max_tokens must be >= 0");
    const Model& model = session.model();
    const int32_t n_vocab = model.info().n_vocab;
    if (Status s = check_sampler_options(options.sampler, n_vocab); s != Status::ok) return s;
    detail::Generation g(options, model.tokenizer(), res);
    for (int32_t t : prompt) g.sampler.accept(t);

    double t0 = detail::now_seconds();
    if (!prompt.empty()) {
        Status s = session.eval(prompt.data(), prompt.size());
        if (s != Status::ok) return s;
    } else if (session.position() == 0) {
        return detail::fail(Status::invalid_argument, "empty prompt on an empty session");
    }
    res.n_prompt = (int32_t)prompt.size();
    double t1 = detail::now_seconds();
    res.prompt_seconds = t1 - t0;

    auto call = [&](int32_t token, const char* text, size_t n) { return !on_token || on_token(user, token, text, n); };
    Status status = Status::ok;
    if (options.max_tokens == 0) g.finish(call);
    while (!g.done) {
        const int32_t token = g.step(session.logits(), n_vocab, call);
        if (token < 0) break;
        status = session.eval(&token, 1);
        if (status != Status::ok) { g.finish(call); break; }
    }
    res.decode_seconds = detail::now_seconds() - t1;
    return status == Status::context_full && !res.tokens.empty() ? Status::context_full : status;
}

MOE_API Status generate_batch(Session* const* sessions, const std::vector<std::vector<int32_t>>& prompts, const std::vector<GenerateOptions>& options,
                              BatchStreamFn on_token, void* user, std::vector<GenerateResult>* results) {
    const size_t n = prompts.size();
    if (!sessions || n == 0) return detail::fail(Status::invalid_argument, "no sessions or prompts");
    if (options.size() != 1 && options.size() != n)
        return detail::fail(Status::invalid_argument, "%zu generate options for %zu prompts (give 1 or one per prompt)", options.size(), n);
    std::vector<GenerateResult> local;
    std::vector<GenerateResult>& res = results ? *results : local;
    res.assign(n, GenerateResult{});
    for (size_t i = 0; i < n; ++i) {
        if (!sessions[i] || !sessions[i]->logits()) return detail::fail(Status::invalid_argument, "session %zu is null or not created", i);
        if (options[options.size() == 1 ? 0 : i].max_tokens < 0) return detail::fail(Status::invalid_argument, "max_tokens must be >= 0 (sequence %zu)", i);
        if (prompts[i].empty() && sessions[i]->position() == 0) return detail::fail(Status::invalid_argument, "empty prompt on an empty session (sequence %zu)", i);
    }
    const Model& model = sessions[0]->model();
    const int32_t n_vocab = model.info().n_vocab;
    for (const GenerateOptions& o : options)
        if (Status s = check_sampler_options(o.sampler, n_vocab); s != Status::ok) return s;
    std::vector<detail::Generation> gens;
    gens.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        gens.emplace_back(options[options.size() == 1 ? 0 : i], sessions[i]->model().tokenizer(), res[i]);
        for (int32_t t : prompts[i]) gens.back().sampler.accept(t);
    }
    // The prompts, one session at a time (prefill is already batched within each).
    for (size_t i = 0; i < n; ++i) {
        const double t0 = detail::now_seconds();
        if (!prompts[i].empty()) {
            Status s = sessions[i]->eval(prompts[i].data(), prompts[i].size());
            if (s != Status::ok) return s;
        }
        res[i].n_prompt = (int32_t)prompts[i].size();
        res[i].prompt_seconds = detail::now_seconds() - t0;
    }
    const double t1 = detail::now_seconds();
    std::vector<Session*> batch;
    std::vector<int32_t> tokens;
    std::vector<size_t> seq_of;
    batch.reserve(n); tokens.reserve(n); seq_of.reserve(n);
    Status status = Status::ok;
    for (size_t i = 0; i < n; ++i)
        if (gens[i].options.max_tokens == 0) gens[i].finish([](int32_t, const char*, size_t) { return true; });
    for (;;) {
        batch.clear(); tokens.clear(); seq_of.clear();
        for (size_t i = 0; i < n; ++i) {
            if (gens[i].done) continue;
            auto call = [&](int32_t token, const char* text, size_t len) { return !on_token || on_token(user, i, token, text, len); };
            const int32_t token = gens[i].step(sessions[i]->logits(), n_vocab, call);
            if (token < 0) continue;
            batch.push_back(sessions[i]); tokens.push_back(token); seq_of.push_back(i);
        }
        if (batch.empty()) break;
        Status s = Session::eval_batch(batch.data(), tokens.data(), batch.size());
        if (s != Status::ok) {  // e.g. a full context: every unfinished sequence ends here
            status = s;
            for (size_t k = 0; k < seq_of.size(); ++k) {
                const size_t i = seq_of[k];
                gens[i].finish([&](int32_t token, const char* text, size_t len) { return !on_token || on_token(user, i, token, text, len); });
            }
            break;
        }
    }
    const double t2 = detail::now_seconds();
    for (GenerateResult& r : res) r.decode_seconds = t2 - t1;
    return status;
}

}  // namespace moe

// Internal macros end with the implementation (MOE_STATUS_LIST and MOE_API are public).
#undef MOE_DETAIL_MEMBER
#undef MOE_DETAIL_HAS_MMAP
#undef MOE_DETAIL_HAS_WIN32_MAP
#undef MOE_DETAIL_HAS_THREADS
#undef MOE_DETAIL_HAS_OPENMP
#undef MOE_DETAIL_HAS_X86
#undef MOE_DETAIL_HAS_AVX2
#undef MOE_DETAIL_HAS_AVX512
#undef MOE_DETAIL_HAS_AMX
#undef MOE_DETAIL_HAS_NEON
#undef MOE_DETAIL_ARM_DOTPROD
#undef MOE_DETAIL_HAS_AUXV


//-----------------------------------------------------------------------------
// [SECTION] CHAT TEMPLATES & JSON IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>chat  A JSON value type and parser (TplValue: also the template interpreter's values), an
// interpreter for the Jinja subset HuggingFace chat templates use (lexer, parser to an AST,
// evaluator with limits against hostile templates), and JSON Schema -> GBNF.

namespace moe {

namespace detail {

// Limits against hostile templates and JSON.
constexpr int kJsonMaxDepth = 512;
constexpr int kTemplateMaxExprDepth = 256;       // AST depth, so evaluation recursion stays shallow
constexpr int kTemplateMaxBlockDepth = 128;      // nested statements and parser recursion
constexpr int kTemplateMaxCallDepth = 100;       // macro calls (jinja2 itself stops near here)
constexpr int kTemplateMaxValueDepth = 600;      // nesting of lists/dicts kept in namespaces
constexpr size_t kTemplateMaxOutput = 64u << 20;  // bytes of any rendered or built string
constexpr uint64_t kTemplateMaxSteps = 2000000;  // loop iterations + macro calls + range items

//--- UTF-8 -------------------------------------------------------------------

// Length of the well-formed UTF-8 sequence at s[i], 0 if ill-formed.
inline size_t utf8_sequence_length(const std::string& s, size_t i) {
    const unsigned char b = (unsigned char)s[i];
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (b < 0x80) return 1;
    if (b >= 0xc2 && b <= 0xdf) len = 2;
    else if (b >= 0xe0 && b <= 0xef) { len = 3; if (b == 0xe0) lo = 0xa0; if (b == 0xed) hi = 0x9f; }
    else if (b >= 0xf0 && b <= 0xf4) { len = 4; if (b == 0xf0) lo = 0x90; if (b == 0xf4) hi = 0x8f; }
    else return 0;
    if (i + len > s.size()) return 0;
    for (size_t k = 1; k < len; ++k, lo = 0x80, hi = 0xbf) {
        const unsigned char c = (unsigned char)s[i + k];
        if (c < lo || c > hi) return 0;
    }
    return len;
}

// Offset of the first ill-formed byte, or npos.
inline size_t utf8_invalid_offset(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        const size_t len = utf8_sequence_length(s, i);
        if (len == 0) return i;
        i += len;
    }
    return std::string::npos;
}

inline void append_utf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) {
        out->push_back((char)cp);
    } else if (cp < 0x800) {
        out->push_back((char)(0xc0 | (cp >> 6)));
        out->push_back((char)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        out->push_back((char)(0xe0 | (cp >> 12)));
        out->push_back((char)(0x80 | ((cp >> 6) & 0x3f)));
        out->push_back((char)(0x80 | (cp & 0x3f)));
    } else {
        out->push_back((char)(0xf0 | (cp >> 18)));
        out->push_back((char)(0x80 | ((cp >> 12) & 0x3f)));
        out->push_back((char)(0x80 | ((cp >> 6) & 0x3f)));
        out->push_back((char)(0x80 | (cp & 0x3f)));
    }
}

// Template strings are always well-formed UTF-8 (inputs are validated), so decoding is simple.
inline std::vector<uint32_t> utf8_decode(const std::string& s) {
    std::vector<uint32_t> cps;
    cps.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const unsigned char b = (unsigned char)s[i];
        size_t len = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
        if (i + len > s.size()) len = s.size() - i;
        uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1fu) : len == 3 ? (b & 0x0fu) : (b & 0x07u);
        for (size_t k = 1; k < len; ++k) cp = (cp << 6) | ((unsigned char)s[i + k] & 0x3fu);
        cps.push_back(cp);
        i += len;
    }
    return cps;
}

inline std::string utf8_encode(const uint32_t* cps, size_t n) {
    std::string s;
    s.reserve(n);
    for (size_t i = 0; i < n; ++i) append_utf8(&s, cps[i]);
    return s;
}

inline size_t utf8_length(const std::string& s) {
    size_t n = 0;
    for (char c : s) n += ((unsigned char)c & 0xc0) != 0x80;
    return n;
}

// Python's str.isspace() set.
inline bool is_python_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

//--- Values ------------------------------------------------------------------

enum class TplKind : uint8_t { undefined, none, boolean, integer, floating, string, list, dict, loop, macro, function };

struct TplList;
struct TplDict;
struct TplLoop;
struct TplMacro;

// A template value (also what the JSON parser produces). Lists and dicts are shared, like
// Python objects: only namespaces are ever mutated after construction.
struct TplValue {
    TplKind kind = TplKind::undefined;
    bool boolean = false;
    int64_t integer = 0;
    double floating = 0;
    std::string text;  // string; undefined: the missing name (for messages); function: its name
    std::shared_ptr<TplList> list;
    std::shared_ptr<TplDict> dict;
    std::shared_ptr<TplLoop> loop;
    std::shared_ptr<TplMacro> macro;
};

// What Python object a list value stands for: jinja2's select/map/... filters return lazy
// generators (always truthy, no len(), not subscriptable), dict.items() etc. return views.
enum class ListFlavor : uint8_t { plain, iterator, dict_keys, dict_values, dict_items };

struct TplList {
    std::vector<TplValue> items;
    bool is_tuple = false;
    ListFlavor flavor = ListFlavor::plain;
    int depth = 1;
    bool holds_reference = false;
};

struct TplDict {
    std::vector<std::pair<std::string, TplValue>> entries;  // insertion order, like Python dicts
    bool is_namespace = false;
    int depth = 1;
    bool holds_reference = false;

    const TplValue* find(const std::string& key) const {
        for (const auto& e : entries)
            if (e.first == key) return &e.second;
        return nullptr;
    }
    void set(const std::string& key, TplValue value) {
        for (auto& e : entries)
            if (e.first == key) { e.second = std::move(value); return; }
        entries.emplace_back(key, std::move(value));
    }
};

struct TplLoop {
    std::shared_ptr<TplList> items;
    size_t index = 0;
};

inline TplValue tpl_undefined(const std::string& name = std::string()) {
    TplValue v;
    v.text = name;
    return v;
}
inline TplValue tpl_none() { TplValue v; v.kind = TplKind::none; return v; }
inline TplValue tpl_bool(bool b) { TplValue v; v.kind = TplKind::boolean; v.boolean = b; return v; }
inline TplValue tpl_int(int64_t i) { TplValue v; v.kind = TplKind::integer; v.integer = i; return v; }
inline TplValue tpl_float(double f) { TplValue v; v.kind = TplKind::floating; v.floating = f; return v; }
inline TplValue tpl_string(std::string s) { TplValue v; v.kind = TplKind::string; v.text = std::move(s); return v; }

inline int tpl_depth(const TplValue& v) { return v.list ? v.list->depth : v.dict ? v.dict->depth : 0; }
// Namespaces and macros must not be stored in namespaces: that is how reference cycles (leaks,
// endless printing) and macros outliving their scope would arise.
inline bool tpl_holds_reference(const TplValue& v) {
    return v.kind == TplKind::macro || (v.list && v.list->holds_reference) ||
           (v.dict && (v.dict->is_namespace || v.dict->holds_reference));
}

inline TplValue tpl_list(std::vector<TplValue> items, bool is_tuple = false) {
    TplValue v;
    v.kind = TplKind::list;
    v.list = std::make_shared<TplList>();
    v.list->is_tuple = is_tuple;
    for (const TplValue& item : items) {
        v.list->depth = std::max(v.list->depth, tpl_depth(item) + 1);
        v.list->holds_reference = v.list->holds_reference || tpl_holds_reference(item);
    }
    v.list->items = std::move(items);
    return v;
}

inline TplValue tpl_flavored(TplValue list, ListFlavor flavor) {
    list.list->flavor = flavor;
    return list;
}
inline bool tpl_plain_list(const TplValue& v) { return v.kind == TplKind::list && v.list->flavor == ListFlavor::plain; }

inline TplValue tpl_dict(std::vector<std::pair<std::string, TplValue>> entries, bool is_namespace = false) {
    TplValue v;
    v.kind = TplKind::dict;
    v.dict = std::make_shared<TplDict>();
    v.dict->is_namespace = is_namespace;
    for (auto& e : entries) {
        v.dict->depth = std::max(v.dict->depth, tpl_depth(e.second) + 1);
        v.dict->holds_reference = v.dict->holds_reference || tpl_holds_reference(e.second);
        v.dict->set(e.first, std::move(e.second));  // a repeated key keeps its first position, last value
    }
    return v;
}

inline bool tpl_is_number(const TplValue& v) {
    return v.kind == TplKind::integer || v.kind == TplKind::floating || v.kind == TplKind::boolean;
}

// Python's type names, for messages.
inline const char* tpl_type_name(const TplValue& v) {
    switch (v.kind) {
        case TplKind::undefined: return "Undefined";
        case TplKind::none: return "NoneType";
        case TplKind::boolean: return "bool";
        case TplKind::integer: return "int";
        case TplKind::floating: return "float";
        case TplKind::string: return "str";
        case TplKind::list:
            switch (v.list->flavor) {
                case ListFlavor::iterator: return "generator";
                case ListFlavor::dict_keys: return "dict_keys";
                case ListFlavor::dict_values: return "dict_values";
                case ListFlavor::dict_items: return "dict_items";
                default: return v.list->is_tuple ? "tuple" : "list";
            }
        case TplKind::dict: return v.dict->is_namespace ? "Namespace" : "dict";
        case TplKind::loop: return "LoopContext";
        case TplKind::macro: return "Macro";
        case TplKind::function: return "function";
    }
    return "object";
}

inline bool tpl_truthy(const TplValue& v) {
    switch (v.kind) {
        case TplKind::undefined: case TplKind::none: return false;
        case TplKind::boolean: return v.boolean;
        case TplKind::integer: return v.integer != 0;
        case TplKind::floating: return v.floating != 0;
        case TplKind::string: return !v.text.empty();
        case TplKind::list: return v.list->flavor == ListFlavor::iterator || !v.list->items.empty();
        case TplKind::dict: return v.dict->is_namespace || !v.dict->entries.empty();
        default: return true;
    }
}

// Python's repr(float): the shortest digits that round-trip, scientific outside [1e-4, 1e16).
inline std::string python_float_repr(double v) {
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
    if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
    char buf[48];
    for (int precision = 1; precision <= 17; ++precision) {
        std::snprintf(buf, sizeof buf, "%.*e", precision - 1, v);
        if (std::strtod(buf, nullptr) == v) break;
    }
    const char* p = buf;
    std::string sign;
    if (*p == '-') { sign = "-"; ++p; }
    std::string digits;
    for (; *p && *p != 'e'; ++p)
        if (*p >= '0' && *p <= '9') digits.push_back(*p);
    const int exponent = *p == 'e' ? std::atoi(p + 1) : 0;
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    std::string out = sign;
    if (exponent < -4 || exponent >= 16) {
        out += digits[0];
        if (digits.size() > 1) out += "." + digits.substr(1);
        char e[16];
        std::snprintf(e, sizeof e, "e%c%02d", exponent < 0 ? '-' : '+', exponent < 0 ? -exponent : exponent);
        out += e;
    } else if (exponent >= 0) {
        const size_t int_len = (size_t)exponent + 1;
        if (digits.size() <= int_len) out += digits + std::string(int_len - digits.size(), '0') + ".0";
        else out += digits.substr(0, int_len) + "." + digits.substr(int_len);
    } else {
        out += "0." + std::string((size_t)(-exponent - 1), '0') + digits;
    }
    return out;
}

// Python's repr(str): single quotes unless the text has ' and no ".
inline void python_string_repr(const std::string& s, std::string* out) {
    const bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
    const char quote = has_single && !has_double ? '"' : '\'';
    out->push_back(quote);
    for (size_t i = 0; i < s.size(); ++i) {
        const unsigned char c = (unsigned char)s[i];
        if (c == '\\') *out += "\\\\";
        else if (c == (unsigned char)quote) { out->push_back('\\'); out->push_back(quote); }
        else if (c == '\n') *out += "\\n";
        else if (c == '\r') *out += "\\r";
        else if (c == '\t') *out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char hex[8];
            std::snprintf(hex, sizeof hex, "\\x%02x", c);
            *out += hex;
        } else if (c == 0xc2 && i + 1 < s.size() && (unsigned char)s[i + 1] <= 0xa0) {
            char hex[8];  // C1 controls and U+00A0 are not printable for Python
            std::snprintf(hex, sizeof hex, "\\x%02x", (unsigned char)s[i + 1]);
            *out += hex;
            ++i;
        } else {
            out->push_back((char)c);
        }
    }
    out->push_back(quote);
}

// Python's str(); `repr` selects repr() (used for list and dict items).
inline void tpl_to_string(const TplValue& v, std::string* out, bool repr = false) {
    switch (v.kind) {
        case TplKind::undefined:
            if (repr) *out += "Undefined";
            return;
        case TplKind::none: *out += "None"; return;
        case TplKind::boolean: *out += v.boolean ? "True" : "False"; return;
        case TplKind::integer: *out += std::to_string(v.integer); return;
        case TplKind::floating: *out += python_float_repr(v.floating); return;
        case TplKind::string:
            if (repr) python_string_repr(v.text, out);
            else *out += v.text;
            return;
        case TplKind::list: {
            if (v.list->flavor == ListFlavor::iterator) { *out += "<generator object>"; return; }
            if (v.list->flavor != ListFlavor::plain) *out += std::string(tpl_type_name(v)) + "(";
            *out += v.list->is_tuple ? "(" : "[";
            for (size_t i = 0; i < v.list->items.size(); ++i) {
                if (i) *out += ", ";
                tpl_to_string(v.list->items[i], out, true);
            }
            if (v.list->is_tuple && v.list->items.size() == 1) *out += ",";
            *out += v.list->is_tuple ? ")" : "]";
            if (v.list->flavor != ListFlavor::plain) *out += ")";
            return;
        }
        case TplKind::dict: {
            *out += v.dict->is_namespace ? "<Namespace {" : "{";
            bool first = true;
            for (const auto& e : v.dict->entries) {
                if (!first) *out += ", ";
                first = false;
                python_string_repr(e.first, out);
                *out += ": ";
                tpl_to_string(e.second, out, true);
            }
            *out += v.dict->is_namespace ? "}>" : "}";
            return;
        }
        case TplKind::loop: *out += "<LoopContext>"; return;
        case TplKind::macro: *out += "<Macro>"; return;
        case TplKind::function: *out += "<function " + v.text + ">"; return;
    }
}

inline std::string tpl_str(const TplValue& v) {
    std::string s;
    tpl_to_string(v, &s);
    return s;
}

//--- JSON --------------------------------------------------------------------

class JsonParser {
public:
    explicit JsonParser(const std::string& text) : text_(text) {}

    // Strict RFC 8259: one value, nothing but whitespace after it.
    bool parse(TplValue* out, std::string* error) {
        skip_space();
        if (!parse_value(out, 0)) { *error = error_; return false; }
        skip_space();
        if (pos_ != text_.size()) { *error = message("unexpected trailing characters"); return false; }
        return true;
    }

private:
    const std::string& text_;
    size_t pos_ = 0;
    std::string error_;

    std::string message(const char* what) const {
        return std::string(what) + " at byte offset " + std::to_string(pos_);
    }
    bool error(const char* what) {
        if (error_.empty()) error_ = message(what);
        return false;
    }
    void skip_space() {
        while (pos_ < text_.size() &&
               (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
            ++pos_;
    }
    bool literal(const char* word) {
        const size_t n = std::strlen(word);
        if (text_.compare(pos_, n, word) != 0) return error("invalid literal");
        pos_ += n;
        return true;
    }

    bool parse_value(TplValue* out, int depth) {
        if (pos_ >= text_.size()) return error("unexpected end of input");
        const char c = text_[pos_];
        if (c == '{' || c == '[') {
            if (depth >= kJsonMaxDepth) return error("nesting deeper than 512");
            return c == '{' ? parse_object(out, depth + 1) : parse_array(out, depth + 1);
        }
        if (c == '"') {
            std::string s;
            if (!parse_string(&s)) return false;
            *out = tpl_string(std::move(s));
            return true;
        }
        if (c == 't') { if (!literal("true")) return false; *out = tpl_bool(true); return true; }
        if (c == 'f') { if (!literal("false")) return false; *out = tpl_bool(false); return true; }
        if (c == 'n') { if (!literal("null")) return false; *out = tpl_none(); return true; }
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number(out);
        return error("unexpected character");
    }

    bool parse_object(TplValue* out, int depth) {
        ++pos_;
        std::vector<std::pair<std::string, TplValue>> entries;
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == '}') { ++pos_; *out = tpl_dict(std::move(entries)); return true; }
        for (;;) {
            skip_space();
            if (pos_ >= text_.size() || text_[pos_] != '"') return error("expected a string key");
            std::string key;
            if (!parse_string(&key)) return false;
            skip_space();
            if (pos_ >= text_.size() || text_[pos_] != ':') return error("expected ':'");
            ++pos_;
            skip_space();
            TplValue value;
            if (!parse_value(&value, depth)) return false;
            entries.emplace_back(std::move(key), std::move(value));
            skip_space();
            if (pos_ < text_.size() && text_[pos_] == ',') { ++pos_; continue; }
            if (pos_ < text_.size() && text_[pos_] == '}') { ++pos_; break; }
            return error("expected ',' or '}'");
        }
        *out = tpl_dict(std::move(entries));
        return true;
    }

    bool parse_array(TplValue* out, int depth) {
        ++pos_;
        std::vector<TplValue> items;
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == ']') { ++pos_; *out = tpl_list(std::move(items)); return true; }
        for (;;) {
            skip_space();
            TplValue value;
            if (!parse_value(&value, depth)) return false;
            items.push_back(std::move(value));
            skip_space();
            if (pos_ < text_.size() && text_[pos_] == ',') { ++pos_; continue; }
            if (pos_ < text_.size() && text_[pos_] == ']') { ++pos_; break; }
            return error("expected ',' or ']'");
        }
        *out = tpl_list(std::move(items));
        return true;
    }

    bool parse_hex4(uint32_t* out) {
        if (pos_ + 4 > text_.size()) return error("truncated \\u escape");
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = text_[pos_ + (size_t)i];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
            else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
            else return error("bad hex digit in \\u escape");
        }
        pos_ += 4;
        *out = v;
        return true;
    }

    bool parse_string(std::string* out) {
        ++pos_;  // opening quote
        for (;;) {
            if (pos_ >= text_.size()) return error("unterminated string");
            const unsigned char c = (unsigned char)text_[pos_];
            if (c == '"') { ++pos_; return true; }
            if (c < 0x20) return error("control character in string");
            if (c != '\\') {
                const size_t len = utf8_sequence_length(text_, pos_);
                if (len == 0) return error("invalid UTF-8 in string");
                out->append(text_, pos_, len);
                pos_ += len;
                continue;
            }
            if (++pos_ >= text_.size()) return error("unterminated escape");
            const char e = text_[pos_++];
            switch (e) {
                case '"': out->push_back('"'); break;
                case '\\': out->push_back('\\'); break;
                case '/': out->push_back('/'); break;
                case 'b': out->push_back('\b'); break;
                case 'f': out->push_back('\f'); break;
                case 'n': out->push_back('\n'); break;
                case 'r': out->push_back('\r'); break;
                case 't': out->push_back('\t'); break;
                case 'u': {
                    uint32_t cp = 0;
                    if (!parse_hex4(&cp)) return false;
                    if (cp >= 0xdc00 && cp <= 0xdfff) return error("lone low surrogate in \\u escape");
                    if (cp >= 0xd800 && cp <= 0xdbff) {
                        uint32_t low = 0;
                        if (text_.compare(pos_, 2, "\\u") != 0) return error("lone high surrogate in \\u escape");
                        pos_ += 2;
                        if (!parse_hex4(&low)) return false;
                        if (low < 0xdc00 || low > 0xdfff) return error("high surrogate not followed by a low one");
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: --pos_; return error("invalid escape");
            }
        }
    }

    bool parse_number(TplValue* out) {
        const size_t start = pos_;
        bool is_float = false;
        if (text_[pos_] == '-') ++pos_;
        auto digit = [&]() { return pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9'; };
        if (!digit()) return error("expected a digit");
        if (text_[pos_] == '0') {
            ++pos_;
            if (digit()) return error("leading zero in number");
        } else {
            while (digit()) ++pos_;
        }
        if (pos_ < text_.size() && text_[pos_] == '.') {
            ++pos_;
            is_float = true;
            if (!digit()) return error("expected a digit after '.'");
            while (digit()) ++pos_;
        }
        if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
            ++pos_;
            is_float = true;
            if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
            if (!digit()) return error("expected a digit in the exponent");
            while (digit()) ++pos_;
        }
        const std::string token = text_.substr(start, pos_ - start);
        if (!is_float) {
            errno = 0;
            char* end = nullptr;
            const long long v = std::strtoll(token.c_str(), &end, 10);
            if (errno == 0 && end && *end == 0) { *out = tpl_int((int64_t)v); return true; }
            // Beyond int64: kept as a float (Python would keep the exact integer).
        }
        const double d = std::strtod(token.c_str(), nullptr);
        if (!std::isfinite(d)) { pos_ = start; return error("number out of range"); }
        *out = tpl_float(d);
        return true;
    }
};

inline bool parse_json(const std::string& text, TplValue* out, std::string* error) {
    return JsonParser(text).parse(out, error);
}

// json.dumps formatting options.
struct JsonStyle {
    int indent = -1;  // < 0: one line
    std::string item_separator = ", ";
    std::string key_separator = ": ";
    bool sort_keys = false;
    bool ensure_ascii = false;
};

inline void json_escape_string(const std::string& s, bool ensure_ascii, std::string* out) {
    out->push_back('"');
    char hex[16];
    for (size_t i = 0; i < s.size(); ++i) {
        const unsigned char c = (unsigned char)s[i];
        switch (c) {
            case '"': *out += "\\\""; continue;
            case '\\': *out += "\\\\"; continue;
            case '\n': *out += "\\n"; continue;
            case '\r': *out += "\\r"; continue;
            case '\t': *out += "\\t"; continue;
            case '\b': *out += "\\b"; continue;
            case '\f': *out += "\\f"; continue;
            default: break;
        }
        if (c < 0x20 || (ensure_ascii && c == 0x7f)) {
            std::snprintf(hex, sizeof hex, "\\u%04x", c);
            *out += hex;
        } else if (c >= 0x80 && ensure_ascii) {
            const size_t len = std::max<size_t>(1, utf8_sequence_length(s, i));
            const std::vector<uint32_t> cp = utf8_decode(s.substr(i, len));
            const uint32_t v = cp.empty() ? 0xfffd : cp[0];
            if (v >= 0x10000) {
                std::snprintf(hex, sizeof hex, "\\u%04x\\u%04x", 0xd800 + ((v - 0x10000) >> 10),
                              0xdc00 + ((v - 0x10000) & 0x3ff));
            } else {
                std::snprintf(hex, sizeof hex, "\\u%04x", v);
            }
            *out += hex;
            i += len - 1;
        } else {
            out->push_back((char)c);
        }
    }
    out->push_back('"');
}

// json.dumps(value, ...). False with *error set for values JSON cannot hold.
inline bool json_dump(const TplValue& v, const JsonStyle& style, int level, std::string* out, std::string* error) {
    auto newline = [&](int at) {
        if (style.indent < 0) return;
        out->push_back('\n');
        out->append((size_t)style.indent * (size_t)at, ' ');
    };
    switch (v.kind) {
        case TplKind::none: *out += "null"; return true;
        case TplKind::boolean: *out += v.boolean ? "true" : "false"; return true;
        case TplKind::integer: *out += std::to_string(v.integer); return true;
        case TplKind::floating:
            if (std::isnan(v.floating)) *out += "NaN";
            else if (std::isinf(v.floating)) *out += v.floating < 0 ? "-Infinity" : "Infinity";
            else *out += python_float_repr(v.floating);
            return true;
        case TplKind::string: json_escape_string(v.text, style.ensure_ascii, out); return true;
        case TplKind::list: {
            if (v.list->flavor != ListFlavor::plain) break;
            if (v.list->items.empty()) { *out += "[]"; return true; }
            out->push_back('[');
            for (size_t i = 0; i < v.list->items.size(); ++i) {
                if (i) *out += style.item_separator;
                newline(level + 1);
                if (!json_dump(v.list->items[i], style, level + 1, out, error)) return false;
            }
            newline(level);
            out->push_back(']');
            return true;
        }
        case TplKind::dict: {
            if (v.dict->is_namespace) break;
            if (v.dict->entries.empty()) { *out += "{}"; return true; }
            std::vector<const std::pair<std::string, TplValue>*> entries;
            for (const auto& e : v.dict->entries) entries.push_back(&e);
            if (style.sort_keys)
                std::stable_sort(entries.begin(), entries.end(),
                                 [](const std::pair<std::string, TplValue>* a,
                                    const std::pair<std::string, TplValue>* b) { return a->first < b->first; });
            out->push_back('{');
            for (size_t i = 0; i < entries.size(); ++i) {
                if (i) *out += style.item_separator;
                newline(level + 1);
                json_escape_string(entries[i]->first, style.ensure_ascii, out);
                *out += style.key_separator;
                if (!json_dump(entries[i]->second, style, level + 1, out, error)) return false;
            }
            newline(level);
            out->push_back('}');
            return true;
        }
        default: break;
    }
    *error = std::string("Object of type ") + tpl_type_name(v) + " is not JSON serializable";
    return false;
}

//--- Template lexer ----------------------------------------------------------

enum class TokKind : uint8_t { text, var_begin, var_end, block_begin, block_end, name, string, integer, floating, op, end };

struct TplToken {
    TokKind kind = TokKind::end;
    std::string text;  // text, name, string value or operator
    int64_t integer = 0;
    double floating = 0;
    int line = 1;
};

// Splits a template into text and tag tokens, applying whitespace control the way jinja2 does
// with trim_blocks=True and lstrip_blocks=True.
class TemplateLexer {
public:
    explicit TemplateLexer(const std::string& source) {
        // jinja2 normalizes newlines and drops one trailing newline.
        src_.reserve(source.size());
        for (size_t i = 0; i < source.size(); ++i) {
            if (source[i] == '\r') {
                src_.push_back('\n');
                if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
            } else {
                src_.push_back(source[i]);
            }
        }
        if (!src_.empty() && src_.back() == '\n') src_.pop_back();
    }

    bool tokenize(std::vector<TplToken>* out, std::string* error, int* error_line) {
        tokens_ = out;
        bool line_starting = true;  // the previous tag ended at the start of a line
        while (pos_ < src_.size()) {
            size_t tag = src_.find('{', pos_);
            while (tag != std::string::npos && tag + 1 < src_.size() && src_[tag + 1] != '{' &&
                   src_[tag + 1] != '%' && src_[tag + 1] != '#')
                tag = src_.find('{', tag + 1);
            if (tag == std::string::npos || tag + 1 >= src_.size()) {
                emit_text(src_.substr(pos_));
                pos_ = src_.size();
                break;
            }
            const char type = src_[tag + 1];
            const char modifier = tag + 2 < src_.size() ? src_[tag + 2] : 0;
            std::string text = src_.substr(pos_, tag - pos_);
            if (modifier == '-') {
                size_t n = text.size();
                while (n > 0 && is_space(text[n - 1])) --n;
                text.resize(n);
            } else if (type != '{' && modifier != '+') {
                const size_t line_start = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
                if (line_start > 0 || line_starting) {
                    bool blank = true;
                    for (size_t i = line_start; i < text.size(); ++i) blank = blank && (text[i] == ' ' || text[i] == '\t');
                    if (blank) text.resize(line_start);
                }
            }
            emit_text(text);
            line_ += count_newlines(pos_, tag);
            pos_ = tag + 2 + (modifier == '-' || modifier == '+' ? 1 : 0);
            bool ok = type == '#' ? lex_comment() : lex_tag(type == '{');
            if (!ok) {
                *error = error_;
                *error_line = line_;
                return false;
            }
            line_starting = pos_ > 0 && src_[pos_ - 1] == '\n';
        }
        TplToken end;
        end.kind = TokKind::end;
        end.line = line_;
        out->push_back(end);
        return true;
    }

private:
    std::string src_;
    size_t pos_ = 0;
    int line_ = 1;
    std::vector<TplToken>* tokens_ = nullptr;
    std::string error_;

    static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
    int count_newlines(size_t from, size_t to) const {
        return (int)std::count(src_.begin() + (std::ptrdiff_t)from, src_.begin() + (std::ptrdiff_t)to, '\n');
    }
    void emit_text(const std::string& text) {
        if (text.empty()) return;
        TplToken t;
        t.kind = TokKind::text;
        t.text = text;
        t.line = line_;
        tokens_->push_back(std::move(t));
    }
    void push(TokKind kind, std::string text = std::string()) {
        TplToken t;
        t.kind = kind;
        t.text = std::move(text);
        t.line = line_;
        tokens_->push_back(std::move(t));
    }
    // After a tag's closing delimiter: '-' eats all following whitespace, otherwise trim_blocks
    // eats one newline after block tags and comments.
    void after_tag_end(char modifier, bool trim_newline) {
        if (modifier == '-') {
            while (pos_ < src_.size() && is_space(src_[pos_])) { line_ += src_[pos_] == '\n'; ++pos_; }
        } else if (trim_newline && modifier != '+' && pos_ < src_.size() && src_[pos_] == '\n') {
            ++line_;
            ++pos_;
        }
    }

    bool lex_comment() {
        const size_t close = src_.find("#}", pos_);
        if (close == std::string::npos) { error_ = "unterminated comment"; return false; }
        const char modifier = close > pos_ && (src_[close - 1] == '-' || src_[close - 1] == '+') ? src_[close - 1] : 0;
        line_ += count_newlines(pos_, close);
        pos_ = close + 2;
        after_tag_end(modifier, true);
        return true;
    }

    bool lex_tag(bool is_var) {
        const size_t first_token = tokens_->size();
        push(is_var ? TokKind::var_begin : TokKind::block_begin);
        const char close_char = is_var ? '}' : '%';
        for (;;) {
            while (pos_ < src_.size() && is_space(src_[pos_])) { line_ += src_[pos_] == '\n'; ++pos_; }
            if (pos_ >= src_.size()) { error_ = is_var ? "unterminated '{{'" : "unterminated '{%'"; return false; }
            const char c = src_[pos_];
            const bool closes = (c == close_char && pos_ + 1 < src_.size() && src_[pos_ + 1] == '}');
            const bool closes_mod = ((c == '-' || c == '+') && pos_ + 2 < src_.size() && src_[pos_ + 1] == close_char &&
                                     src_[pos_ + 2] == '}');
            if (closes || closes_mod) {
                const char modifier = closes_mod ? c : 0;
                pos_ += closes_mod ? 3 : 2;
                push(is_var ? TokKind::var_end : TokKind::block_end);
                // {% raw %}: everything up to {% endraw %} is text.
                if (!is_var && tokens_->size() == first_token + 3 && (*tokens_)[first_token + 1].kind == TokKind::name &&
                    (*tokens_)[first_token + 1].text == "raw") {
                    tokens_->resize(first_token);
                    if (modifier == '-') after_tag_end('-', false);
                    return lex_raw_body();
                }
                after_tag_end(modifier, !is_var);
                return true;
            }
            if (!lex_expression_token()) return false;
        }
    }

    bool lex_raw_body() {
        size_t search = pos_;
        for (;;) {
            const size_t open = src_.find("{%", search);
            if (open == std::string::npos) { error_ = "missing {% endraw %}"; return false; }
            size_t p = open + 2;
            const char open_mod = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0;
            if (open_mod) ++p;
            while (p < src_.size() && is_space(src_[p])) ++p;
            if (src_.compare(p, 6, "endraw") != 0) { search = open + 2; continue; }
            p += 6;
            while (p < src_.size() && is_space(src_[p])) ++p;
            char close_mod = 0;
            if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) close_mod = src_[p++];
            if (src_.compare(p, 2, "%}") != 0) { search = open + 2; continue; }
            std::string body = src_.substr(pos_, open - pos_);
            if (open_mod == '-') {
                size_t n = body.size();
                while (n > 0 && is_space(body[n - 1])) --n;
                body.resize(n);
            }
            emit_text(body);
            line_ += count_newlines(pos_, p + 2);
            pos_ = p + 2;
            after_tag_end(close_mod, true);
            return true;
        }
    }

    static bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
    static bool is_digit(char c) { return c >= '0' && c <= '9'; }

    bool lex_expression_token() {
        const char c = src_[pos_];
        if (is_name_start(c)) {
            size_t end = pos_;
            while (end < src_.size() && (is_name_start(src_[end]) || is_digit(src_[end]))) ++end;
            push(TokKind::name, src_.substr(pos_, end - pos_));
            pos_ = end;
            return true;
        }
        if (is_digit(c)) return lex_number();
        if (c == '\'' || c == '"') return lex_string(c);
        static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                           ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
        for (const char* op : kOps) {
            const size_t n = std::strlen(op);
            if (src_.compare(pos_, n, op) == 0) {
                push(TokKind::op, op);
                pos_ += n;
                return true;
            }
        }
        error_ = std::string("unexpected character '") + c + "'";
        return false;
    }

    bool lex_number() {
        std::string digits;
        bool is_float = false;
        auto take_digits = [&]() {
            while (pos_ < src_.size() && (is_digit(src_[pos_]) || (src_[pos_] == '_' && pos_ + 1 < src_.size() && is_digit(src_[pos_ + 1])))) {
                if (src_[pos_] != '_') digits.push_back(src_[pos_]);
                ++pos_;
            }
        };
        take_digits();
        if (pos_ + 1 < src_.size() && src_[pos_] == '.' && is_digit(src_[pos_ + 1])) {
            is_float = true;
            digits.push_back('.');
            ++pos_;
            take_digits();
        }
        if (pos_ < src_.size() && (src_[pos_] == 'e' || src_[pos_] == 'E')) {
            size_t p = pos_ + 1;
            if (p < src_.size() && (src_[p] == '+' || src_[p] == '-')) ++p;
            if (p < src_.size() && is_digit(src_[p])) {
                is_float = true;
                digits.append(src_, pos_, p - pos_);
                pos_ = p;
                take_digits();
            }
        }
        TplToken t;
        t.line = line_;
        if (!is_float) {
            errno = 0;
            const long long v = std::strtoll(digits.c_str(), nullptr, 10);
            if (errno == 0) {
                t.kind = TokKind::integer;
                t.integer = (int64_t)v;
                tokens_->push_back(std::move(t));
                return true;
            }
        }
        t.kind = TokKind::floating;  // integers beyond int64 become floats
        t.floating = std::strtod(digits.c_str(), nullptr);
        tokens_->push_back(std::move(t));
        return true;
    }

    bool lex_string(char quote) {
        std::string value;
        size_t p = pos_ + 1;
        for (;;) {
            if (p >= src_.size()) { error_ = "unterminated string literal"; return false; }
            const char c = src_[p];
            if (c == quote) break;
            if (c != '\\' || p + 1 >= src_.size()) { line_ += c == '\n'; value.push_back(c); ++p; continue; }
            const char e = src_[p + 1];
            p += 2;
            switch (e) {
                case 'n': value.push_back('\n'); break;
                case 't': value.push_back('\t'); break;
                case 'r': value.push_back('\r'); break;
                case 'b': value.push_back('\b'); break;
                case 'f': value.push_back('\f'); break;
                case 'v': value.push_back('\v'); break;
                case 'a': value.push_back('\a'); break;
                case '0': value.push_back('\0'); break;
                case '\\': value.push_back('\\'); break;
                case '\'': value.push_back('\''); break;
                case '"': value.push_back('"'); break;
                case '\n': ++line_; break;  // line continuation
                case 'x': case 'u': case 'U': {
                    const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                    uint32_t cp = 0;
                    bool ok = p + n <= src_.size();
                    for (size_t i = 0; ok && i < n; ++i) {
                        const char h = src_[p + i];
                        cp <<= 4;
                        if (is_digit(h)) cp |= (uint32_t)(h - '0');
                        else if (h >= 'a' && h <= 'f') cp |= (uint32_t)(h - 'a' + 10);
                        else if (h >= 'A' && h <= 'F') cp |= (uint32_t)(h - 'A' + 10);
                        else ok = false;
                    }
                    if (!ok || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
                        error_ = "bad escape in string literal";
                        return false;
                    }
                    append_utf8(&value, cp);
                    p += n;
                    break;
                }
                default: value.push_back('\\'); value.push_back(e); break;  // Python keeps unknown escapes
            }
        }
        push(TokKind::string, value);
        pos_ = p + 1;
        return true;
    }
};

//--- Template AST ------------------------------------------------------------

enum class ExprKind : uint8_t {
    literal, name, list, tuple, dict, attribute, subscript, slice, call, filter, test,
    negate, plus, not_, binary, compare, and_, or_, conditional
};

// Child layout by kind: list/tuple: items; dict: key0, value0, ...; attribute: object (name =
// attribute); subscript: object, index; slice: object, start, stop, step (null when omitted);
// call: callee, arguments; filter/test: input, arguments (name = filter/test); negate/plus/not_:
// operand; binary: left, right (name = operator); compare: operands (arg_names = operators);
// and_/or_: left, right; conditional: value, condition, else value (null when omitted).
struct TplExpr {
    ExprKind kind = ExprKind::literal;
    int line = 0;
    int depth = 1;
    TplValue literal;
    std::string name;
    std::vector<std::unique_ptr<TplExpr>> args;
    std::vector<std::string> arg_names;  // call/filter/test keywords ("" = positional); compare operators
    bool negated = false;                // "is not"
};
using ExprPtr = std::unique_ptr<TplExpr>;

enum class StmtKind : uint8_t { text, output, if_, for_, set, set_block, macro, break_, continue_, block };

// if: exprs = conditions, bodies = branches (one more when there is an else); for: names =
// targets, exprs = iterable, filter (nullable), bodies = body, else; set: names = targets (or
// the namespace when `attribute` is set), exprs = value; set_block: names = target, bodies = body;
// macro: text = name, names = parameters, exprs = defaults (nullable), bodies = body; block
// ({% generation %}, which HuggingFace uses to mark assistant text): bodies = body.
struct TplStmt {
    StmtKind kind = StmtKind::text;
    int line = 0;
    std::string text;
    std::string attribute;
    std::vector<std::string> names;
    std::vector<ExprPtr> exprs;
    std::vector<std::vector<std::unique_ptr<TplStmt>>> bodies;
};
using StmtPtr = std::unique_ptr<TplStmt>;
using StmtList = std::vector<StmtPtr>;

//--- Template parser ---------------------------------------------------------

// Recursive descent over the token stream, following jinja2's grammar and operator precedence.
class TemplateParser {
public:
    explicit TemplateParser(const std::vector<TplToken>& tokens) : tokens_(tokens) {}

    Status status = Status::ok;
    std::string error;
    int error_line = 0;

    bool parse(StmtList* out) {
        std::string stopped_at;
        parse_body(out, {}, &stopped_at);
        return status == Status::ok;
    }

private:
    const std::vector<TplToken>& tokens_;
    size_t pos_ = 0;
    int nesting_ = 0;     // parser recursion
    int loop_depth_ = 0;  // for break / continue

    struct NestingGuard {
        TemplateParser* parser;
        explicit NestingGuard(TemplateParser* p) : parser(p) { ++parser->nesting_; }
        ~NestingGuard() { --parser->nesting_; }
        bool too_deep() const { return parser->nesting_ > kTemplateMaxBlockDepth; }
    };

    bool failed() const { return status != Status::ok; }
    std::nullptr_t fail_at(int line, Status s, const std::string& message) {
        if (!failed()) {
            status = s;
            error = message;
            error_line = line;
        }
        return nullptr;
    }
    std::nullptr_t syntax_error(const std::string& message) {
        return fail_at(peek().line, Status::invalid_argument, "syntax error: " + message);
    }

    const TplToken& peek(size_t ahead = 0) const {
        const size_t i = std::min(pos_ + ahead, tokens_.size() - 1);
        return tokens_[i];
    }
    const TplToken& next() {
        const TplToken& t = peek();
        if (pos_ < tokens_.size() - 1) ++pos_;
        return t;
    }
    bool at_op(const char* op, size_t ahead = 0) const {
        return peek(ahead).kind == TokKind::op && peek(ahead).text == op;
    }
    bool at_name(const char* name, size_t ahead = 0) const {
        return peek(ahead).kind == TokKind::name && peek(ahead).text == name;
    }
    bool accept_op(const char* op) {
        if (!at_op(op)) return false;
        next();
        return true;
    }
    bool accept_name(const char* name) {
        if (!at_name(name)) return false;
        next();
        return true;
    }
    bool expect_op(const char* op) {
        if (accept_op(op)) return true;
        syntax_error(std::string("expected '") + op + "' but found " + describe(peek()));
        return false;
    }
    bool expect_block_end() {
        if (peek().kind == TokKind::block_end) { next(); return true; }
        syntax_error("expected '%}' but found " + describe(peek()));
        return false;
    }
    static std::string describe(const TplToken& t) {
        switch (t.kind) {
            case TokKind::text: return "text";
            case TokKind::var_begin: return "'{{'";
            case TokKind::var_end: return "'}}'";
            case TokKind::block_begin: return "'{%'";
            case TokKind::block_end: return "'%}'";
            case TokKind::name: return "'" + t.text + "'";
            case TokKind::string: return "a string";
            case TokKind::integer: case TokKind::floating: return "a number";
            case TokKind::op: return "'" + t.text + "'";
            case TokKind::end: return "the end of the template";
        }
        return "?";
    }

    ExprPtr node(ExprKind kind, int line) {
        ExprPtr e(new TplExpr());
        e->kind = kind;
        e->line = line;
        return e;
    }
    // Appends a child, tracking depth so evaluation recursion stays bounded.
    bool add(TplExpr* parent, ExprPtr child) {
        if (child) parent->depth = std::max(parent->depth, child->depth + 1);
        parent->args.push_back(std::move(child));
        if (parent->depth > kTemplateMaxExprDepth) {
            fail_at(parent->line, Status::invalid_argument, "expression nested too deeply");
            return false;
        }
        return true;
    }

    //--- statements ---

    // Parses statements until a block whose keyword is in `terminators` (consumed up to the
    // keyword; *stopped_at names it) or the end of the template.
    void parse_body(StmtList* body, std::initializer_list<const char*> terminators, std::string* stopped_at) {
        NestingGuard guard(this);
        if (guard.too_deep()) { syntax_error("blocks nested too deeply"); return; }
        const int open_line = peek().line;
        while (!failed()) {
            const TplToken& t = peek();
            if (t.kind == TokKind::end) {
                if (terminators.size() != 0)
                    fail_at(t.line, Status::invalid_argument,
                            std::string("syntax error: missing '") + *terminators.begin() + "' for the block opened at line " +
                                std::to_string(open_line));
                return;
            }
            if (t.kind == TokKind::text) {
                StmtPtr s(new TplStmt());
                s->kind = StmtKind::text;
                s->line = t.line;
                s->text = t.text;
                body->push_back(std::move(s));
                next();
                continue;
            }
            if (t.kind == TokKind::var_begin) {
                next();
                StmtPtr s(new TplStmt());
                s->kind = StmtKind::output;
                s->line = t.line;
                ExprPtr e = parse_tuple(true);
                if (!e) return;
                s->exprs.push_back(std::move(e));
                if (peek().kind != TokKind::var_end) { syntax_error("expected '}}' but found " + describe(peek())); return; }
                next();
                body->push_back(std::move(s));
                continue;
            }
            if (t.kind != TokKind::block_begin) { syntax_error("unexpected " + describe(t)); return; }
            next();
            const TplToken& keyword = peek();
            if (keyword.kind != TokKind::name) { syntax_error("expected a statement name"); return; }
            for (const char* term : terminators) {
                if (keyword.text == term) {
                    *stopped_at = keyword.text;
                    next();
                    return;
                }
            }
            StmtPtr s = parse_statement();
            if (!s) return;
            body->push_back(std::move(s));
        }
    }

    StmtPtr parse_statement() {
        const TplToken& keyword = next();
        const int line = keyword.line;
        const std::string& k = keyword.text;
        if (k == "if") return parse_if(line);
        if (k == "for") return parse_for(line);
        if (k == "set") return parse_set(line);
        if (k == "macro") return parse_macro(line);
        if (k == "generation") {
            StmtPtr s(new TplStmt());
            s->kind = StmtKind::block;
            s->line = line;
            s->bodies.emplace_back();
            std::string stop;
            if (!expect_block_end()) return nullptr;
            parse_body(&s->bodies[0], {"endgeneration"}, &stop);
            if (failed() || !expect_block_end()) return nullptr;
            return s;
        }
        if (k == "break" || k == "continue") {
            if (loop_depth_ == 0) return syntax_error("'" + k + "' outside of a loop");
            StmtPtr s(new TplStmt());
            s->kind = k == "break" ? StmtKind::break_ : StmtKind::continue_;
            s->line = line;
            if (!expect_block_end()) return nullptr;
            return s;
        }
        static const char* const kEnds[] = {"endif", "endfor", "endmacro", "endset", "else", "elif", "endraw", "endgeneration"};
        for (const char* end : kEnds)
            if (k == end) return fail_at(line, Status::invalid_argument, "syntax error: unexpected '" + k + "'");
        return fail_at(line, Status::unsupported, "unsupported statement '" + k + "'");
    }

    StmtPtr parse_if(int line) {
        StmtPtr s(new TplStmt());
        s->kind = StmtKind::if_;
        s->line = line;
        for (;;) {
            ExprPtr cond = parse_tuple(true);
            if (!cond || !expect_block_end()) return nullptr;
            s->exprs.push_back(std::move(cond));
            s->bodies.emplace_back();
            std::string stop;
            parse_body(&s->bodies.back(), {"endif", "elif", "else"}, &stop);
            if (failed()) return nullptr;
            if (stop == "elif") continue;
            if (stop == "else") {
                if (!expect_block_end()) return nullptr;
                s->bodies.emplace_back();
                parse_body(&s->bodies.back(), {"endif"}, &stop);
                if (failed()) return nullptr;
            }
            if (!expect_block_end()) return nullptr;
            return s;
        }
    }

    bool parse_targets(std::vector<std::string>* names) {
        const bool parenthesized = accept_op("(");
        do {
            if (peek().kind != TokKind::name) { syntax_error("expected a variable name"); return false; }
            names->push_back(next().text);
        } while (accept_op(","));
        if (parenthesized && !expect_op(")")) return false;
        return true;
    }

    StmtPtr parse_for(int line) {
        StmtPtr s(new TplStmt());
        s->kind = StmtKind::for_;
        s->line = line;
        if (!parse_targets(&s->names)) return nullptr;
        if (!accept_name("in")) return syntax_error("expected 'in' in for loop");
        ExprPtr iterable = parse_tuple(false);
        if (!iterable) return nullptr;
        s->exprs.push_back(std::move(iterable));
        ExprPtr filter;
        if (accept_name("if")) {
            filter = parse_expression(true);
            if (!filter) return nullptr;
        }
        s->exprs.push_back(std::move(filter));
        if (at_name("recursive")) return fail_at(line, Status::unsupported, "unsupported recursive for loop");
        if (!expect_block_end()) return nullptr;
        s->bodies.resize(2);
        std::string stop;
        ++loop_depth_;
        parse_body(&s->bodies[0], {"endfor", "else"}, &stop);
        --loop_depth_;
        if (failed()) return nullptr;
        if (stop == "else") {
            if (!expect_block_end()) return nullptr;
            parse_body(&s->bodies[1], {"endfor"}, &stop);
            if (failed()) return nullptr;
        }
        if (!expect_block_end()) return nullptr;
        return s;
    }

    StmtPtr parse_set(int line) {
        StmtPtr s(new TplStmt());
        s->kind = StmtKind::set;
        s->line = line;
        if (peek().kind == TokKind::name && at_op(".", 1)) {
            s->names.push_back(next().text);
            next();
            if (peek().kind != TokKind::name) return syntax_error("expected an attribute name");
            s->attribute = next().text;
        } else if (!parse_targets(&s->names)) {
            return nullptr;
        }
        if (accept_op("=")) {
            ExprPtr value = parse_tuple(true);
            if (!value || !expect_block_end()) return nullptr;
            s->exprs.push_back(std::move(value));
            return s;
        }
        if (s->names.size() != 1 || !s->attribute.empty()) return syntax_error("expected '='");
        if (at_op("|")) return fail_at(line, Status::unsupported, "unsupported filter on a block set");
        if (!expect_block_end()) return nullptr;
        s->kind = StmtKind::set_block;
        s->bodies.emplace_back();
        std::string stop;
        parse_body(&s->bodies[0], {"endset"}, &stop);
        if (failed() || !expect_block_end()) return nullptr;
        return s;
    }

    StmtPtr parse_macro(int line) {
        StmtPtr s(new TplStmt());
        s->kind = StmtKind::macro;
        s->line = line;
        if (peek().kind != TokKind::name) return syntax_error("expected a macro name");
        s->text = next().text;
        if (!expect_op("(")) return nullptr;
        while (!at_op(")")) {
            if (peek().kind != TokKind::name) return syntax_error("expected a parameter name");
            s->names.push_back(next().text);
            ExprPtr default_value;
            if (accept_op("=")) {
                default_value = parse_expression(true);
                if (!default_value) return nullptr;
            } else if (!s->exprs.empty() && s->exprs.back()) {
                return syntax_error("non-default parameter follows a default parameter");
            }
            s->exprs.push_back(std::move(default_value));
            if (!accept_op(",")) break;
        }
        if (!expect_op(")") || !expect_block_end()) return nullptr;
        s->bodies.emplace_back();
        std::string stop;
        const int saved_loop_depth = loop_depth_;
        loop_depth_ = 0;
        parse_body(&s->bodies[0], {"endmacro"}, &stop);
        loop_depth_ = saved_loop_depth;
        if (failed()) return nullptr;
        if (peek().kind == TokKind::name) next();  // {% endmacro name %}
        if (!expect_block_end()) return nullptr;
        return s;
    }

    //--- expressions ---

    // A bare tuple "a, b" or a single expression.
    ExprPtr parse_tuple(bool with_condexpr) {
        const int line = peek().line;
        ExprPtr first = parse_expression(with_condexpr);
        if (!first || !at_op(",")) return first;
        ExprPtr tuple = node(ExprKind::tuple, line);
        if (!add(tuple.get(), std::move(first))) return nullptr;
        while (accept_op(",")) {
            if (peek().kind == TokKind::var_end || peek().kind == TokKind::block_end || at_op(")")) break;
            ExprPtr item = parse_expression(with_condexpr);
            if (!item || !add(tuple.get(), std::move(item))) return nullptr;
        }
        return tuple;
    }

    ExprPtr parse_expression(bool with_condexpr) {
        NestingGuard guard(this);
        if (guard.too_deep()) return syntax_error("expression nested too deeply");
        return with_condexpr ? parse_conditional() : parse_or();
    }

    ExprPtr parse_conditional() {
        ExprPtr value = parse_or();
        while (value && at_name("if")) {
            const int line = next().line;
            ExprPtr cond = parse_or();
            if (!cond) return nullptr;
            ExprPtr otherwise;
            if (accept_name("else")) {
                otherwise = parse_conditional();
                if (!otherwise) return nullptr;
            }
            ExprPtr e = node(ExprKind::conditional, line);
            if (!add(e.get(), std::move(value)) || !add(e.get(), std::move(cond)) || !add(e.get(), std::move(otherwise)))
                return nullptr;
            value = std::move(e);
        }
        return value;
    }

    ExprPtr binary_node(ExprKind kind, const std::string& op, int line, ExprPtr left, ExprPtr right) {
        ExprPtr e = node(kind, line);
        e->name = op;
        if (!add(e.get(), std::move(left)) || !add(e.get(), std::move(right))) return nullptr;
        return e;
    }

    ExprPtr parse_or() {
        ExprPtr left = parse_and();
        while (left && at_name("or")) {
            const int line = next().line;
            ExprPtr right = parse_and();
            if (!right) return nullptr;
            left = binary_node(ExprKind::or_, "or", line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_and() {
        ExprPtr left = parse_not();
        while (left && at_name("and")) {
            const int line = next().line;
            ExprPtr right = parse_not();
            if (!right) return nullptr;
            left = binary_node(ExprKind::and_, "and", line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_not() {
        if (at_name("not")) {
            NestingGuard guard(this);
            if (guard.too_deep()) return syntax_error("expression nested too deeply");
            const int line = next().line;
            ExprPtr operand = parse_not();
            if (!operand) return nullptr;
            ExprPtr e = node(ExprKind::not_, line);
            if (!add(e.get(), std::move(operand))) return nullptr;
            return e;
        }
        return parse_compare();
    }

    ExprPtr parse_compare() {
        const int line = peek().line;
        ExprPtr first = parse_math1();
        if (!first) return nullptr;
        ExprPtr cmp;
        for (;;) {
            std::string op;
            if (peek().kind == TokKind::op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                               peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
                op = next().text;
            } else if (at_name("in")) {
                next();
                op = "in";
            } else if (at_name("not") && at_name("in", 1)) {
                next();
                next();
                op = "not in";
            } else {
                break;
            }
            ExprPtr right = parse_math1();
            if (!right) return nullptr;
            if (!cmp) {
                cmp = node(ExprKind::compare, line);
                if (!add(cmp.get(), std::move(first))) return nullptr;
            }
            cmp->arg_names.push_back(op);
            if (!add(cmp.get(), std::move(right))) return nullptr;
        }
        return cmp ? std::move(cmp) : std::move(first);
    }

    ExprPtr parse_math1() {
        ExprPtr left = parse_concat();
        while (left && (at_op("+") || at_op("-"))) {
            const TplToken& op = next();
            ExprPtr right = parse_concat();
            if (!right) return nullptr;
            left = binary_node(ExprKind::binary, op.text, op.line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_concat() {
        ExprPtr left = parse_math2();
        while (left && at_op("~")) {
            const int line = next().line;
            ExprPtr right = parse_math2();
            if (!right) return nullptr;
            left = binary_node(ExprKind::binary, "~", line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_math2() {
        ExprPtr left = parse_pow();
        while (left && (at_op("*") || at_op("/") || at_op("//") || at_op("%"))) {
            const TplToken& op = next();
            ExprPtr right = parse_pow();
            if (!right) return nullptr;
            left = binary_node(ExprKind::binary, op.text, op.line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_pow() {
        ExprPtr left = parse_unary(true);
        while (left && at_op("**")) {
            const int line = next().line;
            ExprPtr right = parse_unary(true);
            if (!right) return nullptr;
            left = binary_node(ExprKind::binary, "**", line, std::move(left), std::move(right));
        }
        return left;
    }

    ExprPtr parse_unary(bool with_filter) {
        NestingGuard guard(this);
        if (guard.too_deep()) return syntax_error("expression nested too deeply");
        ExprPtr e;
        if (at_op("-") || at_op("+")) {
            const TplToken& op = next();
            ExprPtr operand = parse_unary(false);
            if (!operand) return nullptr;
            e = node(op.text == "-" ? ExprKind::negate : ExprKind::plus, op.line);
            if (!add(e.get(), std::move(operand))) return nullptr;
        } else {
            e = parse_primary();
            if (e) e = parse_postfix(std::move(e));
        }
        if (e && with_filter) e = parse_filters_and_tests(std::move(e));
        return e;
    }

    ExprPtr parse_primary() {
        const TplToken& t = peek();
        if (t.kind == TokKind::name) {
            next();
            ExprPtr e = node(ExprKind::literal, t.line);
            if (t.text == "true" || t.text == "True") e->literal = tpl_bool(true);
            else if (t.text == "false" || t.text == "False") e->literal = tpl_bool(false);
            else if (t.text == "none" || t.text == "None") e->literal = tpl_none();
            else { e->kind = ExprKind::name; e->name = t.text; }
            return e;
        }
        if (t.kind == TokKind::string) {
            ExprPtr e = node(ExprKind::literal, t.line);
            std::string s;
            while (peek().kind == TokKind::string) s += next().text;  // adjacent literals concatenate
            e->literal = tpl_string(std::move(s));
            return e;
        }
        if (t.kind == TokKind::integer || t.kind == TokKind::floating) {
            next();
            ExprPtr e = node(ExprKind::literal, t.line);
            e->literal = t.kind == TokKind::integer ? tpl_int(t.integer) : tpl_float(t.floating);
            return e;
        }
        if (at_op("(")) {
            next();
            if (accept_op(")")) return node(ExprKind::tuple, t.line);
            ExprPtr inner = parse_expression(true);
            if (!inner) return nullptr;
            if (at_op(",")) {
                ExprPtr tuple = node(ExprKind::tuple, t.line);
                if (!add(tuple.get(), std::move(inner))) return nullptr;
                while (accept_op(",")) {
                    if (at_op(")")) break;
                    ExprPtr item = parse_expression(true);
                    if (!item || !add(tuple.get(), std::move(item))) return nullptr;
                }
                inner = std::move(tuple);
            }
            if (!expect_op(")")) return nullptr;
            return inner;
        }
        if (at_op("[")) {
            next();
            ExprPtr list = node(ExprKind::list, t.line);
            while (!at_op("]")) {
                ExprPtr item = parse_expression(true);
                if (!item || !add(list.get(), std::move(item))) return nullptr;
                if (!accept_op(",")) break;
            }
            if (!expect_op("]")) return nullptr;
            return list;
        }
        if (at_op("{")) {
            next();
            ExprPtr dict = node(ExprKind::dict, t.line);
            while (!at_op("}")) {
                ExprPtr key = parse_expression(true);
                if (!key || !expect_op(":")) return nullptr;
                ExprPtr value = parse_expression(true);
                if (!value || !add(dict.get(), std::move(key)) || !add(dict.get(), std::move(value))) return nullptr;
                if (!accept_op(",")) break;
            }
            if (!expect_op("}")) return nullptr;
            return dict;
        }
        return syntax_error("unexpected " + describe(t));
    }

    // Call arguments after '(' up to and including ')'.
    bool parse_call_args(TplExpr* e) {
        while (!at_op(")")) {
            if (at_op("*") || at_op("**")) {
                fail_at(peek().line, Status::unsupported, "unsupported *args / **kwargs in a call");
                return false;
            }
            std::string keyword;
            if (peek().kind == TokKind::name && at_op("=", 1)) {
                keyword = next().text;
                next();
            } else if (!e->arg_names.empty() && !e->arg_names.back().empty()) {
                syntax_error("positional argument follows keyword argument");
                return false;
            }
            ExprPtr value = parse_expression(true);
            if (!value || !add(e, std::move(value))) return false;
            e->arg_names.push_back(keyword);
            if (!accept_op(",")) break;
        }
        return expect_op(")");
    }

    ExprPtr parse_postfix(ExprPtr e) {
        while (e) {
            const int line = peek().line;
            if (at_op(".")) {
                next();
                if (peek().kind == TokKind::integer) {
                    ExprPtr index = node(ExprKind::literal, line);
                    index->literal = tpl_int(next().integer);
                    ExprPtr sub = node(ExprKind::subscript, line);
                    if (!add(sub.get(), std::move(e)) || !add(sub.get(), std::move(index))) return nullptr;
                    e = std::move(sub);
                    continue;
                }
                if (peek().kind != TokKind::name) return syntax_error("expected an attribute name after '.'");
                ExprPtr attr = node(ExprKind::attribute, line);
                attr->name = next().text;
                if (!add(attr.get(), std::move(e))) return nullptr;
                e = std::move(attr);
            } else if (at_op("[")) {
                next();
                e = parse_subscript(std::move(e), line);
            } else if (at_op("(")) {
                next();
                ExprPtr call = node(ExprKind::call, line);
                if (!add(call.get(), std::move(e)) || !parse_call_args(call.get())) return nullptr;
                e = std::move(call);
            } else {
                break;
            }
        }
        return e;
    }

    ExprPtr parse_subscript(ExprPtr object, int line) {
        ExprPtr parts[3];
        bool is_slice = false;
        for (int i = 0; i < 3; ++i) {
            if (!at_op(":") && !at_op("]")) {
                parts[i] = parse_expression(true);
                if (!parts[i]) return nullptr;
            }
            if (i < 2 && accept_op(":")) { is_slice = true; continue; }
            break;
        }
        if (!is_slice && parts[0] && at_op(",")) {  // x[a, b]: a tuple key
            ExprPtr tuple = node(ExprKind::tuple, line);
            if (!add(tuple.get(), std::move(parts[0]))) return nullptr;
            while (accept_op(",") && !at_op("]")) {
                ExprPtr item = parse_expression(true);
                if (!item || !add(tuple.get(), std::move(item))) return nullptr;
            }
            parts[0] = std::move(tuple);
        }
        if (!expect_op("]")) return nullptr;
        ExprPtr e = node(is_slice ? ExprKind::slice : ExprKind::subscript, line);
        if (!add(e.get(), std::move(object))) return nullptr;
        if (!is_slice) {
            if (!parts[0]) return syntax_error("empty subscript");
            if (!add(e.get(), std::move(parts[0]))) return nullptr;
            return e;
        }
        for (auto& part : parts)
            if (!add(e.get(), std::move(part))) return nullptr;
        return e;
    }

    ExprPtr parse_filters_and_tests(ExprPtr e) {
        while (e) {
            const int line = peek().line;
            if (at_op("|")) {
                next();
                if (peek().kind != TokKind::name) return syntax_error("expected a filter name after '|'");
                ExprPtr f = node(ExprKind::filter, line);
                f->name = next().text;
                if (!add(f.get(), std::move(e))) return nullptr;
                if (accept_op("(") && !parse_call_args(f.get())) return nullptr;
                e = std::move(f);
            } else if (at_name("is")) {
                next();
                ExprPtr t = node(ExprKind::test, line);
                t->negated = accept_name("not");
                if (peek().kind != TokKind::name) return syntax_error("expected a test name after 'is'");
                t->name = next().text;
                if (!add(t.get(), std::move(e))) return nullptr;
                if (accept_op("(")) {
                    if (!parse_call_args(t.get())) return nullptr;
                } else {
                    const TplToken& n = peek();
                    const bool starts_operand = n.kind == TokKind::name || n.kind == TokKind::string ||
                                                n.kind == TokKind::integer || n.kind == TokKind::floating ||
                                                at_op("[") || at_op("{");
                    if (starts_operand && !at_name("else") && !at_name("or") && !at_name("and") && !at_name("if") &&
                        !at_name("is") && !at_name("in") && !at_name("not")) {
                        ExprPtr arg = parse_primary();
                        if (arg) arg = parse_postfix(std::move(arg));
                        if (!arg || !add(t.get(), std::move(arg))) return nullptr;
                        t->arg_names.push_back(std::string());
                    }
                }
                e = std::move(t);
            } else if (at_op("(")) {
                next();
                ExprPtr call = node(ExprKind::call, line);
                if (!add(call.get(), std::move(e)) || !parse_call_args(call.get())) return nullptr;
                e = std::move(call);
            } else {
                break;
            }
        }
        return e;
    }
};

//--- Template evaluation -----------------------------------------------------

struct TplFrame {
    TplFrame* parent = nullptr;
    std::vector<std::pair<std::string, TplValue>> vars;

    TplValue* find(const std::string& name) {
        for (TplFrame* f = this; f; f = f->parent)
            for (auto& v : f->vars)
                if (v.first == name) return &v.second;
        return nullptr;
    }
    void set(const std::string& name, TplValue value) {
        for (auto& v : vars)
            if (v.first == name) { v.second = std::move(value); return; }
        vars.emplace_back(name, std::move(value));
    }
};

// A macro sees the scope it was defined in; that frame outlives every use of the macro because
// macros cannot be stored in namespaces (the only values that outlive a frame).
struct TplMacro {
    const TplStmt* definition = nullptr;
    TplFrame* scope = nullptr;
};

struct TplArgs {
    std::vector<TplValue> positional;
    std::vector<std::pair<std::string, TplValue>> keywords;

    // Python-style lookup of parameter `index` / `keyword`; null when not passed.
    const TplValue* get(size_t index, const char* keyword) const {
        if (index < positional.size()) return &positional[index];
        for (const auto& k : keywords)
            if (k.first == keyword) return &k.second;
        return nullptr;
    }
};

// Python slice semantics: the selected indices of a sequence of `length` items.
inline std::vector<size_t> slice_indices(int64_t length, const TplValue& start_v, const TplValue& stop_v, int64_t step) {
    std::vector<size_t> out;
    auto given = [](const TplValue& v) { return v.kind == TplKind::integer || v.kind == TplKind::boolean; };
    auto value = [](const TplValue& v) { return v.kind == TplKind::boolean ? (int64_t)v.boolean : v.integer; };
    auto clamp = [&](int64_t i, int64_t lo, int64_t hi) {
        if (i < 0) i += length;
        return std::min(std::max(i, lo), hi);
    };
    if (step > 0) {
        const int64_t start = given(start_v) ? clamp(value(start_v), 0, length) : 0;
        const int64_t stop = given(stop_v) ? clamp(value(stop_v), 0, length) : length;
        for (int64_t i = start; i < stop; i += step) out.push_back((size_t)i);
    } else {
        const int64_t start = given(start_v) ? clamp(value(start_v), -1, length - 1) : length - 1;
        const int64_t stop = given(stop_v) ? clamp(value(stop_v), -1, length - 1) : -1;
        for (int64_t i = start; i > stop; i += step) out.push_back((size_t)i);
    }
    return out;
}

// Simple case mapping for ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic: what Python's
// str.upper / str.lower do there, less a few one-to-many cases. Other scripts stay as they are.
inline bool latin_a_odd_is_upper(uint32_t c) { return (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17e); }
inline uint32_t upper_cp(uint32_t c) {
    if (c < 0x80) return c >= 'a' && c <= 'z' ? c - 32 : c;
    if (c >= 0xe0 && c <= 0xfe && c != 0xf7) return c - 0x20;
    if (c == 0xff) return 0x178;
    if (c == 0xb5) return 0x39c;
    if (c == 0x131) return 'I';
    if (c == 0x17f) return 'S';
    if (c >= 0x100 && c <= 0x17e && c != 0x130 && c != 0x138 && c != 0x149 && c != 0x178)
        return (c & 1u) == (latin_a_odd_is_upper(c) ? 0u : 1u) ? c - 1 : c;
    if (c >= 0x3b1 && c <= 0x3c9) return c == 0x3c2 ? 0x3a3 : c - 0x20;
    if (c >= 0x430 && c <= 0x44f) return c - 0x20;
    if (c >= 0x450 && c <= 0x45f) return c - 0x50;
    return c;
}
inline uint32_t lower_cp(uint32_t c) {
    if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : c;
    if (c >= 0xc0 && c <= 0xde && c != 0xd7) return c + 0x20;
    if (c == 0x178) return 0xff;
    if (c >= 0x100 && c <= 0x17e && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149)
        return (c & 1u) == (latin_a_odd_is_upper(c) ? 1u : 0u) ? c + 1 : c;
    if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 0x20;
    if (c >= 0x410 && c <= 0x42f) return c + 0x20;
    if (c >= 0x400 && c <= 0x40f) return c + 0x50;
    return c;
}
inline bool is_cased(uint32_t c) { return c == 0xdf || upper_cp(c) != c || lower_cp(c) != c; }
inline void append_upper(std::string* out, uint32_t c) {
    if (c == 0xdf) *out += "SS";                // German sharp s
    else if (c == 0x149) *out += "\xca\xbcN";  // n preceded by apostrophe
    else append_utf8(out, upper_cp(c));
}
// Lower-cases cps[i]; a capital sigma ending a word becomes the final sigma, as in Python.
inline void append_lower(std::string* out, const std::vector<uint32_t>& cps, size_t i) {
    if (cps[i] == 0x3a3 && i > 0 && is_cased(cps[i - 1]) && (i + 1 == cps.size() || !is_cased(cps[i + 1])))
        append_utf8(out, 0x3c2);
    else
        append_utf8(out, lower_cp(cps[i]));
}
inline std::string text_upper(const std::string& s) {
    std::string out;
    for (uint32_t c : utf8_decode(s)) append_upper(&out, c);
    return out;
}
inline std::string text_lower(const std::string& s) {
    std::string out;
    const std::vector<uint32_t> cps = utf8_decode(s);
    for (size_t i = 0; i < cps.size(); ++i) append_lower(&out, cps, i);
    return out;
}
// Upper-cases the first letter of each word and lower-cases the rest; a word starts after a
// character for which `separates` holds (Python's str.title: any uncased character).
template <typename Separates>
inline std::string text_title(const std::string& s, Separates separates) {
    std::string out;
    bool word_start = true;
    const std::vector<uint32_t> cps = utf8_decode(s);
    for (size_t i = 0; i < cps.size(); ++i) {
        if (word_start) append_upper(&out, cps[i]);
        else append_lower(&out, cps, i);
        word_start = separates(cps[i]);
    }
    return out;
}
inline bool ascii_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// str.strip / lstrip / rstrip; `chars` null or none: whitespace.
inline std::string py_strip(const std::string& s, const TplValue* chars, bool left, bool right) {
    const std::vector<uint32_t> cps = utf8_decode(s);
    std::vector<uint32_t> set;
    const bool whitespace = !chars || chars->kind != TplKind::string;
    if (!whitespace) set = utf8_decode(chars->text);
    auto strip_it = [&](uint32_t c) {
        return whitespace ? is_python_space(c) : std::find(set.begin(), set.end(), c) != set.end();
    };
    size_t b = 0, e = cps.size();
    if (left) while (b < e && strip_it(cps[b])) ++b;
    if (right) while (e > b && strip_it(cps[e - 1])) --e;
    return utf8_encode(cps.data() + b, e - b);
}

// str.split / str.rsplit (rsplit = split of the reversed text, reversed back).
inline std::vector<std::string> py_split(const std::string& s, const std::string* sep, int64_t maxsplit, bool from_right) {
    std::vector<uint32_t> text = utf8_decode(s), separator;
    if (sep) separator = utf8_decode(*sep);
    if (from_right) {
        std::reverse(text.begin(), text.end());
        std::reverse(separator.begin(), separator.end());
    }
    std::vector<std::vector<uint32_t>> parts;
    size_t i = 0;
    if (!sep) {
        for (;;) {
            while (i < text.size() && is_python_space(text[i])) ++i;
            if (i >= text.size()) break;
            if (maxsplit >= 0 && (int64_t)parts.size() == maxsplit) {  // the rest, trailing space kept
                parts.emplace_back(text.begin() + (std::ptrdiff_t)i, text.end());
                break;
            }
            const size_t start = i;
            while (i < text.size() && !is_python_space(text[i])) ++i;
            parts.emplace_back(text.begin() + (std::ptrdiff_t)start, text.begin() + (std::ptrdiff_t)i);
        }
    } else {
        for (;;) {
            auto hit = text.end();
            if (maxsplit < 0 || (int64_t)parts.size() < maxsplit)
                hit = std::search(text.begin() + (std::ptrdiff_t)i, text.end(), separator.begin(), separator.end());
            if (hit == text.end()) {
                parts.emplace_back(text.begin() + (std::ptrdiff_t)i, text.end());
                break;
            }
            parts.emplace_back(text.begin() + (std::ptrdiff_t)i, hit);
            i = (size_t)(hit - text.begin()) + separator.size();
        }
    }
    std::vector<std::string> out;
    for (auto& p : parts) {
        if (from_right) std::reverse(p.begin(), p.end());
        out.push_back(utf8_encode(p.data(), p.size()));
    }
    if (from_right) std::reverse(out.begin(), out.end());
    return out;
}

inline std::string py_replace(const std::string& s, const std::string& old_text, const std::string& new_text, int64_t count) {
    std::string out;
    if (old_text.empty()) {  // Python inserts between every character
        const std::vector<uint32_t> cps = utf8_decode(s);
        int64_t done = 0;
        for (size_t i = 0; i <= cps.size(); ++i) {
            if (count < 0 || done < count) { out += new_text; ++done; }
            if (i < cps.size()) append_utf8(&out, cps[i]);
        }
        return out;
    }
    size_t pos = 0;
    int64_t done = 0;
    for (;;) {
        const size_t hit = (count < 0 || done < count) ? s.find(old_text, pos) : std::string::npos;
        if (hit == std::string::npos) break;
        out.append(s, pos, hit - pos);
        out += new_text;
        pos = hit + old_text.size();
        ++done;
    }
    out.append(s, pos, std::string::npos);
    return out;
}

enum class Flow { normal, break_, continue_, error };

class TemplateRenderer {
public:
    int64_t pinned_time = -1;  // ChatTemplateOptions::strftime_now_time
    Status status = Status::ok;
    std::string error;
    int error_line = 0;

    bool failed() const { return status != Status::ok; }

    Flow exec(const StmtList& body, TplFrame& frame, std::string* out) {
        for (const StmtPtr& s : body) {
            Flow flow = exec_statement(*s, frame, out);
            if (failed()) return Flow::error;
            if (flow != Flow::normal) return flow;
        }
        return Flow::normal;
    }

private:
    uint64_t steps_ = 0;
    int call_depth_ = 0;

    TplValue fail_at(int line, Status s, const std::string& message) {
        if (!failed()) {
            status = s;
            error = message;
            error_line = line;
        }
        return TplValue();
    }
    TplValue runtime_error(int line, const std::string& message) { return fail_at(line, Status::invalid_argument, message); }
    TplValue undefined_error(int line, const TplValue& v) {
        return runtime_error(line, v.text.empty() ? std::string("value is undefined") : "'" + v.text + "' is undefined");
    }
    bool step(int line) {
        if (++steps_ > kTemplateMaxSteps) { runtime_error(line, "too many loop iterations or calls"); return false; }
        return true;
    }
    bool check_size(size_t bytes, int line) {
        if (bytes <= kTemplateMaxOutput) return true;
        runtime_error(line, "output larger than 64 MiB");
        return false;
    }
    void append(std::string* out, const std::string& text, int line) {
        if (!check_size(out->size() + text.size(), line)) return;
        *out += text;
    }

    //--- statements ---

    Flow exec_statement(const TplStmt& s, TplFrame& frame, std::string* out) {
        switch (s.kind) {
            case StmtKind::text: append(out, s.text, s.line); return Flow::normal;
            case StmtKind::output: {
                const TplValue v = eval(*s.exprs[0], frame);
                if (failed()) return Flow::error;
                if (v.kind == TplKind::string) append(out, v.text, s.line);
                else append(out, tpl_str(v), s.line);
                return Flow::normal;
            }
            case StmtKind::if_:
                for (size_t i = 0; i < s.exprs.size(); ++i) {
                    const TplValue cond = eval(*s.exprs[i], frame);
                    if (failed()) return Flow::error;
                    if (tpl_truthy(cond)) return exec(s.bodies[i], frame, out);
                }
                if (s.bodies.size() > s.exprs.size()) return exec(s.bodies.back(), frame, out);
                return Flow::normal;
            case StmtKind::for_: return exec_for(s, frame, out);
            case StmtKind::set: {
                TplValue v = eval(*s.exprs[0], frame);
                if (failed()) return Flow::error;
                if (!s.attribute.empty()) {
                    TplValue* target = frame.find(s.names[0]);
                    if (!target || target->kind != TplKind::dict || !target->dict->is_namespace) {
                        runtime_error(s.line, "cannot assign attribute on non-namespace object '" + s.names[0] + "'");
                        return Flow::error;
                    }
                    if (tpl_holds_reference(v)) {
                        fail_at(s.line, Status::unsupported, "unsupported: storing a namespace or macro inside a namespace");
                        return Flow::error;
                    }
                    if (tpl_depth(v) + 1 > kTemplateMaxValueDepth) {
                        runtime_error(s.line, "value nested too deeply");
                        return Flow::error;
                    }
                    target->dict->set(s.attribute, std::move(v));
                    return Flow::normal;
                }
                bind_targets(s.names, v, frame, s.line);
                return failed() ? Flow::error : Flow::normal;
            }
            case StmtKind::set_block: {
                std::string captured;
                const Flow flow = exec(s.bodies[0], frame, &captured);
                if (failed()) return Flow::error;
                frame.set(s.names[0], tpl_string(std::move(captured)));
                return flow;
            }
            case StmtKind::macro: {
                TplValue m;
                m.kind = TplKind::macro;
                m.macro = std::make_shared<TplMacro>();
                m.macro->definition = &s;
                m.macro->scope = &frame;
                frame.set(s.text, std::move(m));
                return Flow::normal;
            }
            case StmtKind::block: return exec(s.bodies[0], frame, out);
            case StmtKind::break_: return Flow::break_;
            case StmtKind::continue_: return Flow::continue_;
        }
        return Flow::normal;
    }

    void bind_targets(const std::vector<std::string>& names, const TplValue& v, TplFrame& frame, int line) {
        if (names.size() == 1) { frame.set(names[0], v); return; }
        std::vector<TplValue> items;
        if (!iterate(v, &items, line)) return;
        if (items.size() != names.size()) {
            runtime_error(line, items.size() < names.size() ? "not enough values to unpack" : "too many values to unpack");
            return;
        }
        for (size_t i = 0; i < names.size(); ++i) frame.set(names[i], items[i]);
    }

    Flow exec_for(const TplStmt& s, TplFrame& frame, std::string* out) {
        const TplValue iterable = eval(*s.exprs[0], frame);
        if (failed()) return Flow::error;
        auto items = std::make_shared<TplList>();
        if (!iterate(iterable, &items->items, s.line)) return Flow::error;
        if (s.exprs[1]) {
            std::vector<TplValue> kept;
            for (TplValue& item : items->items) {
                if (!step(s.line)) return Flow::error;
                TplFrame scope;
                scope.parent = &frame;
                bind_targets(s.names, item, scope, s.line);
                const TplValue keep = failed() ? TplValue() : eval(*s.exprs[1], scope);
                if (failed()) return Flow::error;
                if (tpl_truthy(keep)) kept.push_back(std::move(item));
            }
            items->items = std::move(kept);
        }
        if (items->items.empty()) {
            TplFrame scope;
            scope.parent = &frame;
            return exec(s.bodies[1], scope, out);
        }
        for (size_t i = 0; i < items->items.size(); ++i) {
            if (!step(s.line)) return Flow::error;
            TplFrame scope;
            scope.parent = &frame;
            bind_targets(s.names, items->items[i], scope, s.line);
            TplValue loop;
            loop.kind = TplKind::loop;
            loop.loop = std::make_shared<TplLoop>();
            loop.loop->items = items;
            loop.loop->index = i;
            scope.set("loop", std::move(loop));
            if (failed()) return Flow::error;
            const Flow flow = exec(s.bodies[0], scope, out);
            if (flow == Flow::error) return flow;
            if (flow == Flow::break_) break;
        }
        return Flow::normal;
    }

    // The items a for loop or filter sees: list items, dict keys, string characters.
    bool iterate(const TplValue& v, std::vector<TplValue>* items, int line) {
        switch (v.kind) {
            case TplKind::undefined: return true;
            case TplKind::list: *items = v.list->items; return true;
            case TplKind::dict:
                if (v.dict->is_namespace) break;
                for (const auto& e : v.dict->entries) items->push_back(tpl_string(e.first));
                return true;
            case TplKind::string:
                for (uint32_t cp : utf8_decode(v.text)) {
                    std::string c;
                    append_utf8(&c, cp);
                    items->push_back(tpl_string(std::move(c)));
                }
                return true;
            default: break;
        }
        runtime_error(line, std::string("'") + tpl_type_name(v) + "' object is not iterable");
        return false;
    }

    //--- expressions ---

    TplArgs eval_args(const TplExpr& e, TplFrame& frame) {
        TplArgs args;
        for (size_t i = 1; i < e.args.size(); ++i) {
            TplValue v = eval(*e.args[i], frame);
            const std::string& keyword = e.arg_names[i - 1];
            if (keyword.empty()) args.positional.push_back(std::move(v));
            else args.keywords.emplace_back(keyword, std::move(v));
        }
        return args;
    }

    TplValue eval(const TplExpr& e, TplFrame& frame) {
        if (failed()) return TplValue();
        switch (e.kind) {
            case ExprKind::literal: return e.literal;
            case ExprKind::name: {
                if (const TplValue* v = frame.find(e.name)) return *v;
                static const char* const kGlobals[] = {"range", "namespace", "dict", "raise_exception", "strftime_now",
                                                       "cycler", "joiner", "lipsum"};  // the last three: unsupported
                for (const char* g : kGlobals)
                    if (e.name == g) {
                        TplValue f;
                        f.kind = TplKind::function;
                        f.text = g;
                        return f;
                    }
                return tpl_undefined(e.name);
            }
            case ExprKind::list: case ExprKind::tuple: {
                std::vector<TplValue> items;
                for (const ExprPtr& item : e.args) items.push_back(eval(*item, frame));
                return tpl_list(std::move(items), e.kind == ExprKind::tuple);
            }
            case ExprKind::dict: {
                std::vector<std::pair<std::string, TplValue>> entries;
                for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
                    const TplValue key = eval(*e.args[i], frame);
                    TplValue value = eval(*e.args[i + 1], frame);
                    if (failed()) return TplValue();
                    if (key.kind != TplKind::string)
                        return fail_at(e.line, Status::unsupported, "unsupported dict key of type '" +
                                                                        std::string(tpl_type_name(key)) + "'");
                    entries.emplace_back(key.text, std::move(value));
                }
                return tpl_dict(std::move(entries));
            }
            case ExprKind::attribute: {
                const TplValue object = eval(*e.args[0], frame);
                if (failed()) return TplValue();
                return get_attribute(object, e.name, e.line);
            }
            case ExprKind::subscript: {
                const TplValue object = eval(*e.args[0], frame);
                const TplValue key = eval(*e.args[1], frame);
                if (failed()) return TplValue();
                return get_item(object, key, e.line);
            }
            case ExprKind::slice: return eval_slice(e, frame);
            case ExprKind::call: {
                if (e.args[0]->kind == ExprKind::attribute) {
                    const TplValue object = eval(*e.args[0]->args[0], frame);
                    TplArgs args = eval_args(e, frame);
                    if (failed()) return TplValue();
                    return call_method(object, e.args[0]->name, args, e.line);
                }
                const TplValue callee = eval(*e.args[0], frame);
                TplArgs args = eval_args(e, frame);
                if (failed()) return TplValue();
                return call_value(callee, args, e.line);
            }
            case ExprKind::filter: {
                const TplValue input = eval(*e.args[0], frame);
                TplArgs args = eval_args(e, frame);
                if (failed()) return TplValue();
                return apply_filter(e.name, input, args, e.line);
            }
            case ExprKind::test: {
                const TplValue input = eval(*e.args[0], frame);
                TplArgs args = eval_args(e, frame);
                if (failed()) return TplValue();
                bool result = false;
                if (!apply_test(e.name, input, args, e.line, &result)) return TplValue();
                return tpl_bool(result != e.negated);
            }
            case ExprKind::negate: case ExprKind::plus: {
                const TplValue v = eval(*e.args[0], frame);
                if (failed()) return TplValue();
                if (v.kind == TplKind::undefined) return undefined_error(e.line, v);
                if (!tpl_is_number(v))
                    return runtime_error(e.line, std::string("bad operand type for unary ") +
                                                     (e.kind == ExprKind::negate ? "-" : "+") + ": '" + tpl_type_name(v) + "'");
                if (e.kind == ExprKind::plus) return v.kind == TplKind::boolean ? tpl_int(v.boolean) : v;
                if (v.kind == TplKind::floating) return tpl_float(-v.floating);
                const int64_t i = v.kind == TplKind::boolean ? (int64_t)v.boolean : v.integer;
                if (i == std::numeric_limits<int64_t>::min()) return tpl_float(-(double)i);
                return tpl_int(-i);
            }
            case ExprKind::not_: {
                const TplValue v = eval(*e.args[0], frame);
                return tpl_bool(!tpl_truthy(v));
            }
            case ExprKind::and_: {
                TplValue left = eval(*e.args[0], frame);
                if (failed() || !tpl_truthy(left)) return left;
                return eval(*e.args[1], frame);
            }
            case ExprKind::or_: {
                TplValue left = eval(*e.args[0], frame);
                if (failed() || tpl_truthy(left)) return left;
                return eval(*e.args[1], frame);
            }
            case ExprKind::conditional: {
                const TplValue cond = eval(*e.args[1], frame);
                if (failed()) return TplValue();
                if (tpl_truthy(cond)) return eval(*e.args[0], frame);
                return e.args[2] ? eval(*e.args[2], frame) : TplValue();
            }
            case ExprKind::binary: {
                const TplValue left = eval(*e.args[0], frame);
                const TplValue right = eval(*e.args[1], frame);
                if (failed()) return TplValue();
                return binary_op(e.name, left, right, e.line);
            }
            case ExprKind::compare: {
                TplValue left = eval(*e.args[0], frame);
                for (size_t i = 1; i < e.args.size(); ++i) {
                    TplValue right = eval(*e.args[i], frame);
                    if (failed()) return TplValue();
                    bool result = false;
                    if (!compare(e.arg_names[i - 1], left, right, e.line, &result)) return TplValue();
                    if (!result) return tpl_bool(false);
                    left = std::move(right);
                }
                return tpl_bool(true);
            }
        }
        return TplValue();
    }

    TplValue eval_slice(const TplExpr& e, TplFrame& frame) {
        const TplValue object = eval(*e.args[0], frame);
        TplValue bounds[3];
        for (int i = 0; i < 3; ++i)
            if (e.args[(size_t)i + 1]) bounds[i] = eval(*e.args[(size_t)i + 1], frame);
        if (failed()) return TplValue();
        for (const TplValue& b : bounds)
            if (b.kind != TplKind::undefined && b.kind != TplKind::none && b.kind != TplKind::integer && b.kind != TplKind::boolean)
                return runtime_error(e.line, "slice indices must be integers or None");
        const int64_t step = bounds[2].kind == TplKind::integer ? bounds[2].integer : 1;
        if (step == 0) return runtime_error(e.line, "slice step cannot be zero");
        if (object.kind == TplKind::undefined) return undefined_error(e.line, object);
        if (tpl_plain_list(object)) {
            std::vector<TplValue> items;
            for (size_t i : slice_indices((int64_t)object.list->items.size(), bounds[0], bounds[1], step))
                items.push_back(object.list->items[i]);
            return tpl_list(std::move(items), object.list->is_tuple);
        }
        if (object.kind == TplKind::string) {
            const std::vector<uint32_t> cps = utf8_decode(object.text);
            std::string s;
            for (size_t i : slice_indices((int64_t)cps.size(), bounds[0], bounds[1], step)) append_utf8(&s, cps[i]);
            return tpl_string(std::move(s));
        }
        return runtime_error(e.line, std::string("'") + tpl_type_name(object) + "' object is not subscriptable");
    }

    TplValue loop_attribute(const TplLoop& loop, const std::string& name) {
        const size_t n = loop.items->items.size(), i = loop.index;
        if (name == "index") return tpl_int((int64_t)i + 1);
        if (name == "index0") return tpl_int((int64_t)i);
        if (name == "revindex") return tpl_int((int64_t)(n - i));
        if (name == "revindex0") return tpl_int((int64_t)(n - i - 1));
        if (name == "first") return tpl_bool(i == 0);
        if (name == "last") return tpl_bool(i + 1 == n);
        if (name == "length") return tpl_int((int64_t)n);
        if (name == "depth") return tpl_int(1);
        if (name == "depth0") return tpl_int(0);
        if (name == "previtem") return i > 0 ? loop.items->items[i - 1] : tpl_undefined("previtem");
        if (name == "nextitem") return i + 1 < n ? loop.items->items[i + 1] : tpl_undefined("nextitem");
        return tpl_undefined(name);
    }

    TplValue get_attribute(const TplValue& object, const std::string& name, int line) {
        switch (object.kind) {
            case TplKind::undefined: return undefined_error(line, object);
            case TplKind::dict: {
                if (const TplValue* v = object.dict->find(name)) return *v;
                static const char* const kDictMethods[] = {"items", "keys", "values", "get"};
                for (const char* m : kDictMethods)
                    if (!object.dict->is_namespace && name == m) {  // like jinja2: a bound method, truthy
                        TplValue f;
                        f.kind = TplKind::function;
                        f.text = std::string("dict.") + m;
                        return f;
                    }
                return tpl_undefined(name);
            }
            case TplKind::loop: return loop_attribute(*object.loop, name);
            default: return tpl_undefined(name);
        }
    }

    TplValue get_item(const TplValue& object, const TplValue& key, int line) {
        switch (object.kind) {
            case TplKind::undefined: return undefined_error(line, object);
            case TplKind::dict:
            case TplKind::loop:
                if (key.kind == TplKind::string) return get_attribute(object, key.text, line);
                return tpl_undefined();
            case TplKind::list:
            case TplKind::string: {
                if (key.kind != TplKind::integer && key.kind != TplKind::boolean) return tpl_undefined();
                if (object.kind == TplKind::list && !tpl_plain_list(object)) return tpl_undefined();
                int64_t i = key.kind == TplKind::boolean ? (int64_t)key.boolean : key.integer;
                if (object.kind == TplKind::list) {
                    const int64_t n = (int64_t)object.list->items.size();
                    if (i < 0) i += n;
                    if (i < 0 || i >= n) return tpl_undefined();
                    return object.list->items[(size_t)i];
                }
                const std::vector<uint32_t> cps = utf8_decode(object.text);
                const int64_t n = (int64_t)cps.size();
                if (i < 0) i += n;
                if (i < 0 || i >= n) return tpl_undefined();
                std::string c;
                append_utf8(&c, cps[(size_t)i]);
                return tpl_string(std::move(c));
            }
            default: return tpl_undefined();
        }
    }

    //--- operators ---

    struct Number {
        bool is_int = true;
        int64_t i = 0;
        double f = 0;
        double as_double() const { return is_int ? (double)i : f; }
    };
    static Number to_number(const TplValue& v) {
        Number n;
        if (v.kind == TplKind::floating) { n.is_int = false; n.f = v.floating; }
        else n.i = v.kind == TplKind::boolean ? (int64_t)v.boolean : v.integer;
        return n;
    }

    TplValue type_error(int line, const char* op, const TplValue& a, const TplValue& b) {
        return runtime_error(line, std::string("unsupported operand type(s) for ") + op + ": '" + tpl_type_name(a) + "' and '" +
                                       tpl_type_name(b) + "'");
    }

    TplValue binary_op(const std::string& op, const TplValue& a, const TplValue& b, int line) {
        if (op == "~") {
            std::string s = tpl_str(a);
            if (!check_size(s.size() + b.text.size(), line)) return TplValue();
            s += tpl_str(b);
            if (!check_size(s.size(), line)) return TplValue();
            return tpl_string(std::move(s));
        }
        if (a.kind == TplKind::undefined) return undefined_error(line, a);
        if (b.kind == TplKind::undefined) return undefined_error(line, b);
        if (op == "+") {
            if (a.kind == TplKind::string && b.kind == TplKind::string) {
                if (!check_size(a.text.size() + b.text.size(), line)) return TplValue();
                return tpl_string(a.text + b.text);
            }
            if (tpl_plain_list(a) && tpl_plain_list(b) && a.list->is_tuple == b.list->is_tuple) {
                if (!check_size((a.list->items.size() + b.list->items.size()) * sizeof(TplValue), line)) return TplValue();
                std::vector<TplValue> items = a.list->items;
                items.insert(items.end(), b.list->items.begin(), b.list->items.end());
                return tpl_list(std::move(items), a.list->is_tuple);
            }
        }
        if (op == "*") {
            const TplValue* seq = a.kind == TplKind::string || tpl_plain_list(a) ? &a : &b;
            const TplValue* count = seq == &a ? &b : &a;
            if ((seq->kind == TplKind::string || tpl_plain_list(*seq)) &&
                (count->kind == TplKind::integer || count->kind == TplKind::boolean)) {
                const int64_t n = std::max<int64_t>(0, to_number(*count).i);
                const size_t unit = seq->kind == TplKind::string ? seq->text.size() : seq->list->items.size() * sizeof(TplValue);
                if (unit > 0 && (uint64_t)n > kTemplateMaxOutput / unit) { check_size(kTemplateMaxOutput + 1, line); return TplValue(); }
                if (seq->kind == TplKind::string) {
                    std::string s;
                    for (int64_t k = 0; k < n; ++k) s += seq->text;
                    return tpl_string(std::move(s));
                }
                std::vector<TplValue> items;
                for (int64_t k = 0; k < n; ++k) items.insert(items.end(), seq->list->items.begin(), seq->list->items.end());
                return tpl_list(std::move(items), seq->list->is_tuple);
            }
        }
        if (op == "%" && a.kind == TplKind::string)
            return fail_at(line, Status::unsupported, "unsupported operator: string % formatting");
        if (!tpl_is_number(a) || !tpl_is_number(b)) return type_error(line, op.c_str(), a, b);
        const Number x = to_number(a), y = to_number(b);
        const bool ints = x.is_int && y.is_int;
        if (op == "/") {
            if (y.as_double() == 0) return runtime_error(line, "division by zero");
            return tpl_float(x.as_double() / y.as_double());
        }
        if (ints) {
            const int64_t p = x.i, q = y.i;
            const int64_t lo = std::numeric_limits<int64_t>::min(), hi = std::numeric_limits<int64_t>::max();
            if (op == "+") {
                if ((q > 0 && p > hi - q) || (q < 0 && p < lo - q)) return tpl_float((double)p + (double)q);
                return tpl_int(p + q);
            }
            if (op == "-") {
                if ((q < 0 && p > hi + q) || (q > 0 && p < lo + q)) return tpl_float((double)p - (double)q);
                return tpl_int(p - q);
            }
            if (op == "*") {
                const double d = (double)p * (double)q;
                if (d >= 9.2e18 || d <= -9.2e18) return tpl_float(d);  // past int64: a float, never overflow
                return tpl_int(p * q);
            }
            if (op == "//" || op == "%") {
                if (q == 0) return runtime_error(line, "integer division or modulo by zero");
                if (p == lo && q == -1) return op == "//" ? tpl_float(-(double)lo) : tpl_int(0);
                int64_t quotient = p / q, remainder = p % q;
                if (remainder != 0 && ((remainder < 0) != (q < 0))) { --quotient; remainder += q; }
                return tpl_int(op == "//" ? quotient : remainder);
            }
            if (op == "**") {
                if (q < 0) {
                    if (p == 0) return runtime_error(line, "0.0 cannot be raised to a negative power");
                    return tpl_float(std::pow((double)p, (double)q));
                }
                int64_t result = 1;
                for (int64_t k = 0; k < q; ++k) {
                    const double d = (double)result * (double)p;
                    if (d >= 9.2e18 || d <= -9.2e18) return tpl_float(std::pow((double)p, (double)q));
                    result *= p;
                    if (result == 0 || result == 1) break;
                    if (result == -1) { result = (q - k - 1) % 2 == 0 ? -1 : 1; break; }
                }
                return tpl_int(result);
            }
        } else {
            const double p = x.as_double(), q = y.as_double();
            if (op == "+") return tpl_float(p + q);
            if (op == "-") return tpl_float(p - q);
            if (op == "*") return tpl_float(p * q);
            if (op == "//" || op == "%") {
                if (q == 0) return runtime_error(line, "float division or modulo by zero");
                double remainder = std::fmod(p, q);
                if (remainder != 0 && ((remainder < 0) != (q < 0))) remainder += q;
                if (op == "%") return tpl_float(remainder);
                return tpl_float(std::floor((p - remainder) / q + 0.5));
            }
            if (op == "**") {
                if (p == 0 && q < 0) return runtime_error(line, "0.0 cannot be raised to a negative power");
                return tpl_float(std::pow(p, q));
            }
        }
        return type_error(line, op.c_str(), a, b);
    }

    static bool values_equal(const TplValue& a, const TplValue& b) {
        if (tpl_is_number(a) && tpl_is_number(b)) {
            const Number x = to_number(a), y = to_number(b);
            return x.is_int && y.is_int ? x.i == y.i : x.as_double() == y.as_double();
        }
        if (a.kind != b.kind) return false;
        switch (a.kind) {
            case TplKind::undefined: case TplKind::none: return true;
            case TplKind::string: return a.text == b.text;
            case TplKind::list:
                if (a.list->is_tuple != b.list->is_tuple || a.list->flavor != b.list->flavor ||
                    a.list->items.size() != b.list->items.size())
                    return false;
                for (size_t i = 0; i < a.list->items.size(); ++i)
                    if (!values_equal(a.list->items[i], b.list->items[i])) return false;
                return true;
            case TplKind::dict:
                if (a.dict == b.dict) return true;
                if (a.dict->is_namespace || b.dict->is_namespace || a.dict->entries.size() != b.dict->entries.size()) return false;
                for (const auto& entry : a.dict->entries) {
                    const TplValue* other = b.dict->find(entry.first);
                    if (!other || !values_equal(entry.second, *other)) return false;
                }
                return true;
            case TplKind::macro: return a.macro == b.macro;
            case TplKind::loop: return a.loop == b.loop;
            case TplKind::function: return a.text == b.text;
            default: return false;
        }
    }

    // -1 / 0 / 1; false when the types have no order.
    static bool order(const TplValue& a, const TplValue& b, int* result) {
        if (tpl_is_number(a) && tpl_is_number(b)) {
            const Number x = to_number(a), y = to_number(b);
            if (x.is_int && y.is_int) *result = x.i < y.i ? -1 : x.i > y.i ? 1 : 0;
            else *result = x.as_double() < y.as_double() ? -1 : x.as_double() > y.as_double() ? 1 : 0;
            return true;
        }
        if (a.kind == TplKind::string && b.kind == TplKind::string) {
            const int c = a.text.compare(b.text);
            *result = c < 0 ? -1 : c > 0 ? 1 : 0;
            return true;
        }
        if (a.kind == TplKind::list && b.kind == TplKind::list && a.list->is_tuple == b.list->is_tuple) {
            for (size_t i = 0; i < a.list->items.size() && i < b.list->items.size(); ++i) {
                if (values_equal(a.list->items[i], b.list->items[i])) continue;
                return order(a.list->items[i], b.list->items[i], result);
            }
            const size_t n = a.list->items.size(), m = b.list->items.size();
            *result = n < m ? -1 : n > m ? 1 : 0;
            return true;
        }
        return false;
    }

    bool contains(const TplValue& container, const TplValue& item, int line, bool* result) {
        switch (container.kind) {
            case TplKind::undefined: *result = false; return true;
            case TplKind::string:
                if (item.kind != TplKind::string) {
                    runtime_error(line, std::string("'in <string>' requires string as left operand, not ") + tpl_type_name(item));
                    return false;
                }
                *result = container.text.find(item.text) != std::string::npos;
                return true;
            case TplKind::list:
                *result = false;
                for (const TplValue& v : container.list->items)
                    if (values_equal(v, item)) { *result = true; break; }
                return true;
            case TplKind::dict:
                *result = item.kind == TplKind::string && container.dict->find(item.text) != nullptr;
                return true;
            default:
                runtime_error(line, std::string("argument of type '") + tpl_type_name(container) + "' is not iterable");
                return false;
        }
    }

    bool compare(const std::string& op, const TplValue& a, const TplValue& b, int line, bool* result) {
        if (op == "==") { *result = values_equal(a, b); return true; }
        if (op == "!=") { *result = !values_equal(a, b); return true; }
        if (op == "in" || op == "not in") {
            if (!contains(b, a, line, result)) return false;
            if (op == "not in") *result = !*result;
            return true;
        }
        int c = 0;
        if (!order(a, b, &c)) {
            if (a.kind == TplKind::undefined) { undefined_error(line, a); return false; }
            if (b.kind == TplKind::undefined) { undefined_error(line, b); return false; }
            runtime_error(line, "'" + op + "' not supported between instances of '" + tpl_type_name(a) + "' and '" +
                                    tpl_type_name(b) + "'");
            return false;
        }
        *result = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
        return true;
    }

    //--- calls ---

    TplValue call_value(const TplValue& callee, const TplArgs& args, int line) {
        if (callee.kind == TplKind::macro) return call_macro(*callee.macro, args, line);
        if (callee.kind == TplKind::undefined) return undefined_error(line, callee);
        if (callee.kind != TplKind::function)
            return runtime_error(line, std::string("'") + tpl_type_name(callee) + "' object is not callable");
        const std::string& name = callee.text;
        if (name == "raise_exception") {
            const TplValue* message = args.get(0, "message");
            return runtime_error(line, "raise_exception: " + (message ? tpl_str(*message) : std::string()));
        }
        if (name == "range") {
            int64_t bounds[3] = {0, 0, 1};
            const size_t n = args.positional.size();
            if (n < 1 || n > 3 || !args.keywords.empty()) return runtime_error(line, "range expects 1 to 3 integer arguments");
            for (size_t i = 0; i < n; ++i) {
                const TplValue& v = args.positional[i];
                if (v.kind != TplKind::integer && v.kind != TplKind::boolean) return runtime_error(line, "range expects integers");
                bounds[n == 1 ? 1 : i] = to_number(v).i;
            }
            if (bounds[2] == 0) return runtime_error(line, "range() arg 3 must not be zero");
            const double count = std::ceil(((double)bounds[1] - (double)bounds[0]) / (double)bounds[2]);
            if (count > (double)(1 << 20)) return runtime_error(line, "range too large");
            std::vector<TplValue> items;
            for (int64_t v = bounds[0]; bounds[2] > 0 ? v < bounds[1] : v > bounds[1]; v += bounds[2]) {
                if (!step(line)) return TplValue();
                items.push_back(tpl_int(v));
            }
            return tpl_list(std::move(items));
        }
        if (name == "namespace" || name == "dict") {
            std::vector<std::pair<std::string, TplValue>> entries;
            for (const TplValue& p : args.positional) {
                if (p.kind != TplKind::dict) return runtime_error(line, name + "() positional argument must be a dict");
                entries.insert(entries.end(), p.dict->entries.begin(), p.dict->entries.end());
            }
            entries.insert(entries.end(), args.keywords.begin(), args.keywords.end());
            return tpl_dict(std::move(entries), name == "namespace");
        }
        if (name == "strftime_now") {
            const TplValue* format = args.get(0, "format");
            if (!format || format->kind != TplKind::string || format->text.size() > 200)
                return runtime_error(line, "strftime_now expects a format string");
            std::tm tm{};
            const int64_t pinned = pinned_time;
            const std::time_t t = pinned >= 0 ? (std::time_t)pinned : std::time(nullptr);
#if defined(_WIN32)
            if (pinned >= 0) gmtime_s(&tm, &t); else localtime_s(&tm, &t);
#else
            if (pinned >= 0) gmtime_r(&t, &tm); else localtime_r(&t, &tm);
#endif
            char buffer[1024];
            const size_t n = format->text.empty() ? 0 : std::strftime(buffer, sizeof buffer, format->text.c_str(), &tm);
            return tpl_string(std::string(buffer, n));
        }
        if (name.compare(0, 5, "dict.") == 0) return runtime_error(line, "unbound dict method " + name);
        return fail_at(line, Status::unsupported, "unsupported function '" + name + "'");
    }

    TplValue call_macro(const TplMacro& macro, const TplArgs& args, int line) {
        const TplStmt& def = *macro.definition;
        if (call_depth_ >= kTemplateMaxCallDepth) return runtime_error(line, "macro calls nested too deeply");
        if (!step(line)) return TplValue();
        if (args.positional.size() > def.names.size())
            return runtime_error(line, "macro '" + def.text + "' takes not more than " + std::to_string(def.names.size()) +
                                           " argument(s)");
        for (const auto& k : args.keywords)
            if (std::find(def.names.begin(), def.names.end(), k.first) == def.names.end())
                return runtime_error(line, "macro '" + def.text + "' takes no keyword argument '" + k.first + "'");
        TplFrame frame;
        frame.parent = macro.scope;
        for (size_t i = 0; i < def.names.size(); ++i) {
            const TplValue* passed = args.get(i, def.names[i].c_str());
            if (passed) frame.set(def.names[i], *passed);
            else if (def.exprs[i]) frame.set(def.names[i], eval(*def.exprs[i], frame));
            else frame.set(def.names[i], tpl_undefined(def.names[i]));
        }
        std::string out;
        ++call_depth_;
        exec(def.bodies[0], frame, &out);
        --call_depth_;
        if (failed()) return TplValue();
        return tpl_string(std::move(out));
    }

    static bool is_int_arg(const TplValue* v) { return v && (v->kind == TplKind::integer || v->kind == TplKind::boolean); }

    TplValue call_method(const TplValue& object, const std::string& name, const TplArgs& args, int line) {
        if (object.kind == TplKind::undefined) return undefined_error(line, object);
        if (object.kind == TplKind::string) return string_method(object.text, name, args, line);
        if (object.kind == TplKind::dict && !object.dict->is_namespace) {
            const TplDict& d = *object.dict;
            if (name == "items" || name == "keys" || name == "values") {
                std::vector<TplValue> items;
                for (const auto& e : d.entries) {
                    if (name == "keys") items.push_back(tpl_string(e.first));
                    else if (name == "values") items.push_back(e.second);
                    else items.push_back(tpl_list({tpl_string(e.first), e.second}, true));
                }
                return tpl_flavored(tpl_list(std::move(items)), name == "keys"     ? ListFlavor::dict_keys
                                                                : name == "values" ? ListFlavor::dict_values
                                                                                   : ListFlavor::dict_items);
            }
            if (name == "get") {
                const TplValue* key = args.get(0, "key");
                if (!key) return runtime_error(line, "get expected at least 1 argument");
                const TplValue* found = key->kind == TplKind::string ? d.find(key->text) : nullptr;
                if (found) return *found;
                const TplValue* fallback = args.get(1, "default");
                return fallback ? *fallback : tpl_none();
            }
        }
        if (object.kind == TplKind::loop && name == "cycle") {
            if (args.positional.empty()) return runtime_error(line, "no items for cycling given");
            return args.positional[object.loop->index % args.positional.size()];
        }
        const TplValue attribute = get_attribute(object, name, line);
        if (failed()) return TplValue();
        if (attribute.kind == TplKind::macro) return call_value(attribute, args, line);
        return fail_at(line, Status::unsupported,
                       std::string("unsupported method '") + name + "' of '" + tpl_type_name(object) + "'");
    }

    TplValue string_method(const std::string& s, const std::string& name, const TplArgs& args, int line) {
        const TplValue* a0 = args.get(0, "");
        if (name == "strip" || name == "lstrip" || name == "rstrip")
            return tpl_string(py_strip(s, a0, name != "rstrip", name != "lstrip"));
        if (name == "upper") return tpl_string(text_upper(s));
        if (name == "lower") return tpl_string(text_lower(s));
        if (name == "capitalize") {
            bool first = true;
            return tpl_string(text_title(s, [&](uint32_t) { first = false; return first; }));
        }
        if (name == "title") return tpl_string(text_title(s, [](uint32_t c) { return !is_cased(c); }));
        if (name == "split" || name == "rsplit") {
            const TplValue* sep = args.get(0, "sep");
            const TplValue* maxsplit = args.get(1, "maxsplit");
            if (sep && sep->kind != TplKind::none && sep->kind != TplKind::string)
                return runtime_error(line, "split separator must be a string or None");
            if (sep && sep->kind == TplKind::string && sep->text.empty()) return runtime_error(line, "empty separator");
            const bool has_sep = sep && sep->kind == TplKind::string;
            std::vector<TplValue> items;
            for (std::string& part : py_split(s, has_sep ? &sep->text : nullptr, is_int_arg(maxsplit) ? to_number(*maxsplit).i : -1,
                                              name == "rsplit"))
                items.push_back(tpl_string(std::move(part)));
            return tpl_list(std::move(items));
        }
        if (name == "startswith" || name == "endswith") {
            if (!a0) return runtime_error(line, name + " takes at least 1 argument");
            std::vector<TplValue> candidates;
            if (a0->kind == TplKind::list) candidates = a0->list->items;
            else candidates.push_back(*a0);
            for (const TplValue& c : candidates) {
                if (c.kind != TplKind::string) return runtime_error(line, name + " argument must be a string or a tuple of strings");
                if (c.text.size() > s.size()) continue;
                if (name == "startswith" ? s.compare(0, c.text.size(), c.text) == 0
                                         : s.compare(s.size() - c.text.size(), c.text.size(), c.text) == 0)
                    return tpl_bool(true);
            }
            return tpl_bool(false);
        }
        if (name == "replace") {
            const TplValue* old_text = args.get(0, "old");
            const TplValue* new_text = args.get(1, "new");
            const TplValue* count = args.get(2, "count");
            if (!old_text || !new_text || old_text->kind != TplKind::string || new_text->kind != TplKind::string)
                return runtime_error(line, "replace expects two strings");
            std::string out = py_replace(s, old_text->text, new_text->text, is_int_arg(count) ? to_number(*count).i : -1);
            if (!check_size(out.size(), line)) return TplValue();
            return tpl_string(std::move(out));
        }
        if (name == "find" || name == "rfind" || name == "count") {
            if (!a0 || a0->kind != TplKind::string) return runtime_error(line, name + " expects a string");
            if (name == "count") {
                if (a0->text.empty()) return tpl_int((int64_t)utf8_length(s) + 1);
                int64_t n = 0;
                for (size_t p = s.find(a0->text); p != std::string::npos; p = s.find(a0->text, p + a0->text.size())) ++n;
                return tpl_int(n);
            }
            const size_t hit = name == "find" ? s.find(a0->text) : s.rfind(a0->text);
            return tpl_int(hit == std::string::npos ? -1 : (int64_t)utf8_length(s.substr(0, hit)));
        }
        if (name == "removeprefix" || name == "removesuffix") {
            if (!a0 || a0->kind != TplKind::string) return runtime_error(line, name + " expects a string");
            const std::string& x = a0->text;
            if (name == "removeprefix") return tpl_string(s.compare(0, x.size(), x) == 0 ? s.substr(x.size()) : s);
            if (x.size() <= s.size() && s.compare(s.size() - x.size(), x.size(), x) == 0) return tpl_string(s.substr(0, s.size() - x.size()));
            return tpl_string(s);
        }
        if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "islower" ||
            name == "isupper") {
            bool result = !s.empty(), any_cased = false;
            for (char c : s) {
                const bool digit = c >= '0' && c <= '9', alpha = ascii_alpha(c);
                if (name == "isdigit") result = result && digit;
                else if (name == "isalpha") result = result && alpha;
                else if (name == "isalnum") result = result && (digit || alpha);
                else if (name == "isspace") result = result && is_python_space((unsigned char)c);
                else if (alpha) { any_cased = true; result = result && (name == "islower" ? c >= 'a' : c <= 'Z'); }
            }
            if (name == "islower" || name == "isupper") result = result && any_cased;
            return tpl_bool(result);
        }
        if (name == "join") {
            if (!a0) return runtime_error(line, "join takes exactly one argument");
            std::vector<TplValue> items;
            if (!iterate(*a0, &items, line)) return TplValue();
            std::string out;
            for (size_t i = 0; i < items.size(); ++i) {
                if (items[i].kind != TplKind::string) return runtime_error(line, "sequence item " + std::to_string(i) + ": expected str instance");
                if (i) out += s;
                out += items[i].text;
                if (!check_size(out.size(), line)) return TplValue();
            }
            return tpl_string(std::move(out));
        }
        if (name == "format") return string_format(s, args, line);
        return fail_at(line, Status::unsupported, "unsupported string method '" + name + "'");
    }

    // str.format with {} / {0} / {name} fields (no format specs).
    TplValue string_format(const std::string& s, const TplArgs& args, int line) {
        std::string out;
        size_t auto_index = 0;
        for (size_t i = 0; i < s.size(); ++i) {
            const char c = s[i];
            if (c == '}' ) {
                if (i + 1 < s.size() && s[i + 1] == '}') ++i;
                out.push_back('}');
                continue;
            }
            if (c != '{') { out.push_back(c); continue; }
            if (i + 1 < s.size() && s[i + 1] == '{') { out.push_back('{'); ++i; continue; }
            const size_t close = s.find('}', i);
            if (close == std::string::npos) return runtime_error(line, "single '{' encountered in format string");
            const std::string field = s.substr(i + 1, close - i - 1);
            if (field.find_first_of(":!.[") != std::string::npos)
                return fail_at(line, Status::unsupported, "unsupported format field '{" + field + "}'");
            const TplValue* v = nullptr;
            if (field.empty()) v = auto_index < args.positional.size() ? &args.positional[auto_index++] : nullptr;
            else if (field.find_first_not_of("0123456789") == std::string::npos) {
                const size_t index = (size_t)std::strtoul(field.c_str(), nullptr, 10);
                v = index < args.positional.size() ? &args.positional[index] : nullptr;
            } else {
                for (const auto& k : args.keywords)
                    if (k.first == field) v = &k.second;
            }
            if (!v) return runtime_error(line, "format field '{" + field + "}' has no argument");
            out += tpl_str(*v);
            i = close;
        }
        return tpl_string(std::move(out));
    }

    //--- filters ---

    TplValue apply_filter(const std::string& name, const TplValue& input, const TplArgs& args, int line) {
        const TplValue* a0 = args.get(0, "");
        if (name == "safe") return input.kind == TplKind::string ? input : tpl_string(tpl_str(input));  // Markup(str(x))
        if (name == "length" || name == "count") {
            switch (input.kind) {
                case TplKind::undefined: return tpl_int(0);
                case TplKind::string: return tpl_int((int64_t)utf8_length(input.text));
                case TplKind::list:
                    if (input.list->flavor == ListFlavor::iterator) return runtime_error(line, "object of type 'generator' has no len()");
                    return tpl_int((int64_t)input.list->items.size());
                case TplKind::dict: return tpl_int((int64_t)input.dict->entries.size());
                default: return runtime_error(line, std::string("object of type '") + tpl_type_name(input) + "' has no len()");
            }
        }
        if (name == "tojson") {
            JsonStyle style;
            const TplValue* indent = args.get(0, "indent");
            if (indent && indent->kind != TplKind::none) {
                if (!is_int_arg(indent)) return fail_at(line, Status::unsupported, "unsupported tojson indent (only integers)");
                style.indent = (int)std::min<int64_t>(std::max<int64_t>(to_number(*indent).i, 0), 64);
                style.item_separator = ",";
            }
            if (const TplValue* separators = args.get(99, "separators")) {
                if (separators->kind != TplKind::none) {
                    if (separators->kind != TplKind::list || separators->list->items.size() != 2 ||
                        separators->list->items[0].kind != TplKind::string || separators->list->items[1].kind != TplKind::string)
                        return runtime_error(line, "tojson separators must be a pair of strings");
                    style.item_separator = separators->list->items[0].text;
                    style.key_separator = separators->list->items[1].text;
                }
            }
            if (const TplValue* sort_keys = args.get(99, "sort_keys")) style.sort_keys = tpl_truthy(*sort_keys);
            if (const TplValue* ensure_ascii = args.get(99, "ensure_ascii")) style.ensure_ascii = tpl_truthy(*ensure_ascii);
            std::string out, why;
            if (!json_dump(input, style, 0, &out, &why)) return runtime_error(line, "tojson: " + why);
            if (!check_size(out.size(), line)) return TplValue();
            return tpl_string(std::move(out));
        }
        if (name == "string") return input.kind == TplKind::string ? input : tpl_string(tpl_str(input));
        if (name == "trim") return tpl_string(py_strip(tpl_str(input), args.get(0, "chars"), true, true));
        if (name == "upper") return tpl_string(text_upper(tpl_str(input)));
        if (name == "lower") return tpl_string(text_lower(tpl_str(input)));
        if (name == "capitalize") return string_method(tpl_str(input), "capitalize", TplArgs(), line);
        if (name == "title")  // jinja2 starts words after whitespace, '-' and opening brackets
            return tpl_string(text_title(tpl_str(input), [](uint32_t c) {
                return is_python_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
            }));
        if (name == "default" || name == "d") {
            const TplValue* fallback = args.get(0, "default_value");
            const TplValue* boolean = args.get(1, "boolean");
            const bool use_fallback = input.kind == TplKind::undefined || (boolean && tpl_truthy(*boolean) && !tpl_truthy(input));
            if (!use_fallback) return input;
            return fallback ? *fallback : tpl_string("");
        }
        if (name == "items") {
            if (input.kind == TplKind::undefined) return tpl_flavored(tpl_list({}), ListFlavor::iterator);
            if (input.kind != TplKind::dict) return runtime_error(line, "Can only get item pairs from a mapping.");
            return tpl_flavored(call_method(input, "items", TplArgs(), line), ListFlavor::iterator);
        }
        if (name == "abs") {
            if (!tpl_is_number(input)) return runtime_error(line, std::string("bad operand type for abs(): '") + tpl_type_name(input) + "'");
            if (input.kind == TplKind::floating) return tpl_float(std::fabs(input.floating));
            const int64_t i = to_number(input).i;
            if (i == std::numeric_limits<int64_t>::min()) return tpl_float(-(double)i);
            return tpl_int(i < 0 ? -i : i);
        }
        if ((name == "int" || name == "float") && input.kind == TplKind::undefined) return undefined_error(line, input);
        if (name == "int") {
            const TplValue* fallback = args.get(0, "default");
            if (input.kind == TplKind::integer) return input;
            if (input.kind == TplKind::boolean) return tpl_int(input.boolean);
            if (input.kind == TplKind::floating && std::isfinite(input.floating) && std::fabs(input.floating) < 9.2e18)
                return tpl_int((int64_t)input.floating);
            if (input.kind == TplKind::string) {
                const std::string t = py_strip(input.text, nullptr, true, true);
                char* end = nullptr;
                errno = 0;
                const long long v = std::strtoll(t.c_str(), &end, 10);
                if (!t.empty() && errno == 0 && end && *end == 0) return tpl_int((int64_t)v);
                const double d = std::strtod(t.c_str(), &end);
                if (!t.empty() && end && *end == 0 && std::isfinite(d) && std::fabs(d) < 9.2e18) return tpl_int((int64_t)d);
            }
            return fallback ? *fallback : tpl_int(0);
        }
        if (name == "float") {
            const TplValue* fallback = args.get(0, "default");
            if (input.kind == TplKind::floating) return input;
            if (input.kind == TplKind::integer || input.kind == TplKind::boolean) return tpl_float((double)to_number(input).i);
            if (input.kind == TplKind::string) {
                const std::string t = py_strip(input.text, nullptr, true, true);
                char* end = nullptr;
                const double d = std::strtod(t.c_str(), &end);
                if (!t.empty() && end && *end == 0) return tpl_float(d);
            }
            return fallback ? *fallback : tpl_float(0);
        }
        if (name == "round") {
            const TplValue* precision = args.get(0, "precision");
            const TplValue* method = args.get(1, "method");
            if (!tpl_is_number(input)) return runtime_error(line, "round expects a number");
            const std::string how = method && method->kind == TplKind::string ? method->text : "common";
            const int64_t digits = is_int_arg(precision) ? std::min<int64_t>(std::max<int64_t>(to_number(*precision).i, -20), 20) : 0;
            if (input.kind != TplKind::floating && how == "common") return tpl_int(to_number(input).i);
            const double scale = std::pow(10.0, (double)digits);
            const double x = to_number(input).as_double() * scale;
            double r = how == "floor" ? std::floor(x) : how == "ceil" ? std::ceil(x) : std::nearbyint(x);
            return tpl_float(r / scale);
        }
        if (name == "replace") {
            const TplValue* count = args.get(2, "count");
            if (!a0 || a0->kind != TplKind::string || !args.get(1, "new") || args.get(1, "new")->kind != TplKind::string)
                return runtime_error(line, "replace expects two strings");
            std::string out = py_replace(tpl_str(input), a0->text, args.get(1, "new")->text, is_int_arg(count) ? to_number(*count).i : -1);
            if (!check_size(out.size(), line)) return TplValue();
            return tpl_string(std::move(out));
        }
        if (name == "indent") {
            if (input.kind != TplKind::string) return runtime_error(line, std::string("indent expects a string, not '") + tpl_type_name(input) + "'");
            const TplValue* width = args.get(0, "width");
            const TplValue* first = args.get(1, "first");
            const TplValue* blank = args.get(2, "blank");
            const std::string pad = width && width->kind == TplKind::string ? width->text
                                    : std::string((size_t)std::min<int64_t>(std::max<int64_t>(is_int_arg(width) ? to_number(*width).i : 4, 0), 256), ' ');
            std::vector<std::string> lines;  // str.splitlines() of text + "\n", like jinja2
            const std::string text = tpl_str(input) + "\n";
            size_t start = 0;
            for (size_t i = 0; i < text.size(); ++i) {
                if (text[i] != '\n' && text[i] != '\r') continue;
                lines.push_back(text.substr(start, i - start));
                if (text[i] == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
                start = i + 1;
            }
            std::string out;
            for (size_t i = 0; i < lines.size(); ++i) {
                if (i) out += "\n";
                if (i > 0 && (!lines[i].empty() || (blank && tpl_truthy(*blank)))) out += pad;
                out += lines[i];
                if (!check_size(out.size(), line)) return TplValue();
            }
            if (first && tpl_truthy(*first)) out = pad + out;
            return tpl_string(std::move(out));
        }
        if (name == "dictsort") {
            if (input.kind != TplKind::dict || input.dict->is_namespace) return runtime_error(line, "dictsort expects a mapping");
            const TplValue* case_sensitive = args.get(0, "case_sensitive");
            const TplValue* by = args.get(1, "by");
            const TplValue* reverse = args.get(2, "reverse");
            const bool exact = case_sensitive && tpl_truthy(*case_sensitive);
            const bool by_value = by && by->kind == TplKind::string && by->text == "value";
            std::vector<TplValue> pairs;
            for (const auto& e : input.dict->entries) pairs.push_back(tpl_list({tpl_string(e.first), e.second}, true));
            bool ok = true;
            std::stable_sort(pairs.begin(), pairs.end(), [&](const TplValue& a, const TplValue& b) {
                TplValue ka = a.list->items[by_value ? 1 : 0], kb = b.list->items[by_value ? 1 : 0];
                if (!exact && ka.kind == TplKind::string) ka = tpl_string(text_lower(ka.text));
                if (!exact && kb.kind == TplKind::string) kb = tpl_string(text_lower(kb.text));
                int c = 0;
                if (!order(ka, kb, &c)) ok = false;
                return c < 0;
            });
            if (!ok) return runtime_error(line, "dictsort: values cannot be ordered");
            if (reverse && tpl_truthy(*reverse)) std::reverse(pairs.begin(), pairs.end());
            return tpl_list(std::move(pairs));
        }
        // The rest work on the items of a sequence.
        static const char* const kSequenceFilters[] = {"join", "first", "last", "list", "map", "select", "reject",
                                                        "selectattr", "rejectattr", "unique", "reverse", "sort",
                                                        "min", "max", "sum"};
        bool sequence_filter = false;
        for (const char* f : kSequenceFilters) sequence_filter = sequence_filter || name == f;
        if (!sequence_filter) return fail_at(line, Status::unsupported, "unsupported filter '" + name + "'");
        if (name == "reverse" && input.kind == TplKind::string) {
            std::vector<uint32_t> cps = utf8_decode(input.text);
            std::reverse(cps.begin(), cps.end());
            return tpl_string(utf8_encode(cps.data(), cps.size()));
        }
        std::vector<TplValue> items;
        if (!iterate(input, &items, line)) return TplValue();
        if (name == "first") return items.empty() ? tpl_undefined() : items.front();
        if (name == "last") {
            if (input.kind == TplKind::list && input.list->flavor == ListFlavor::iterator)
                return runtime_error(line, std::string("'") + tpl_type_name(input) + "' object is not reversible");
            return items.empty() ? tpl_undefined() : items.back();
        }
        if (name == "list") return tpl_list(std::move(items));
        if (name == "reverse") {
            std::reverse(items.begin(), items.end());
            return tpl_flavored(tpl_list(std::move(items)), ListFlavor::iterator);
        }
        if (name == "join") {
            const TplValue* separator = args.get(0, "d");
            const TplValue* attribute = args.get(1, "attribute");
            std::string out;
            for (size_t i = 0; i < items.size(); ++i) {
                if (i && separator) out += tpl_str(*separator);
                out += tpl_str(attribute ? get_item(items[i], *attribute, line) : items[i]);
                if (!check_size(out.size(), line)) return TplValue();
            }
            return tpl_string(std::move(out));
        }
        if (name == "unique") {
            const TplValue* case_sensitive = args.get(0, "case_sensitive");
            const bool exact = case_sensitive && tpl_truthy(*case_sensitive);
            std::vector<TplValue> kept, keys;
            for (const TplValue& item : items) {
                const TplValue key = item.kind == TplKind::string && !exact ? tpl_string(text_lower(item.text)) : item;
                bool seen = false;
                for (const TplValue& k : keys) seen = seen || values_equal(k, key);
                if (seen) continue;
                keys.push_back(key);
                kept.push_back(item);
            }
            return tpl_flavored(tpl_list(std::move(kept)), ListFlavor::iterator);
        }
        if (name == "min" || name == "max") {
            const TplValue* case_sensitive = args.get(0, "case_sensitive");
            const TplValue* attribute = args.get(1, "attribute");
            const bool exact = case_sensitive && tpl_truthy(*case_sensitive);
            const TplValue* best = nullptr;
            TplValue best_key;
            for (const TplValue& item : items) {
                TplValue key = attribute ? get_item(item, *attribute, line) : item;
                if (!exact && key.kind == TplKind::string) key = tpl_string(text_lower(key.text));
                int c = 0;
                if (best && !order(key, best_key, &c)) return runtime_error(line, name + ": values cannot be ordered");
                if (!best || (name == "min" ? c < 0 : c > 0)) { best = &item; best_key = key; }
            }
            return best ? *best : tpl_undefined();
        }
        if (name == "sum") {
            const TplValue* attribute = args.get(0, "attribute");
            const TplValue* start = args.get(1, "start");
            TplValue total = start ? *start : tpl_int(0);
            for (const TplValue& item : items) {
                total = binary_op("+", total, attribute ? get_item(item, *attribute, line) : item, line);
                if (failed()) return TplValue();
            }
            return total;
        }
        if (name == "sort") {
            const TplValue* reverse = args.get(0, "reverse");
            const TplValue* attribute = args.get(2, "attribute");
            std::vector<std::pair<TplValue, TplValue>> keyed;
            for (const TplValue& item : items) keyed.emplace_back(attribute ? get_item(item, *attribute, line) : item, item);
            bool ok = true;
            std::stable_sort(keyed.begin(), keyed.end(), [&](const std::pair<TplValue, TplValue>& a, const std::pair<TplValue, TplValue>& b) {
                int c = 0;
                const TplValue ka = a.first.kind == TplKind::string ? tpl_string(text_lower(a.first.text)) : a.first;
                const TplValue kb = b.first.kind == TplKind::string ? tpl_string(text_lower(b.first.text)) : b.first;
                if (!order(ka, kb, &c)) ok = false;
                return c < 0;
            });
            if (!ok) return runtime_error(line, "sort: values cannot be ordered");
            std::vector<TplValue> sorted;
            for (auto& k : keyed) sorted.push_back(std::move(k.second));
            if (reverse && tpl_truthy(*reverse)) std::reverse(sorted.begin(), sorted.end());
            return tpl_list(std::move(sorted));
        }
        if (name == "map") {
            std::vector<TplValue> mapped;
            if (const TplValue* attribute = args.get(99, "attribute")) {
                const TplValue* fallback = args.get(99, "default");
                for (const TplValue& item : items) {
                    TplValue v = get_item(item, *attribute, line);
                    if (v.kind == TplKind::undefined && fallback) v = *fallback;
                    mapped.push_back(std::move(v));
                }
            } else {
                if (!a0 || a0->kind != TplKind::string) return runtime_error(line, "map expects a filter name or attribute=");
                TplArgs rest;
                rest.positional.assign(args.positional.begin() + 1, args.positional.end());
                rest.keywords = args.keywords;
                for (const TplValue& item : items) {
                    mapped.push_back(apply_filter(a0->text, item, rest, line));
                    if (failed()) return TplValue();
                }
            }
            if (failed()) return TplValue();
            return tpl_flavored(tpl_list(std::move(mapped)), ListFlavor::iterator);
        }
        // select / reject / selectattr / rejectattr
        const bool by_attribute = name == "selectattr" || name == "rejectattr";
        const bool keep_matches = name == "select" || name == "selectattr";
        const size_t test_index = by_attribute ? 1 : 0;
        if (by_attribute && (!a0 || a0->kind != TplKind::string)) return runtime_error(line, name + " expects an attribute name");
        const TplValue* test_name = test_index < args.positional.size() ? &args.positional[test_index] : nullptr;
        if (test_name && test_name->kind != TplKind::string) return runtime_error(line, name + " expects a test name");
        TplArgs test_args;
        if (test_name) test_args.positional.assign(args.positional.begin() + (std::ptrdiff_t)test_index + 1, args.positional.end());
        std::vector<TplValue> kept;
        for (const TplValue& item : items) {
            const TplValue subject = by_attribute ? get_item(item, *a0, line) : item;
            if (failed()) return TplValue();
            bool match = tpl_truthy(subject);
            if (test_name && !apply_test(test_name->text, subject, test_args, line, &match)) return TplValue();
            if (match == keep_matches) kept.push_back(item);
        }
        return tpl_flavored(tpl_list(std::move(kept)), ListFlavor::iterator);
    }

    //--- tests ---

    bool apply_test(const std::string& name, const TplValue& v, const TplArgs& args, int line, bool* result) {
        const TplValue* a0 = args.get(0, "");
        const TplKind k = v.kind;
        if (name == "defined") *result = k != TplKind::undefined;
        else if (name == "undefined") *result = k == TplKind::undefined;
        else if (name == "none") *result = k == TplKind::none;
        else if (name == "string") *result = k == TplKind::string;
        else if (name == "number") *result = tpl_is_number(v);
        else if (name == "integer") *result = k == TplKind::integer;
        else if (name == "float") *result = k == TplKind::floating;
        else if (name == "boolean") *result = k == TplKind::boolean;
        else if (name == "true") *result = k == TplKind::boolean && v.boolean;
        else if (name == "false") *result = k == TplKind::boolean && !v.boolean;
        else if (name == "mapping") *result = k == TplKind::dict && !v.dict->is_namespace;
        else if (name == "sequence")  // jinja2's Undefined has __len__ and __getitem__
            *result = k == TplKind::string || k == TplKind::undefined || tpl_plain_list(v) || (k == TplKind::dict && !v.dict->is_namespace);
        else if (name == "iterable") *result = k == TplKind::string || k == TplKind::list || k == TplKind::undefined || (k == TplKind::dict && !v.dict->is_namespace);
        else if (name == "callable") *result = k == TplKind::macro || k == TplKind::function;
        else if (name == "lower") *result = k == TplKind::string && text_lower(v.text) == v.text;
        else if (name == "upper") *result = k == TplKind::string && text_upper(v.text) == v.text;
        else if (name == "odd" || name == "even" || name == "divisibleby") {  // value % n == 0, as jinja2 does
            const TplValue divisor = name == "divisibleby" ? (a0 ? *a0 : TplValue()) : tpl_int(2);
            const TplValue remainder = binary_op("%", v, divisor, line);
            if (failed()) return false;
            *result = values_equal(remainder, tpl_int(name == "odd" ? 1 : 0));
        } else if (name == "sameas") {
            *result = a0 && (k == a0->kind) &&
                      (k == TplKind::none || k == TplKind::undefined || (k == TplKind::boolean && v.boolean == a0->boolean) ||
                       (k == TplKind::list && v.list == a0->list) || (k == TplKind::dict && v.dict == a0->dict));
        } else {
            static const char* const kCompareTests[][2] = {{"equalto", "=="}, {"eq", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="},
                                                           {"lt", "<"}, {"lessthan", "<"}, {"<", "<"}, {"le", "<="}, {"<=", "<="},
                                                           {"gt", ">"}, {"greaterthan", ">"}, {">", ">"}, {"ge", ">="}, {">=", ">="},
                                                           {"in", "in"}};
            for (const auto& t : kCompareTests)
                if (name == t[0]) {
                    if (!a0) { runtime_error(line, "test '" + name + "' expects an argument"); return false; }
                    return compare(t[1], v, *a0, line, result);
                }
            fail_at(line, Status::unsupported, "unsupported test '" + name + "'");
            return false;
        }
        return true;
    }
};

}  // namespace detail

MOE_API Status render_chat_template(const std::string& template_source, const std::string& messages_json,
                                    const ChatTemplateOptions& options, std::string* out) {
    using namespace detail;
    if (!out) return fail(Status::invalid_argument, "render_chat_template: out is null");
    out->clear();
    TplValue messages, tools, extra;
    std::string why;
    if (!parse_json(messages_json, &messages, &why))
        return fail(Status::invalid_argument, "chat messages: invalid JSON: %s", why.c_str());
    if (messages.kind != TplKind::list) return fail(Status::invalid_argument, "chat messages: expected a JSON array");
    if (!options.tools_json.empty()) {
        if (!parse_json(options.tools_json, &tools, &why)) return fail(Status::invalid_argument, "chat tools: invalid JSON: %s", why.c_str());
        if (tools.kind != TplKind::list) return fail(Status::invalid_argument, "chat tools: expected a JSON array");
    }
    if (!options.extra_context_json.empty()) {
        if (!parse_json(options.extra_context_json, &extra, &why))
            return fail(Status::invalid_argument, "chat template context: invalid JSON: %s", why.c_str());
        if (extra.kind != TplKind::dict) return fail(Status::invalid_argument, "chat template context: expected a JSON object");
    }
    const size_t bad = utf8_invalid_offset(template_source);
    if (bad != std::string::npos)
        return fail(Status::invalid_argument, "chat template: invalid UTF-8 at byte offset %llu", (unsigned long long)bad);
    if (utf8_invalid_offset(options.bos_token) != std::string::npos || utf8_invalid_offset(options.eos_token) != std::string::npos)
        return fail(Status::invalid_argument, "chat template: bos/eos token is not valid UTF-8");

    std::vector<TplToken> tokens;
    int line = 0;
    if (!TemplateLexer(template_source).tokenize(&tokens, &why, &line))
        return fail(Status::invalid_argument, "chat template line %d: syntax error: %s", line, why.c_str());
    StmtList program;
    TemplateParser parser(tokens);
    if (!parser.parse(&program))
        return fail(parser.status, "chat template line %d: %s", parser.error_line, parser.error.c_str());

    TplFrame globals;
    globals.set("messages", messages);
    globals.set("add_generation_prompt", tpl_bool(options.add_generation_prompt));
    globals.set("bos_token", tpl_string(options.bos_token));
    globals.set("eos_token", tpl_string(options.eos_token));
    if (!options.tools_json.empty()) globals.set("tools", tools);
    if (options.enable_thinking >= 0) globals.set("enable_thinking", tpl_bool(options.enable_thinking != 0));
    if (extra.kind == TplKind::dict)
        for (const auto& e : extra.dict->entries) globals.set(e.first, e.second);

    TemplateRenderer renderer;
    renderer.pinned_time = options.strftime_now_time;
    std::string rendered;
    renderer.exec(program, globals, &rendered);
    if (renderer.failed())
        return fail(renderer.status, "chat template line %d: %s", renderer.error_line, renderer.error.c_str());
    *out = std::move(rendered);
    return Status::ok;
}

}  // namespace moe

namespace moe {
namespace detail {

// Builds GBNF rules for a JSON Schema subset: type (object, array, string, number, integer, boolean,
// null, or a list of them), properties/required/additionalProperties, items/minItems/maxItems,
// enum, const, anyOf/oneOf, $ref into #/$defs or #/definitions, minLength/maxLength. Anything
// else that constrains values (pattern, format, minimum, ...) is refused by name rather than
// silently ignored.
class JsonSchemaConverter {
public:
    Status convert(const TplValue& schema, std::string* gbnf) {
        root_ = &schema;
        rules_.clear();
        for (const char* fixed : {"root", "ws", "json-string", "json-number", "json-integer", "json-value", "json-object", "json-array"}) names_.insert(fixed);
        std::string body;
        if (!visit(schema, "value", 0, &body)) return status_;
        if (grammar_bytes_ > (1u << 20)) return fail(Status::unsupported, "JSON schema: the grammar would exceed 1 MiB");
        std::string out = "root ::= " + body + "\n";
        for (const auto& r : rules_) out += r.first + " ::= " + r.second + "\n";
        out += "ws ::= [ \\t\\n]{0,20}\n";
        out += "json-string ::= \"\\\"\" ( [^\"\\\\\\x00-\\x1f] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4}) )* \"\\\"\"\n";
        out += "json-number ::= \"-\"? (\"0\" | [1-9] [0-9]{0,15}) (\".\" [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?\n";
        out += "json-integer ::= \"-\"? (\"0\" | [1-9] [0-9]{0,15})\n";
        out += "json-value ::= json-object | json-array | json-string | json-number | \"true\" | \"false\" | \"null\"\n";
        out += "json-object ::= \"{\" ws ( json-string ws \":\" ws json-value ws ( \",\" ws json-string ws \":\" ws json-value ws )* )? \"}\"\n";
        out += "json-array ::= \"[\" ws ( json-value ws ( \",\" ws json-value ws )* )? \"]\"\n";
        *gbnf = out;
        return Status::ok;
    }

private:
    bool error(const std::string& what) {
        status_ = fail(Status::unsupported, "JSON schema: %s", what.c_str());
        return false;
    }
    static std::string literal(const std::string& s) {  // a GBNF string literal
        std::string out = "\"";
        for (unsigned char c : s) {
            if (c == '"' || c == '\\') { out += '\\'; out += (char)c; }
            else if (c == '\n') out += "\\n";
            else if (c < 0x20) { char buf[8]; std::snprintf(buf, sizeof buf, "\\x%02x", c); out += buf; }
            else out += (char)c;
        }
        return out + "\"";
    }
    static std::string json_literal(const TplValue& v) {  // a JSON value as the exact text to emit
        std::string text, err;
        JsonStyle style;
        style.item_separator = ",";
        style.key_separator = ":";
        json_dump(v, style, 0, &text, &err);
        return literal(text);
    }
    std::string add_rule(const std::string& hint, const std::string& body) {
        std::string name;
        for (char c : hint) name += std::isalnum((unsigned char)c) ? c : '-';
        if (name.empty() || !std::isalpha((unsigned char)name[0])) name = "r-" + name;
        std::string unique = name;
        for (int k = 2; names_.count(unique); ++k) unique = name + "-" + std::to_string(k);
        names_.insert(unique);
        grammar_bytes_ += unique.size() + body.size();
        rules_.push_back({unique, body});
        return unique;
    }
    const TplValue* resolve(const std::string& ref) {
        for (const char* prefix : {"#/$defs/", "#/definitions/"}) {
            const std::string p = prefix;
            if (ref.compare(0, p.size(), p) != 0) continue;
            const TplValue* defs = root_->kind == TplKind::dict ? root_->dict->find(p.substr(2, p.size() - 3)) : nullptr;
            if (defs && defs->kind == TplKind::dict) return defs->dict->find(ref.substr(p.size()));
        }
        return nullptr;
    }
    // The GBNF expression for `schema` (rules for its parts added under `hint`).
    bool visit(const TplValue& schema, const std::string& hint, int depth, std::string* out) {
        if (depth > 64) return error("nesting deeper than 64");
        if (grammar_bytes_ > (1u << 20)) return error("the grammar would exceed 1 MiB");
        if (schema.kind == TplKind::boolean) { *out = schema.boolean ? "json-value" : "\"\""; if (!schema.boolean) return error("'false' schema"); return true; }
        if (schema.kind != TplKind::dict) return error("a schema must be an object");
        const TplDict& d = *schema.dict;
        static const char* kRefused[] = {"pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                                         "patternProperties", "allOf", "not", "if", "dependentRequired", "uniqueItems", "contains",
                                         "prefixItems", "minProperties", "maxProperties"};
        for (const char* k : kRefused)
            if (d.find(k)) return error(std::string("'") + k + "' is not supported");
        if (const TplValue* ref = d.find("$ref")) {
            if (ref->kind != TplKind::string) return error("'$ref' must be a string");
            const auto done = ref_rules_.find(ref->text);
            if (done != ref_rules_.end()) { *out = done->second; return true; }  // one rule per target: no re-expansion
            const TplValue* target = resolve(ref->text);
            if (!target) return error("cannot resolve $ref '" + ref->text + "' (only #/$defs/NAME and #/definitions/NAME)");
            const std::string name = add_rule("ref-" + ref->text.substr(ref->text.rfind('/') + 1), "\"\"");
            ref_rules_[ref->text] = name;  // before the visit: recursive schemas refer to the rule
            std::string body;
            if (!visit(*target, name, depth + 1, &body)) return false;
            for (auto& r : rules_)
                if (r.first == name) r.second = body;
            *out = name;
            return true;
        }
        if (const TplValue* c = d.find("const")) { *out = json_literal(*c); return true; }
        if (const TplValue* e = d.find("enum")) {
            if (e->kind != TplKind::list || e->list->items.empty()) return error("'enum' must be a non-empty array");
            std::string alts;
            for (const TplValue& v : e->list->items) alts += (alts.empty() ? "" : " | ") + json_literal(v);
            *out = "(" + alts + ")";
            return true;
        }
        for (const char* key : {"anyOf", "oneOf"})
            if (const TplValue* any = d.find(key)) {
                if (any->kind != TplKind::list || any->list->items.empty()) return error(std::string("'") + key + "' must be a non-empty array");
                std::string alts;
                for (size_t i = 0; i < any->list->items.size(); ++i) {
                    std::string part;
                    if (!visit(any->list->items[i], hint + "-" + std::to_string(i), depth + 1, &part)) return false;
                    alts += (alts.empty() ? "" : " | ") + part;
                }
                *out = add_rule(hint, alts);
                return true;
            }
        const TplValue* type = d.find("type");
        if (!type) {
            if (d.find("properties")) return visit_object(d, hint, depth, out);
            *out = "json-value";  // {} accepts any JSON value
            return true;
        }
        if (type->kind == TplKind::list) {
            std::string alts;
            for (const TplValue& t : type->list->items) {
                if (t.kind != TplKind::string) return error("'type' entries must be strings");
                std::string part;
                if (!visit_type(t.text, d, hint + "-" + t.text, depth, &part)) return false;
                alts += (alts.empty() ? "" : " | ") + part;
            }
            if (alts.empty()) return error("'type' is an empty array");
            *out = "(" + alts + ")";
            return true;
        }
        if (type->kind != TplKind::string) return error("'type' must be a string or an array");
        return visit_type(type->text, d, hint, depth, out);
    }
    bool visit_type(const std::string& type, const TplDict& d, const std::string& hint, int depth, std::string* out) {
        if (type == "object") return visit_object(d, hint, depth, out);
        if (type == "array") return visit_array(d, hint, depth, out);
        if (type == "number") { *out = "json-number"; return true; }
        if (type == "integer") { *out = "json-integer"; return true; }
        if (type == "boolean") { *out = "(\"true\" | \"false\")"; return true; }
        if (type == "null") { *out = "\"null\""; return true; }
        if (type == "string") {
            long lo = 0, hi = -1;
            if (!bound(d, "minLength", &lo) || !bound(d, "maxLength", &hi)) return false;
            if (lo == 0 && hi < 0) { *out = "json-string"; return true; }
            if (hi >= 0 && hi < lo) return error("maxLength < minLength");
            const std::string ch = "( [^\"\\\\\\x00-\\x1f] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4}) )";
            *out = add_rule(hint + "-string", "\"\\\"\" " + ch + "{" + std::to_string(lo) + "," + (hi >= 0 ? std::to_string(hi) : "") + "} \"\\\"\"");
            return true;
        }
        return error("unknown type '" + type + "'");
    }
    bool bound(const TplDict& d, const char* key, long* out) {
        const TplValue* v = d.find(key);
        if (!v) return true;
        if (v->kind != TplKind::integer || v->integer < 0 || v->integer > 1000) return error(std::string("'") + key + "' must be an integer in [0, 1000]");
        *out = (long)v->integer;
        return true;
    }
    // Properties in their declared order; required ones always, optional ones each maybe. Extra
    // properties only with "additionalProperties": true or a schema.
    bool visit_object(const TplDict& d, const std::string& hint, int depth, std::string* out) {
        const TplValue* props = d.find("properties");
        const TplValue* required = d.find("required");
        const TplValue* extra = d.find("additionalProperties");
        if (props && props->kind != TplKind::dict) return error("'properties' must be an object");
        auto is_required = [&](const std::string& k) {
            if (!required || required->kind != TplKind::list) return false;
            for (const TplValue& r : required->list->items)
                if (r.kind == TplKind::string && r.text == k) return true;
            return false;
        };
        std::vector<std::pair<std::string, bool>> items;  // (key-value expression, required)
        if (props)
            for (const auto& kv : props->dict->entries) {
                std::string value;
                if (!visit(kv.second, hint + "-" + kv.first, depth + 1, &value)) return false;
                std::string key_text;
                json_escape_string(kv.first, false, &key_text);
                items.push_back({literal(key_text) + " ws \":\" ws " + value, is_required(kv.first)});
            }
        std::string extra_kv;
        if (extra && !(extra->kind == TplKind::boolean && !extra->boolean)) {
            std::string value = "json-value";
            if (extra->kind == TplKind::dict && !visit(*extra, hint + "-extra", depth + 1, &value)) return false;
            extra_kv = "json-string ws \":\" ws " + value;
        } else if (!props) {
            extra_kv = "json-string ws \":\" ws json-value";  // {"type": "object"}: any members
        }
        // A chain: each property in order, optional ones skippable; commas between present members.
        // rest_i = what may follow once something was emitted, from property i on.
        std::string rest = extra_kv.empty() ? "" : add_rule(hint + "-more", "( \",\" ws " + extra_kv + " ws )*");
        std::string first = extra_kv.empty() ? "\"\"" : "( " + extra_kv + " ws " + rest + " )?";
        for (size_t i = items.size(); i-- > 0;) {
            const std::string& kv = items[i].first;
            const std::string after = rest.empty() ? "" : " " + rest;
            const std::string rest_here = add_rule(hint + "-after-" + std::to_string(i),
                                                   items[i].second ? "\",\" ws " + kv + " ws" + after
                                                                   : "( \",\" ws " + kv + " ws )?" + after);
            const std::string first_here = items[i].second ? kv + " ws" + after : "( " + kv + " ws" + after + " | " + first + " )";
            rest = rest_here;
            first = first_here;
        }
        *out = add_rule(hint.empty() ? "object" : hint, "\"{\" ws " + first + " \"}\"");
        return true;
    }
    bool visit_array(const TplDict& d, const std::string& hint, int depth, std::string* out) {
        std::string item = "json-value";
        if (const TplValue* items = d.find("items"))
            if (!visit(*items, hint + "-item", depth + 1, &item)) return false;
        long lo = 0, hi = -1;
        if (!bound(d, "minItems", &lo) || !bound(d, "maxItems", &hi)) return false;
        if (hi >= 0 && hi < lo) return error("maxItems < minItems");
        const std::string more = "( \",\" ws " + item + " ws )";
        std::string body;
        if (hi == 0) body = "\"[\" ws \"]\"";
        else {
            const std::string tail = more + "{" + std::to_string(lo > 0 ? lo - 1 : 0) + "," + (hi >= 0 ? std::to_string(hi - 1) : "") + "}";
            const std::string some = item + " ws " + tail;
            body = "\"[\" ws " + (lo > 0 ? some : "( " + some + " )?") + " \"]\"";
        }
        *out = add_rule(hint + "-array", body);
        return true;
    }

    const TplValue* root_ = nullptr;
    std::vector<std::pair<std::string, std::string>> rules_;
    std::unordered_set<std::string> names_;
    std::unordered_map<std::string, std::string> ref_rules_;  // $ref target -> its rule
    size_t grammar_bytes_ = 0;
    Status status_ = Status::ok;
};

}  // namespace detail

MOE_API Status json_schema_to_grammar(const std::string& schema_json, std::string* gbnf) {
    if (!gbnf) return detail::fail(Status::invalid_argument, "json_schema_to_grammar: null output");
    detail::TplValue schema;
    std::string error;
    if (!detail::parse_json(schema_json, &schema, &error)) return detail::fail(Status::invalid_argument, "JSON schema: invalid JSON: %s", error.c_str());
    detail::JsonSchemaConverter converter;
    Status s = converter.convert(schema, gbnf);
    if (s != Status::ok) return s;
    SamplerOptions check;  // e.g. a $ref cycle that starts with itself is a left-recursive grammar
    check.grammar = *gbnf;
    return check_sampler_options(check);
}

}  // namespace moe

#endif  // MOE_INFER_IMPLEMENTATION

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 the moe_infer authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/

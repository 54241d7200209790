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
       MOE_INFER_STATIC           give every library function internal linkage
       MOE_API                    decoration for public functions (default: nothing)
       MOE_ASSERT(x)              programmer-error check (default: assert)
       MOE_MALLOC(sz)/MOE_FREE(p) aligned-buffer allocator (define both or neither)
       MOE_NO_SIMD                scalar kernels only
       MOE_NO_AVX2 / MOE_NO_AVX512 / MOE_NO_NEON   drop one SIMD path
       MOE_NO_THREADS             no std::thread: everything runs on the calling thread
       MOE_NO_OPENMP              ignore _OPENMP even when compiling with -fopenmp
       MOE_NO_MMAP                read model files into memory instead of mapping them
       MOE_USE_REFERENCE_KERNELS  force the scalar _ref kernels (for bisecting numeric bugs)

   SUPPORTED
       architectures: qwen3moe, olmoe, qwen2moe (shared expert + sigmoid gate), llama (Mixtral-style
       ffn_*_exps, and dense llama), all hyper-parameters from GGUF metadata.
       tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (ggml block layouts, bit-exact).
       tokenizers: byte-level BPE ("gpt2": qwen2, llama-bpe, gpt-2, deepseek-llm pre-tokenizers...)
       and SentencePiece ("llama").

   INDEX OF THIS FILE
       [SECTION] VERSION & API MACROS
       [SECTION] STATUS
       [SECTION] GGUF
       [SECTION] TOKENIZER
       [SECTION] SAMPLER
       [SECTION] MODEL & SESSION
       [SECTION] GENERATION
       --- implementation ---
       [SECTION] CONFIG DEFAULTS & PLATFORM      >>config
       [SECTION] UTILITIES                       >>util
       [SECTION] STATUS & LOGGING                >>status
       [SECTION] FILE MAPPING                    >>file
       [SECTION] GGUF READER & WRITER            >>gguf
       [SECTION] QUANT FORMATS                   >>quant
       [SECTION] KERNELS: REFERENCE              >>kernels-ref
       [SECTION] KERNELS: X86 (AVX2, AVX-512, VNNI)  >>kernels-x86
       [SECTION] KERNEL DISPATCH                 >>dispatch
       [SECTION] THREAD POOL                     >>threads
       [SECTION] TOKENIZER IMPLEMENTATION        >>tokenizer
       [SECTION] MODEL LOADING                   >>loader
       [SECTION] FORWARD PASS                    >>forward
       [SECTION] SAMPLER IMPLEMENTATION          >>sampler
       [SECTION] GENERATION IMPLEMENTATION       >>generate

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
#define MOE_API static
#else
#define MOE_API
#endif
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
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
    f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, q4_k = 12, q5_k = 13, q6_k = 14, bf16 = 30,
};
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
// One weight row (`n` elements of `type`) dotted with float activations `x`, through the kernel of
// `isa` (x is first quantized to the type's activation format, as the forward pass does). For tests.
MOE_API Status vec_dot(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out);
// The activation row `type`'s kernels dot against (Q8_0 / Q8_K blocks, or float), made with the
// quantizer of `isa`; dst_size >= its size. SIMD quantizers are bit-exact with the scalar ones.
MOE_API Status quantize_activations(TensorType weight_type, Isa isa, const float* x, int64_t n, void* dst, size_t dst_size);

// Reference quantization of `n` floats (n a multiple of the block size) into `dst`
// (n / block_elems * block_bytes bytes) and back. For tests, tools and GgufWriter.
MOE_API Status quantize_row(TensorType type, const float* src, void* dst, int64_t n);
MOE_API Status dequantize_row(TensorType type, const void* src, float* dst, int64_t n);

//-----------------------------------------------------------------------------
// [SECTION] TOKENIZER
//-----------------------------------------------------------------------------
// Built from the GGUF's tokenizer.ggml.* metadata. Byte-level BPE ("gpt2") with the
// pre-tokenizers of common families, and SentencePiece-style ("llama"). Read-only after load:
// safe to call from several threads at once.

namespace detail { struct TokenizerImpl; }

class Tokenizer {
public:
    Tokenizer();
    ~Tokenizer();
    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;

    // Loads the vocabulary of a GGUF file (tokenizer.ggml.*). Status::tokenizer_error or
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
// A fixed chain: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
// temperature <= 0 means greedy (argmax; ties go to the lowest id). A value type: copy it to
// fork the RNG state; the same seed and logits give the same tokens on every platform.

struct SamplerOptions {
    float temperature = 0.8f;
    int top_k = 40;                // 0 = off
    float top_p = 0.95f;           // 1 = off
    float min_p = 0.05f;           // 0 = off
    float repeat_penalty = 1.0f;   // 1 = off (llama.cpp semantics: divide positive logits, multiply negative)
    int repeat_last_n = 64;        // how many recent tokens the penalty looks at
    uint64_t seed = 0;
};

class Sampler {
public:
    Sampler() : Sampler(SamplerOptions{}) {}
    explicit Sampler(const SamplerOptions& options);
    // Picks a token from `logits` (n_vocab floats; not modified). Allocates only on the first
    // call or when n_vocab grows.
    int32_t sample(const float* logits, int32_t n_vocab);
    // Records a token (prompt or generated) for the repetition penalty.
    void accept(int32_t token);
    void reset();  // forgets history and re-seeds
    const SamplerOptions& options() const { return options_; }

private:
    struct Candidate { float logit; int32_t id; };
    double next_uniform();  // [0, 1)
    SamplerOptions options_;
    uint64_t rng_state_[4] = {0, 0, 0, 0};
    std::vector<int32_t> history_;
    size_t history_pos_ = 0;
    std::vector<Candidate> candidates_;
    std::vector<double> probs_;
};

//-----------------------------------------------------------------------------
// [SECTION] MODEL & SESSION
//-----------------------------------------------------------------------------

struct LoadOptions {
    bool use_mmap = true;   // false: read the whole file into memory
    LogFn log = nullptr;    // optional; receives load diagnostics
    void* log_user = nullptr;
};

// Hyper-parameters, all read from GGUF metadata.
struct ModelInfo {
    std::string architecture;  // "qwen3moe", "olmoe", "qwen2moe", "llama"
    std::string name;          // general.name or ""
    int32_t n_vocab = 0, n_embd = 0, n_layer = 0, n_ctx_train = 0;
    int32_t n_head = 0, n_head_kv = 0, head_dim = 0, n_rot = 0;
    int32_t n_expert = 0, n_expert_used = 0, n_ff = 0, n_ff_shared = 0;  // n_expert == 0: dense FFN
    float rms_eps = 1e-6f, rope_freq_base = 10000.f, rope_freq_scale = 1.f;
    bool rope_neox = true;          // NEOX (i, i+d/2) pairs vs normal (2i, 2i+1) pairs
    bool expert_weights_norm = true;  // renormalise the top-k router weights to sum 1
    uint64_t weight_bytes = 0;         // bytes of all tensors
    uint64_t active_bytes_per_token = 0;  // bytes read per decoded token (only active experts)
};

namespace detail { struct ModelImpl; struct SessionImpl; }

// Read-only weights (mapped from the file) + tokenizer. Load once; share across threads: every
// const method is safe to call concurrently, and Sessions on several threads can use one Model.
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

private:
    friend class Session;
    std::shared_ptr<const detail::ModelImpl> impl_;
};

struct SessionOptions {
    int32_t n_ctx = 0;      // KV-cache positions; 0 = min(model's training context, 4096)
    int32_t n_threads = 0;  // 0 = hardware threads (capped at 16)
    int32_t n_batch = 0;    // max tokens per internal forward chunk during prefill; 0 = 64
    // Dot products against float32 activations instead of quantizing each matmul input to 8 bits
    // (Q8_0/Q8_K, as llama.cpp does). Closer to a float reference (transformers), slower.
    bool float_activations = false;
};

// Per-sequence state: KV cache, scratch, thread pool. One Session per thread; the Model may be
// shared. All scratch is sized at create(): eval() of one token never allocates.
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
    // holds the last row. Status: invalid_argument (token id out of range, n == 0),
    // context_full (position + n > n_ctx; nothing is evaluated then).
    Status eval(const int32_t* tokens, size_t n, float* all_logits = nullptr);
    const float* logits() const;  // n_vocab floats after the last evaluated token
    int32_t position() const;     // tokens in the KV cache
    int32_t n_ctx() const;
    void reset();                 // empties the KV cache
    // Keeps only the first `n` positions (n <= position()).
    Status truncate(int32_t n);
    const Model& model() const;
    // Experts chosen for the last evaluated token: n_layer * n_expert_used ids (layer-major).
    const int32_t* last_expert_ids() const;

private:
    std::unique_ptr<detail::SessionImpl> impl_;
    const Model* model_ = nullptr;
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
};

// Called with each newly complete piece of text (UTF-8 boundaries respected; text that might be
// the start of a stop string is held back). Return false to stop.
typedef bool (*StreamFn)(void* user, int32_t token, const char* text, size_t size);

// Evaluates `prompt` (appended to the session's KV cache), then samples up to max_tokens.
// `on_token` and `result` may be null.
MOE_API Status generate(Session& session, const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        StreamFn on_token, void* user, GenerateResult* result);

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
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <new>
#include <unordered_map>

#ifndef MOE_ASSERT
#include <cassert>
#define MOE_ASSERT(x) assert(x)
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

#if !defined(MOE_NO_THREADS)
#include <thread>
#define MOE_DETAIL_HAS_THREADS 1
#else
#define MOE_DETAIL_HAS_THREADS 0
#endif

#if defined(_OPENMP) && !defined(MOE_NO_OPENMP) && !defined(MOE_NO_THREADS)
#include <omp.h>
#define MOE_DETAIL_HAS_OPENMP 1
#else
#define MOE_DETAIL_HAS_OPENMP 0
#endif

#include <chrono>

#if !defined(MOE_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MOE_DETAIL_X86 1
#else
#define MOE_DETAIL_X86 0
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

// 64-byte aligned float/byte buffer, allocated once (session scratch, KV cache).
template <typename T>
struct AlignedBuffer {
    T* data = nullptr;
    size_t size = 0;
    AlignedBuffer() = default;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer() { release(); }
    bool allocate(size_t n) {
        release();
        if (n == 0) return true;
        if (n > SIZE_MAX / sizeof(T) - 64) return false;
        size_t bytes = (n * sizeof(T) + 63) & ~(size_t)63;
#if defined(MOE_MALLOC)
        void* p = MOE_MALLOC(bytes);
#elif defined(_MSC_VER)
        void* p = _aligned_malloc(bytes, 64);
#else
        void* p = std::aligned_alloc(64, bytes);
#endif
        if (!p) return false;
        std::memset(p, 0, bytes);
        data = static_cast<T*>(p);
        size = n;
        return true;
    }
    void release() {
        if (!data) return;
#if defined(MOE_MALLOC)
        MOE_FREE(data);
#elif defined(_MSC_VER)
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

#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 2, 3)))
#endif
inline Status fail(Status status, const char* format, ...) {
    char buffer[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(buffer, sizeof buffer, format, args);
    va_end(args);
    last_error_storage() = buffer;
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
// >>file  A read-only view of a whole file: mmap on POSIX (pages come in on demand and are shared
// by processes), otherwise one read into an owned buffer.

namespace moe {
namespace detail {

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
#endif
    }

    Status open(const char* path, bool use_mmap) {
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
#else
        (void)use_mmap;
#endif
        std::FILE* f = std::fopen(path, "rb");
        if (!f) return fail(Status::io_error, "cannot open '%s'", path);
        std::vector<uint8_t> bytes;
        uint8_t chunk[1 << 16];
        size_t got;
        while ((got = std::fread(chunk, 1, sizeof chunk, f)) > 0) bytes.insert(bytes.end(), chunk, chunk + got);
        bool error = std::ferror(f) != 0;
        std::fclose(f);
        if (error) return fail(Status::io_error, "read error on '%s'", path);
        if (bytes.empty()) return fail(Status::invalid_file, "'%s' is empty", path);
        owned.swap(bytes);
        data = owned.data();
        size = owned.size();
        return Status::ok;
    }
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

struct TypeTraits {
    uint32_t id;
    const char* name;
    int block_elems;
    int block_bytes;
};

inline const TypeTraits* type_traits(uint32_t id) {
    static const TypeTraits table[] = {
        {0, "F32", 1, 4},     {1, "F16", 1, 2},      {2, "Q4_0", 32, 18},   {8, "Q8_0", 32, 34},
        {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176}, {14, "Q6_K", 256, 210}, {30, "BF16", 1, 2},
    };
    for (const TypeTraits& t : table)
        if (t.id == id) return &t;
    return nullptr;
}

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
};

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
        const TypeTraits* tt = type_traits(t.type);
        if (!tt) return fail(Status::unsupported, "tensor '%s' has unsupported type id %u", t.name.c_str(), t.type);
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
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)t);
    return tt ? tt->name : "unknown";
}
MOE_API int tensor_type_block_elems(TensorType t) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)t);
    return tt ? tt->block_elems : 0;
}
MOE_API int tensor_type_block_bytes(TensorType t) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)t);
    return tt ? tt->block_bytes : 0;
}
MOE_API bool tensor_type_supported(uint32_t raw) { return detail::type_traits(raw) != nullptr; }

GgufFile::GgufFile() = default;
GgufFile::~GgufFile() = default;
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;

Status GgufFile::open(const char* path, bool use_mmap, GgufFile* out) {
    if (!out) return detail::fail(Status::invalid_argument, "null output");
    std::unique_ptr<detail::GgufFileImpl> impl(new (std::nothrow) detail::GgufFileImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = impl->view.open(path, use_mmap);
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

Status GgufFile::open_memory(const void* data, size_t size, GgufFile* out) {
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

uint32_t GgufFile::version() const { return impl_ ? impl_->version : 0; }
uint32_t GgufFile::alignment() const { return impl_ ? impl_->alignment : 0; }
size_t GgufFile::n_keys() const { return impl_ ? impl_->kv.size() : 0; }
const GgufKeyValue& GgufFile::key_at(size_t i) const { return impl_->kv[i]; }
size_t GgufFile::n_tensors() const { return impl_ ? impl_->tensors.size() : 0; }
const GgufTensorInfo& GgufFile::tensor_at(size_t i) const { return impl_->tensors[i]; }
size_t GgufFile::file_size() const { return impl_ ? impl_->size : 0; }

const GgufKeyValue* GgufFile::find(const char* key) const {
    if (!impl_ || !key) return nullptr;
    auto it = impl_->key_index.find(key);
    return it == impl_->key_index.end() ? nullptr : &impl_->kv[it->second];
}
const GgufTensorInfo* GgufFile::find_tensor(const char* name) const {
    if (!impl_ || !name) return nullptr;
    auto it = impl_->tensor_index.find(name);
    return it == impl_->tensor_index.end() ? nullptr : &impl_->tensors[it->second];
}

Status GgufFile::get_u32(const char* key, uint32_t* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (!detail::gguf_is_integer(e->type)) return detail::fail(Status::invalid_file, "metadata '%s' is not an integer", key);
    if ((detail::gguf_is_signed(e->type) && (int64_t)e->scalar_u64 < 0) || e->scalar_u64 > UINT32_MAX)
        return detail::fail(Status::invalid_file, "metadata '%s' is out of range", key);
    *out = (uint32_t)e->scalar_u64;
    return Status::ok;
}
Status GgufFile::get_f32(const char* key, float* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type == GgufValueType::string || e->type == GgufValueType::array || e->type == GgufValueType::boolean)
        return detail::fail(Status::invalid_file, "metadata '%s' is not a number", key);
    *out = (float)e->scalar_f64;
    return Status::ok;
}
Status GgufFile::get_bool(const char* key, bool* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::boolean && !detail::gguf_is_integer(e->type)) return detail::fail(Status::invalid_file, "metadata '%s' is not a bool", key);
    *out = e->scalar_u64 != 0;
    return Status::ok;
}
Status GgufFile::get_string(const char* key, std::string* out) const {
    const GgufKeyValue* e = find(key);
    if (!e) return detail::fail(Status::missing_key, "missing metadata key '%s'", key);
    if (e->type != GgufValueType::string) return detail::fail(Status::invalid_file, "metadata '%s' is not a string", key);
    out->assign(e->scalar_str.data, e->scalar_str.size);
    return Status::ok;
}
Status GgufFile::get_string_array(const char* key, std::vector<std::string>* out) const {
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
Status GgufFile::get_f32_array(const char* key, std::vector<float>* out) const {
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
Status GgufFile::get_i32_array(const char* key, std::vector<int32_t>* out) const {
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

void GgufWriter::set_raw(const std::string& key, GgufValueType type, GgufValueType array_type, uint64_t count, std::vector<uint8_t> payload) {
    for (Entry& e : entries_)
        if (e.key == key) {
            e.type = type; e.array_type = array_type; e.count = count; e.payload = std::move(payload);
            return;
        }
    entries_.push_back(Entry{key, type, array_type, count, std::move(payload)});
}
void GgufWriter::set_u32(const std::string& key, uint32_t v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::u32, GgufValueType::u8, 0, p); }
void GgufWriter::set_i32(const std::string& key, int32_t v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::i32, GgufValueType::u8, 0, p); }
void GgufWriter::set_f32(const std::string& key, float v) { std::vector<uint8_t> p; detail::put(p, v); set_raw(key, GgufValueType::f32, GgufValueType::u8, 0, p); }
void GgufWriter::set_bool(const std::string& key, bool v) { std::vector<uint8_t> p; detail::put<uint8_t>(p, v ? 1 : 0); set_raw(key, GgufValueType::boolean, GgufValueType::u8, 0, p); }
void GgufWriter::set_string(const std::string& key, const std::string& v) { std::vector<uint8_t> p; detail::put_string(p, v); set_raw(key, GgufValueType::string, GgufValueType::u8, 0, p); }
void GgufWriter::set_string_array(const std::string& key, const std::vector<std::string>& v) {
    std::vector<uint8_t> p;
    for (const std::string& s : v) detail::put_string(p, s);
    set_raw(key, GgufValueType::array, GgufValueType::string, v.size(), p);
}
void GgufWriter::set_f32_array(const std::string& key, const std::vector<float>& v) {
    std::vector<uint8_t> p;
    detail::put_bytes(p, v.data(), v.size() * 4);
    set_raw(key, GgufValueType::array, GgufValueType::f32, v.size(), p);
}
void GgufWriter::set_i32_array(const std::string& key, const std::vector<int32_t>& v) {
    std::vector<uint8_t> p;
    detail::put_bytes(p, v.data(), v.size() * 4);
    set_raw(key, GgufValueType::array, GgufValueType::i32, v.size(), p);
}

Status GgufWriter::add_tensor(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data) {
    if (!data) return detail::fail(Status::invalid_argument, "tensor '%s': null data", name.c_str());
    return add_tensor_impl(name, type, n_dims, ne, data);
}

Status GgufWriter::add_tensor_deferred(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne) {
    return add_tensor_impl(name, type, n_dims, ne, nullptr);
}

Status GgufWriter::add_tensor_impl(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const void* data) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)type);
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
    tensors_.push_back(std::move(t));
    return Status::ok;
}

Status GgufWriter::add_tensor_f32(const std::string& name, TensorType type, uint32_t n_dims, const int64_t* ne, const float* values) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)type);
    if (!tt || n_dims < 1 || n_dims > 4 || !ne) return detail::fail(Status::invalid_argument, "tensor '%s': bad type or shape", name.c_str());
    int64_t n = 1;
    for (uint32_t d = 0; d < n_dims; ++d) n *= ne[d];
    if (ne[0] % tt->block_elems) return detail::fail(Status::invalid_argument, "tensor '%s': row not a multiple of the block", name.c_str());
    std::vector<uint8_t> bytes((size_t)(n / tt->block_elems * tt->block_bytes));
    Status s = quantize_row(type, values, bytes.data(), n);
    if (s != Status::ok) return s;
    return add_tensor(name, type, n_dims, ne, bytes.data());
}

std::vector<uint8_t> GgufWriter::header_bytes(uint32_t* alignment_out) const {
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

std::vector<uint8_t> GgufWriter::to_bytes() const {
    uint32_t alignment;
    std::vector<uint8_t> out = header_bytes(&alignment);
    for (const Tensor& t : tensors_) {
        MOE_ASSERT(!t.deferred && "to_bytes() cannot hold deferred tensors; use write_streaming()");
        detail::put_bytes(out, t.data.data(), t.data.size());
        out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
    }
    return out;
}

Status GgufWriter::write(const char* path) const { return write_streaming(path, nullptr, nullptr); }

Status GgufWriter::write_streaming(const char* path, FillFn fill, void* user) const {
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
// Q4_0: x = d * (q - 8), q in [0, 15]; byte j: element j (low nibble), j + 16 (high). 4.5 bpw.
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
static_assert(sizeof(BlockQ4_0) == 18, "wrong q4_0 block size");
// Q4_K: 8 sub-blocks of 32 with 6-bit scale/min: x = d * sc * q - dmin * m. 4.5 bpw.
struct BlockQ4K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[kQKK / 2]; };
static_assert(sizeof(BlockQ4K) == 144, "wrong q4_K block size");
// Q5_K: as Q4_K with a 5th bit per weight in qh. 5.5 bpw.
struct BlockQ5K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[kQKK / 8]; uint8_t qs[kQKK / 2]; };
static_assert(sizeof(BlockQ5K) == 176, "wrong q5_K block size");
// Q6_K: 16 sub-blocks of 16, x = d * scale_i * (q - 32), q 6-bit. 6.5625 bpw.
struct BlockQ6K { uint8_t ql[kQKK / 2]; uint8_t qh[kQKK / 4]; int8_t scales[kQKK / 16]; uint16_t d; };
static_assert(sizeof(BlockQ6K) == 210, "wrong q6_K block size");
// Q8_K (activations only): d is f32 and may be negative; bsums[i] = sum of qs[16i..16i+15].
struct BlockQ8K { float d; int8_t qs[kQKK]; int16_t bsums[kQKK / 16]; };
static_assert(sizeof(BlockQ8K) == 292, "wrong q8_K block size");

inline int nearest_int(float x) { return (int)std::nearbyint(x); }

// ---- quantize (reference) ----

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
inline void quantize_superblock_k(const float* x, int bits, uint16_t* d_out, uint16_t* dmin_out, uint8_t* scales, uint8_t* L) {
    int nmax = (1 << bits) - 1;
    float sc[8], mn[8], w[32], max_sc = 0, max_mn = 0;
    float sum_x2 = 0;
    for (int i = 0; i < kQKK; ++i) sum_x2 += x[i] * x[i];
    float av_x = std::sqrt(sum_x2 / kQKK);
    for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < 32; ++i) w[i] = av_x + std::fabs(x[32 * j + i]);
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

inline void quantize_row_q4k_ref(BlockQ4K* y, const float* x, int64_t n) {
    uint8_t L[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        quantize_superblock_k(x, 4, &y[b].d, &y[b].dmin, y[b].scales, L);
        for (int c = 0; c < 4; ++c)
            for (int l = 0; l < 32; ++l) y[b].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

inline void quantize_row_q5k_ref(BlockQ5K* y, const float* x, int64_t n) {
    uint8_t L[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b, x += kQKK) {
        quantize_superblock_k(x, 5, &y[b].d, &y[b].dmin, y[b].scales, L);
        std::memset(y[b].qh, 0, sizeof y[b].qh);
        for (int c = 0; c < 4; ++c)
            for (int l = 0; l < 32; ++l) {
                int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                y[b].qs[32 * c + l] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
                if (lo & 16) y[b].qh[l] |= (uint8_t)(1 << (2 * c));
                if (hi & 16) y[b].qh[l] |= (uint8_t)(1 << (2 * c + 1));
            }
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
inline void dequantize_row_q4k(const BlockQ4K* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b) {
        float d = fp16_to_f32(x[b].d), dmin = fp16_to_f32(x[b].dmin);
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, x[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, x[b].scales, &s1, &m1);
            for (int l = 0; l < 32; ++l) {
                uint8_t q = x[b].qs[32 * c + l];
                y[64 * c + l] = d * s0 * (q & 15) - dmin * m0;
                y[64 * c + 32 + l] = d * s1 * (q >> 4) - dmin * m1;
            }
        }
        y += kQKK;
    }
}
inline void dequantize_row_q5k(const BlockQ5K* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / kQKK; ++b) {
        float d = fp16_to_f32(x[b].d), dmin = fp16_to_f32(x[b].dmin);
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, x[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, x[b].scales, &s1, &m1);
            for (int l = 0; l < 32; ++l) {
                uint8_t q = x[b].qs[32 * c + l], h = x[b].qh[l];
                int lo = (q & 15) | (((h >> (2 * c)) & 1) << 4), hi = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
                y[64 * c + l] = d * s0 * lo - dmin * m0;
                y[64 * c + 32 + l] = d * s1 * hi - dmin * m1;
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

}  // namespace detail

MOE_API Status quantize_row(TensorType type, const float* src, void* dst, int64_t n) {
    using namespace detail;
    const TypeTraits* tt = type_traits((uint32_t)type);
    if (!tt || !src || !dst || n < 0 || n % tt->block_elems) return fail(Status::invalid_argument, "quantize_row: bad type or length");
    switch (type) {
        case TensorType::f32: std::memcpy(dst, src, (size_t)n * 4); break;
        case TensorType::f16: for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_fp16(src[i]); break;
        case TensorType::bf16: for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_bf16(src[i]); break;
        case TensorType::q8_0: quantize_row_q8_0_ref(static_cast<BlockQ8_0*>(dst), src, n); break;
        case TensorType::q4_0: quantize_row_q4_0_ref(static_cast<BlockQ4_0*>(dst), src, n); break;
        case TensorType::q4_k: quantize_row_q4k_ref(static_cast<BlockQ4K*>(dst), src, n); break;
        case TensorType::q5_k: quantize_row_q5k_ref(static_cast<BlockQ5K*>(dst), src, n); break;
        case TensorType::q6_k: quantize_row_q6k_ref(static_cast<BlockQ6K*>(dst), src, n); break;
    }
    return Status::ok;
}

MOE_API Status dequantize_row(TensorType type, const void* src, float* dst, int64_t n) {
    using namespace detail;
    const TypeTraits* tt = type_traits((uint32_t)type);
    if (!tt || !src || !dst || n < 0 || n % tt->block_elems) return fail(Status::invalid_argument, "dequantize_row: bad type or length");
    switch (type) {
        case TensorType::f32: std::memcpy(dst, src, (size_t)n * 4); break;
        case TensorType::f16: for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(static_cast<const uint16_t*>(src)[i]); break;
        case TensorType::bf16: for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(static_cast<const uint16_t*>(src)[i]); break;
        case TensorType::q8_0: dequantize_row_q8_0(static_cast<const BlockQ8_0*>(src), dst, n); break;
        case TensorType::q4_0: dequantize_row_q4_0(static_cast<const BlockQ4_0*>(src), dst, n); break;
        case TensorType::q4_k: dequantize_row_q4k(static_cast<const BlockQ4K*>(src), dst, n); break;
        case TensorType::q5_k: dequantize_row_q5k(static_cast<const BlockQ5K*>(src), dst, n); break;
        case TensorType::q6_k: dequantize_row_q6k(static_cast<const BlockQ6K*>(src), dst, n); break;
    }
    return Status::ok;
}

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
inline float vec_dot_q8_0_q8_0_ref(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += w[b].qs[j] * x[b].qs[j];
        sum += fp16_to_f32(w[b].d) * fp16_to_f32(x[b].d) * (float)isum;
    }
    return sum;
}
inline float vec_dot_q4_0_q8_0_ref(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQK; ++b) {
        int isum = 0;
        for (int j = 0; j < kQK / 2; ++j)
            isum += ((w[b].qs[j] & 15) - 8) * x[b].qs[j] + ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + 16];
        sum += fp16_to_f32(w[b].d) * fp16_to_f32(x[b].d) * (float)isum;
    }
    return sum;
}
inline float vec_dot_q4k_q8k_ref(const BlockQ4K* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int scaled = 0, mins = 0;
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, w[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, w[b].scales, &s1, &m1);
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                lo += (w[b].qs[32 * c + l] & 15) * x[b].qs[64 * c + l];
                hi += (w[b].qs[32 * c + l] >> 4) * x[b].qs[64 * c + 32 + l];
            }
            scaled += s0 * lo + s1 * hi;
            mins += m0 * (x[b].bsums[4 * c] + x[b].bsums[4 * c + 1]) + m1 * (x[b].bsums[4 * c + 2] + x[b].bsums[4 * c + 3]);
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)scaled - fp16_to_f32(w[b].dmin) * x[b].d * (float)mins;
    }
    return sum;
}
inline float vec_dot_q5k_q8k_ref(const BlockQ5K* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    for (int64_t b = 0; b < n / kQKK; ++b) {
        int scaled = 0, mins = 0;
        for (int c = 0; c < 4; ++c) {
            uint8_t s0, m0, s1, m1;
            q4k_get_scale_min(2 * c, w[b].scales, &s0, &m0);
            q4k_get_scale_min(2 * c + 1, w[b].scales, &s1, &m1);
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                uint8_t q = w[b].qs[32 * c + l], h = w[b].qh[l];
                lo += ((q & 15) | (((h >> (2 * c)) & 1) << 4)) * x[b].qs[64 * c + l];
                hi += ((q >> 4) | (((h >> (2 * c + 1)) & 1) << 4)) * x[b].qs[64 * c + 32 + l];
            }
            scaled += s0 * lo + s1 * hi;
            mins += m0 * (x[b].bsums[4 * c] + x[b].bsums[4 * c + 1]) + m1 * (x[b].bsums[4 * c + 2] + x[b].bsums[4 * c + 3]);
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)scaled - fp16_to_f32(w[b].dmin) * x[b].d * (float)mins;
    }
    return sum;
}
inline float vec_dot_q6k_q8k_ref(const BlockQ6K* w, const BlockQ8K* x, int64_t n) {
    float sum = 0;
    int8_t q[kQKK];
    for (int64_t b = 0; b < n / kQKK; ++b) {
        q6k_unpack(w[b], q);
        int isum = 0;
        for (int s = 0; s < 16; ++s) {
            int sub = 0;
            for (int i = 0; i < 16; ++i) sub += q[16 * s + i] * x[b].qs[16 * s + i];
            isum += w[b].scales[s] * sub;
        }
        sum += fp16_to_f32(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
}

//-----------------------------------------------------------------------------
// [SECTION] KERNEL DISPATCH
//-----------------------------------------------------------------------------
// >>dispatch  Per weight type: the activation format it dots against, that format's row size,
// the activation quantizer, and the row dot product. SIMD variants (a later section) replace
// entries of this table once at start-up after CPU detection.

enum class ActFormat { f32, q8_0, q8_k };

typedef float (*VecDotFn)(const void* w, const void* x, int64_t n);
typedef void (*QuantizeActFn)(void* dst, const float* x, int64_t n);

struct KernelTraits {
    ActFormat act;
    VecDotFn vec_dot;
};

inline size_t act_row_bytes(ActFormat f, int64_t n) {
    switch (f) {
        case ActFormat::f32: return (size_t)n * 4;
        case ActFormat::q8_0: return (size_t)(n / kQK) * sizeof(BlockQ8_0);
        case ActFormat::q8_k: return (size_t)(n / kQKK) * sizeof(BlockQ8K);
    }
    return 0;
}

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

inline void quantize_act_ref(ActFormat f, void* dst, const float* x, int64_t n) {
    switch (f) {
        case ActFormat::f32: std::memcpy(dst, x, (size_t)n * 4); break;
        case ActFormat::q8_0: quantize_act_q8_0_ref(static_cast<BlockQ8_0*>(dst), x, n); break;
        case ActFormat::q8_k: quantize_row_q8k_ref(static_cast<BlockQ8K*>(dst), x, n); break;
    }
}

inline KernelTraits kernel_traits_ref(uint32_t type) {
    switch ((TensorType)type) {
        case TensorType::f32: return {ActFormat::f32, [](const void* w, const void* x, int64_t n) { return vec_dot_f32_f32_ref((const float*)w, (const float*)x, n); }};
        case TensorType::f16: return {ActFormat::f32, [](const void* w, const void* x, int64_t n) { return vec_dot_f16_f32_ref((const uint16_t*)w, (const float*)x, n); }};
        case TensorType::bf16: return {ActFormat::f32, [](const void* w, const void* x, int64_t n) { return vec_dot_bf16_f32_ref((const uint16_t*)w, (const float*)x, n); }};
        case TensorType::q8_0: return {ActFormat::q8_0, [](const void* w, const void* x, int64_t n) { return vec_dot_q8_0_q8_0_ref((const BlockQ8_0*)w, (const BlockQ8_0*)x, n); }};
        case TensorType::q4_0: return {ActFormat::q8_0, [](const void* w, const void* x, int64_t n) { return vec_dot_q4_0_q8_0_ref((const BlockQ4_0*)w, (const BlockQ8_0*)x, n); }};
        case TensorType::q4_k: return {ActFormat::q8_k, [](const void* w, const void* x, int64_t n) { return vec_dot_q4k_q8k_ref((const BlockQ4K*)w, (const BlockQ8K*)x, n); }};
        case TensorType::q5_k: return {ActFormat::q8_k, [](const void* w, const void* x, int64_t n) { return vec_dot_q5k_q8k_ref((const BlockQ5K*)w, (const BlockQ8K*)x, n); }};
        case TensorType::q6_k: return {ActFormat::q8_k, [](const void* w, const void* x, int64_t n) { return vec_dot_q6k_q8k_ref((const BlockQ6K*)w, (const BlockQ8K*)x, n); }};
    }
    return {ActFormat::f32, nullptr};
}

// Quantized weights against float activations: dequantize one block at a time into registers-
// sized scratch and dot it. The specification of SessionOptions::float_activations.
template <TensorType kType, int kBlockElems>
float vec_dot_dequant_f32_ref(const void* w, const void* x, int64_t n) {
    const int block_bytes = tensor_type_block_bytes(kType);
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const float* xf = static_cast<const float*>(x);
    float block[kBlockElems];
    float sum = 0;
    for (int64_t b = 0; b < n / kBlockElems; ++b) {
        dequantize_row(kType, wb + b * block_bytes, block, kBlockElems);
        float partial = 0;
        for (int i = 0; i < kBlockElems; ++i) partial += block[i] * xf[b * kBlockElems + i];
        sum += partial;
    }
    return sum;
}

inline KernelTraits kernel_traits_f32(uint32_t type) {
    switch ((TensorType)type) {
        case TensorType::f32: case TensorType::f16: case TensorType::bf16: return kernel_traits_ref(type);
        case TensorType::q8_0: return {ActFormat::f32, vec_dot_dequant_f32_ref<TensorType::q8_0, kQK>};
        case TensorType::q4_0: return {ActFormat::f32, vec_dot_dequant_f32_ref<TensorType::q4_0, kQK>};
        case TensorType::q4_k: return {ActFormat::f32, vec_dot_dequant_f32_ref<TensorType::q4_k, kQKK>};
        case TensorType::q5_k: return {ActFormat::f32, vec_dot_dequant_f32_ref<TensorType::q5_k, kQKK>};
        case TensorType::q6_k: return {ActFormat::f32, vec_dot_dequant_f32_ref<TensorType::q6_k, kQKK>};
    }
    return {ActFormat::f32, nullptr};
}

}  // namespace detail
}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] KERNELS: X86 (AVX2, AVX-512, VNNI)
//-----------------------------------------------------------------------------
// >>kernels-x86
#include "src/kernels_x86.inc"

namespace moe {
namespace detail {

//-----------------------------------------------------------------------------
// [SECTION] KERNEL DISPATCH
//-----------------------------------------------------------------------------
// >>dispatch  The best ISA is detected once (cpuid + xgetbv); force_isa() can lower it for tests
// and benchmarks. A Model resolves its kernels when it is loaded, so one binary runs on any CPU.

inline Isa detect_isa() {
#if MOE_DETAIL_X86
    int level = x86_detect_level();
    if (level >= 3) return Isa::avx512_vnni;
    if (level == 2) return Isa::avx512;
    if (level == 1) return Isa::avx2;
#endif
    return Isa::scalar;
}

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

inline KernelTraits kernel_traits_for(uint32_t type, Isa isa) {
    KernelTraits k = kernel_traits_ref(type);
#if MOE_DETAIL_X86
    if (isa >= Isa::avx2 && isa <= Isa::avx512_vnni) {
        VecDotFn f = x86_vec_dot(type, (int)isa);
        if (f) k.vec_dot = f;
    }
#else
    (void)isa;
#endif
    return k;
}

inline KernelTraits kernel_traits(uint32_t type) { return kernel_traits_for(type, active_isa()); }

// Quantizes one activation row; SIMD versions are bit-exact with the _ref ones.
inline void quantize_act(ActFormat f, void* dst, const float* x, int64_t n) {
#if MOE_DETAIL_X86
    const Isa isa = active_isa();
    QuantizeActFn q = isa >= Isa::avx2 && isa <= Isa::avx512_vnni ? x86_quantize_act(f, (int)isa) : nullptr;
    if (q) { q(dst, x, n); return; }
#endif
    quantize_act_ref(f, dst, x, n);
}

inline void quantize_act_with(ActFormat f, Isa isa, void* dst, const float* x, int64_t n) {
#if MOE_DETAIL_X86
    QuantizeActFn q = isa >= Isa::avx2 && isa <= Isa::avx512_vnni ? x86_quantize_act(f, (int)isa) : nullptr;
    if (q) { q(dst, x, n); return; }
#else
    (void)isa;
#endif
    quantize_act_ref(f, dst, x, n);
}

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
MOE_API Status force_isa(Isa isa) {
    if ((int)isa > (int)detail::detect_isa() || ((isa == Isa::neon || isa == Isa::neon_dotprod) != (detail::detect_isa() >= Isa::neon)))
        if (isa != Isa::scalar) return detail::fail(Status::unsupported, "ISA %s is not available on this CPU/build", isa_name(isa));
    detail::forced_isa().store((int)isa);
    return Status::ok;
}

MOE_API Status quantize_activations(TensorType weight_type, Isa isa, const float* x, int64_t n, void* dst, size_t dst_size) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)weight_type);
    if (!tt || !x || !dst || n <= 0) return detail::fail(Status::invalid_argument, "quantize_activations: bad arguments");
    detail::ActFormat f = detail::kernel_traits_ref((uint32_t)weight_type).act;
    int64_t block = f == detail::ActFormat::q8_k ? detail::kQKK : f == detail::ActFormat::q8_0 ? detail::kQK : 1;
    if (n % block) return detail::fail(Status::invalid_argument, "quantize_activations: n is not a multiple of %lld", (long long)block);
    if (dst_size < detail::act_row_bytes(f, n)) return detail::fail(Status::invalid_argument, "quantize_activations: dst too small");
    detail::quantize_act_with(f, isa, dst, x, n);
    return Status::ok;
}

MOE_API Status vec_dot(TensorType type, Isa isa, const void* weights, const float* x, int64_t n, float* out) {
    const detail::TypeTraits* tt = detail::type_traits((uint32_t)type);
    if (!tt || !weights || !x || !out || n <= 0) return detail::fail(Status::invalid_argument, "vec_dot: bad arguments");
    detail::KernelTraits k = detail::kernel_traits_for((uint32_t)type, isa);
    int64_t act_block = k.act == detail::ActFormat::q8_k ? detail::kQKK : k.act == detail::ActFormat::q8_0 ? detail::kQK : 1;
    if (n % tt->block_elems || n % act_block) return detail::fail(Status::invalid_argument, "vec_dot: n is not a multiple of the block size");
    std::vector<uint8_t> act(detail::act_row_bytes(k.act, n) + 64);
    detail::quantize_act_ref(k.act, act.data(), x, n);
    *out = k.vec_dot(weights, act.data(), n);
    return Status::ok;
}

namespace detail {

//-----------------------------------------------------------------------------
// [SECTION] THREAD POOL
//-----------------------------------------------------------------------------
// >>threads  A persistent pool: workers spin briefly on a generation counter, then sleep on a
// condition variable. run(fn) calls fn(thread_index, n_threads) on every thread including the
// caller and returns when all are done; kernels split their rows by (ith, nth). One pool per
// Session, so sessions on different threads never contend.

class ThreadPool {
public:
    typedef void (*TaskFn)(void* ctx, int ith, int nth);

    explicit ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
        for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
#endif
    }
    ~ThreadPool() {
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        for (std::thread& t : workers_) t.join();
#endif
    }
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    void run(TaskFn fn, void* ctx) {
        if (n_threads_ == 1) { fn(ctx, 0, 1); return; }
#if MOE_DETAIL_HAS_OPENMP
#pragma omp parallel num_threads(n_threads_)
        fn(ctx, omp_get_thread_num(), omp_get_num_threads());
#elif MOE_DETAIL_HAS_THREADS
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = fn; ctx_ = ctx;
            pending_.store(n_threads_ - 1);
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        fn(ctx, 0, n_threads_);
        while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
#else
        for (int i = 0; i < n_threads_; ++i) fn(ctx, i, n_threads_);
#endif
    }

    template <typename F> void parallel_for(F&& f) {
        run([](void* c, int ith, int nth) { (*static_cast<F*>(c))(ith, nth); }, &f);
    }

private:
    int n_threads_;
#if MOE_DETAIL_HAS_THREADS && !MOE_DETAIL_HAS_OPENMP
    void worker(int index) {
        uint64_t seen = 0;
        for (;;) {
            uint64_t gen = generation_.load(std::memory_order_acquire);
            for (int spin = 0; gen == seen && spin < 20000; ++spin) gen = generation_.load(std::memory_order_acquire);
            if (gen == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
                gen = generation_.load();
            }
            seen = gen;
            TaskFn fn;
            void* ctx;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                if (stop_) return;
                fn = task_; ctx = ctx_;
            }
            fn(ctx, index, n_threads_);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    TaskFn task_ = nullptr;
    void* ctx_ = nullptr;
    bool stop_ = false;
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
#include "src/tokenizer.inc"

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
    int64_t cols = 0, rows = 0, n_mats = 1;  // ne0 (input), ne1 (output), ne2 (experts)
    size_t row_bytes = 0, mat_bytes = 0;
    KernelTraits kernel{ActFormat::f32, nullptr};      // quantized activations (as llama.cpp)
    KernelTraits kernel_f32{ActFormat::f32, nullptr};  // float activations
    explicit operator bool() const { return data != nullptr; }
    const uint8_t* row(int64_t mat, int64_t r) const { return data + (size_t)mat * mat_bytes + (size_t)r * row_bytes; }
};

struct LayerWeights {
    std::vector<float> attn_norm, ffn_norm, q_norm, k_norm, bq, bk, bv, bo;  // empty when absent
    Weight wq, wk, wv, wo;          // (n_head*hd, n_embd), (n_kv*hd, n_embd) x2, (n_embd, n_head*hd)
    Weight router;                  // (n_expert, n_embd)
    Weight gate_exps, up_exps;      // (n_expert, n_ff, n_embd)
    Weight down_exps;               // (n_expert, n_embd, n_ff)
    Weight gate, up, down;          // dense FFN (n_ff, n_embd), (n_embd, n_ff)
    Weight gate_shexp, up_shexp, down_shexp;  // qwen2moe shared expert
    std::vector<float> router_shexp;          // (n_embd) sigmoid gate of the shared expert
};

enum class QkNorm { none, per_head, whole };

struct ModelImpl {
    GgufFile file;
    Tokenizer tokenizer;
    ModelInfo info;
    QkNorm qk_norm = QkNorm::none;
    Weight token_embd, output;
    std::vector<float> output_norm;
    std::vector<LayerWeights> layers;
    LogFn log = nullptr;
    void* log_user = nullptr;
    size_t max_act_bytes_per_row = 0;  // largest quantized activation row any matmul needs
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
        const TypeTraits* tt = type_traits(t->type);
        out->data = t->data;
        out->type = t->type;
        out->cols = t->ne[0];
        out->rows = t->ne[1];
        out->n_mats = t->ne[2];
        out->row_bytes = (size_t)(t->ne[0] / tt->block_elems * tt->block_bytes);
        out->mat_bytes = out->row_bytes * (size_t)t->ne[1];
        out->kernel = kernel_traits(t->type);
        out->kernel_f32 = kernel_traits_f32(t->type);
        // Activation row sizes must tile exactly: K-quant activations need 256-element rows.
        m.max_act_bytes_per_row = std::max(m.max_act_bytes_per_row, act_row_bytes(out->kernel.act, out->cols));
        return Status::ok;
    }

    Status vector(const std::string& name, int64_t n, bool required, std::vector<float>* out) {
        const GgufTensorInfo* t = m.file.find_tensor(name.c_str());
        if (!t) return required ? fail(Status::missing_tensor, "missing tensor '%s'", name.c_str()) : Status::ok;
        if (t->n_elements() != n || t->ne[0] != n)
            return fail(Status::shape_mismatch, "tensor '%s' has %lld elements, expected %lld", name.c_str(), (long long)t->n_elements(), (long long)n);
        out->resize((size_t)n);
        return dequantize_row((TensorType)t->type, t->data, out->data(), n);
    }
};

inline Status load_model(ModelImpl& m) {
    ModelInfo& hp = m.info;
    Status s = m.file.get_string("general.architecture", &hp.architecture);
    if (s != Status::ok) return s;
    const std::string& arch = hp.architecture;
    bool is_qwen3moe = arch == "qwen3moe", is_olmoe = arch == "olmoe", is_qwen2moe = arch == "qwen2moe", is_llama = arch == "llama";
    if (!is_qwen3moe && !is_olmoe && !is_qwen2moe && !is_llama)
        return fail(Status::unsupported, "unsupported architecture '%s' (supported: qwen3moe, olmoe, qwen2moe, llama)", arch.c_str());
    m.file.get_string("general.name", &hp.name);
    last_error_storage().clear();

    Loader L{m, arch};
    uint32_t n_embd, n_layer, n_head, n_head_kv, n_ctx, n_expert, n_used, n_ff, n_ff_exp, n_ff_sh, key_len, val_len, n_rot;
    if ((s = L.u32("embedding_length", &n_embd, true, 0)) != Status::ok) return s;
    if ((s = L.u32("block_count", &n_layer, true, 0)) != Status::ok) return s;
    if ((s = L.u32("attention.head_count", &n_head, true, 0)) != Status::ok) return s;
    {
        // head_count_kv may be a per-layer array; we support arrays whose entries are all equal.
        std::string k = L.key("attention.head_count_kv");
        const GgufKeyValue* e = m.file.find(k.c_str());
        if (e && e->type == GgufValueType::array) {
            std::vector<int32_t> per_layer;
            if ((s = m.file.get_i32_array(k.c_str(), &per_layer)) != Status::ok) return s;
            if (per_layer.empty() || std::any_of(per_layer.begin(), per_layer.end(), [&](int32_t v) { return v != per_layer[0]; }))
                return fail(Status::unsupported, "'%s': per-layer KV head counts are not supported", k.c_str());
            n_head_kv = (uint32_t)per_layer[0];
        } else if ((s = L.u32("attention.head_count_kv", &n_head_kv, false, n_head)) != Status::ok) {
            return s;
        }
    }
    if ((s = L.u32("context_length", &n_ctx, false, 4096)) != Status::ok) return s;
    if ((s = L.u32("expert_count", &n_expert, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_used_count", &n_used, false, 0)) != Status::ok) return s;
    if ((s = L.u32("feed_forward_length", &n_ff, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_feed_forward_length", &n_ff_exp, false, 0)) != Status::ok) return s;
    if ((s = L.u32("expert_shared_feed_forward_length", &n_ff_sh, false, 0)) != Status::ok) return s;
    if ((s = L.f32("attention.layer_norm_rms_epsilon", &hp.rms_eps, true, 0)) != Status::ok) return s;
    if ((s = L.f32("rope.freq_base", &hp.rope_freq_base, false, 10000.f)) != Status::ok) return s;

    // Cap every dimension before any product is formed; real models are far below these.
    if (n_embd == 0 || n_embd > 65536 || n_layer == 0 || n_layer > 1024 || n_head == 0 || n_head > 1024 || n_head_kv == 0 ||
        n_head_kv > n_head || n_head % n_head_kv != 0 || n_expert > 4096 || n_used > n_expert || (n_expert > 0 && n_used == 0) ||
        n_ff > 1 << 20 || n_ff_exp > 1 << 20 || n_ff_sh > 1 << 20 || n_ctx == 0)
        return fail(Status::invalid_file, "inconsistent hyper-parameters (n_embd %u, layers %u, heads %u/%u, experts %u/%u)", n_embd, n_layer,
                    n_head, n_head_kv, n_used, n_expert);
    if ((s = L.u32("attention.key_length", &key_len, false, n_embd / n_head)) != Status::ok) return s;
    if ((s = L.u32("attention.value_length", &val_len, false, key_len)) != Status::ok) return s;
    if (key_len != val_len) return fail(Status::unsupported, "key_length %u != value_length %u is not supported", key_len, val_len);
    if (key_len == 0 || key_len > 1024) return fail(Status::invalid_file, "invalid head size %u", key_len);
    if ((s = L.u32("rope.dimension_count", &n_rot, false, key_len)) != Status::ok) return s;
    if (n_rot > key_len || n_rot % 2) return fail(Status::invalid_file, "rope.dimension_count %u is invalid for head size %u", n_rot, key_len);
    hp.rms_eps = std::max(hp.rms_eps, 0.f);
    if (!(hp.rope_freq_base > 0)) return fail(Status::invalid_file, "rope.freq_base must be positive");

    std::string scaling;
    {
        std::string k = L.key("rope.scaling.type");
        if (m.file.get_string(k.c_str(), &scaling) == Status::ok && scaling != "none") {
            float factor = 1;
            if ((s = L.f32("rope.scaling.factor", &factor, false, 1.f)) != Status::ok) return s;
            if (scaling == "linear" && factor > 0) {
                hp.rope_freq_scale = 1.f / factor;
            } else if (scaling != "yarn") {
                return fail(Status::unsupported, "rope scaling '%s' is not supported", scaling.c_str());
            }
            // yarn: within the original context it equals plain RoPE; longer contexts are not extended yet.
        }
        float scale_linear = 0;
        if (L.f32("rope.scale_linear", &scale_linear, false, 0.f) == Status::ok && scale_linear > 0) hp.rope_freq_scale = 1.f / scale_linear;
        last_error_storage().clear();
    }

    hp.n_embd = (int32_t)n_embd; hp.n_layer = (int32_t)n_layer; hp.n_head = (int32_t)n_head; hp.n_head_kv = (int32_t)n_head_kv;
    hp.head_dim = (int32_t)key_len; hp.n_rot = (int32_t)n_rot; hp.n_ctx_train = (int32_t)n_ctx;
    hp.n_expert = (int32_t)n_expert; hp.n_expert_used = (int32_t)n_used;
    // qwen3moe/qwen2moe keep the per-expert size in expert_feed_forward_length; olmoe/Mixtral in feed_forward_length.
    hp.n_ff = (int32_t)(n_expert > 0 && n_ff_exp > 0 ? n_ff_exp : n_ff);
    hp.n_ff_shared = (int32_t)n_ff_sh;
    hp.rope_neox = !is_llama;  // llama.cpp: qwen*/olmoe use NEOX RoPE, llama uses normal RoPE
    hp.expert_weights_norm = is_qwen3moe || is_llama;  // olmoe and qwen2moe keep the raw softmax weights
    {
        bool norm = hp.expert_weights_norm;
        if (L.m.file.get_bool(L.key("expert_weights_norm").c_str(), &norm) == Status::ok) hp.expert_weights_norm = norm;
        last_error_storage().clear();
    }
    if (hp.n_ff <= 0) return fail(Status::invalid_file, "missing or zero feed-forward size for '%s'", arch.c_str());

    const int64_t E = n_embd, H = (int64_t)n_head * key_len, KV = (int64_t)n_head_kv * key_len, F = hp.n_ff;
    if ((s = L.weight("token_embd.weight", E, 0, 0, true, &m.token_embd)) != Status::ok) return s;
    hp.n_vocab = (int32_t)m.token_embd.rows;
    if ((s = L.weight("output.weight", E, hp.n_vocab, 0, false, &m.output)) != Status::ok) return s;
    if (!m.output) m.output = m.token_embd;  // tied embeddings
    if ((s = L.vector("output_norm.weight", E, true, &m.output_norm)) != Status::ok) return s;

    m.layers.resize(n_layer);
    char name[128];
    for (uint32_t il = 0; il < n_layer; ++il) {
        LayerWeights& l = m.layers[il];
        auto N = [&](const char* suffix) { std::snprintf(name, sizeof name, "blk.%u.%s", il, suffix); return std::string(name); };
        if ((s = L.vector(N("attn_norm.weight"), E, true, &l.attn_norm)) != Status::ok) return s;
        if ((s = L.weight(N("attn_q.weight"), E, H, 0, true, &l.wq)) != Status::ok) return s;
        if ((s = L.weight(N("attn_k.weight"), E, KV, 0, true, &l.wk)) != Status::ok) return s;
        if ((s = L.weight(N("attn_v.weight"), E, KV, 0, true, &l.wv)) != Status::ok) return s;
        if ((s = L.weight(N("attn_output.weight"), H, E, 0, true, &l.wo)) != Status::ok) return s;
        if ((s = L.vector(N("attn_q.bias"), H, false, &l.bq)) != Status::ok) return s;
        if ((s = L.vector(N("attn_k.bias"), KV, false, &l.bk)) != Status::ok) return s;
        if ((s = L.vector(N("attn_v.bias"), KV, false, &l.bv)) != Status::ok) return s;
        if ((s = L.vector(N("attn_output.bias"), E, false, &l.bo)) != Status::ok) return s;
        if (is_qwen3moe || is_olmoe) {
            // qwen3moe normalises each head (weight {hd}); olmoe the whole projection (weight {n_head*hd}).
            const GgufTensorInfo* qn = m.file.find_tensor(N("attn_q_norm.weight").c_str());
            m.qk_norm = qn && qn->ne[0] == H && H != key_len ? QkNorm::whole : QkNorm::per_head;
            int64_t qn_len = m.qk_norm == QkNorm::whole ? H : key_len, kn_len = m.qk_norm == QkNorm::whole ? KV : key_len;
            if ((s = L.vector(N("attn_q_norm.weight"), qn_len, true, &l.q_norm)) != Status::ok) return s;
            if ((s = L.vector(N("attn_k_norm.weight"), kn_len, true, &l.k_norm)) != Status::ok) return s;
        }
        if ((s = L.vector(N("ffn_norm.weight"), E, true, &l.ffn_norm)) != Status::ok) return s;
        if (n_expert > 0) {
            if ((s = L.weight(N("ffn_gate_inp.weight"), E, n_expert, 0, true, &l.router)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_gate_exps.weight"), E, F, n_expert, true, &l.gate_exps)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_up_exps.weight"), E, F, n_expert, true, &l.up_exps)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_down_exps.weight"), F, E, n_expert, true, &l.down_exps)) != Status::ok) return s;
            if (is_qwen2moe && m.file.find_tensor(N("ffn_up_shexp.weight").c_str())) {
                int64_t FS = n_ff_sh ? (int64_t)n_ff_sh : 0;
                if ((s = L.weight(N("ffn_gate_shexp.weight"), E, FS, 0, true, &l.gate_shexp)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_up_shexp.weight"), E, l.gate_shexp.rows, 0, true, &l.up_shexp)) != Status::ok) return s;
                if ((s = L.weight(N("ffn_down_shexp.weight"), l.gate_shexp.rows, E, 0, true, &l.down_shexp)) != Status::ok) return s;
                if ((s = L.vector(N("ffn_gate_inp_shexp.weight"), E, true, &l.router_shexp)) != Status::ok) return s;
                hp.n_ff_shared = (int32_t)l.gate_shexp.rows;
            }
        } else {
            if ((s = L.weight(N("ffn_gate.weight"), E, F, 0, true, &l.gate)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_up.weight"), E, F, 0, true, &l.up)) != Status::ok) return s;
            if ((s = L.weight(N("ffn_down.weight"), F, E, 0, true, &l.down)) != Status::ok) return s;
        }
    }
    // K-quant activations are built in 256-element blocks, legacy ones in 32: every matmul input
    // length must tile (the file's block sizes guarantee it for ne0, checked above).

    // Bytes touched per decoded token: everything but the experts, plus k/n of the expert stacks,
    // plus one embedding row.
    uint64_t total = 0, experts = 0;
    for (size_t i = 0; i < m.file.n_tensors(); ++i) {
        const GgufTensorInfo& t = m.file.tensor_at(i);
        total += t.n_bytes;
        if (t.name.find("_exps.") != std::string::npos) experts += t.n_bytes;
    }
    hp.weight_bytes = total;
    hp.active_bytes_per_token = total - experts - m.token_embd.mat_bytes + m.token_embd.row_bytes +
                                (n_expert ? experts / n_expert * n_used : 0) + (m.output.data == m.token_embd.data ? m.token_embd.mat_bytes : 0);

    const GgufKeyValue* tok = m.file.find("tokenizer.ggml.model");
    if (tok) {
        if ((s = Tokenizer::load(m.file, &m.tokenizer)) != Status::ok) return s;
        if (m.tokenizer.n_vocab() > hp.n_vocab)
            return fail(Status::invalid_file, "tokenizer has %d tokens but token_embd has %d rows", m.tokenizer.n_vocab(), hp.n_vocab);
    }
    return Status::ok;
}

}  // namespace detail

Model::Model() = default;
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

static Status model_finish_load(std::unique_ptr<detail::ModelImpl>& impl, const LoadOptions& options, Model* out,
                                std::shared_ptr<const detail::ModelImpl>* slot) {
    impl->log = options.log;
    impl->log_user = options.log_user;
    Status s = detail::load_model(*impl);
    if (s != Status::ok) {
        if (options.log) options.log(options.log_user, last_error());
        return s;
    }
    (void)out;
    *slot = std::shared_ptr<const detail::ModelImpl>(impl.release());
    return Status::ok;
}

Status Model::load(const char* path, const LoadOptions& options, Model* out) {
    if (!out || !path) return detail::fail(Status::invalid_argument, "null argument");
    std::unique_ptr<detail::ModelImpl> impl(new (std::nothrow) detail::ModelImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = GgufFile::open(path, options.use_mmap, &impl->file);
    if (s != Status::ok) {
        if (options.log) options.log(options.log_user, last_error());
        return s;
    }
    return model_finish_load(impl, options, out, &out->impl_);
}

Status Model::load_memory(const void* data, size_t size, const LoadOptions& options, Model* out) {
    if (!out) return detail::fail(Status::invalid_argument, "null argument");
    std::unique_ptr<detail::ModelImpl> impl(new (std::nothrow) detail::ModelImpl());
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = GgufFile::open_memory(data, size, &impl->file);
    if (s != Status::ok) return s;
    return model_finish_load(impl, options, out, &out->impl_);
}

bool Model::valid() const { return impl_ != nullptr; }
const ModelInfo& Model::info() const { return impl_->info; }
const Tokenizer& Model::tokenizer() const { return impl_->tokenizer; }
const GgufFile& Model::file() const { return impl_->file; }

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] FORWARD PASS
//-----------------------------------------------------------------------------
// >>forward  One forward() handles a chunk of B tokens (B = 1 for decode). Per layer:
//   attn_norm -> q,k,v (one parallel matmul over their concatenated rows) -> QK-norm, RoPE, KV store
//   -> causal GQA attention (parallel over token x head) -> attn_output (+ residual)
//   -> ffn_norm -> router softmax + top-k -> experts: gate/up + SwiGLU (parallel over the rows of
//   all active experts), quantize hidden, down + routing-weighted sum (parallel over output rows,
//   so no two threads write one value) (+ residual).
// Weights are read once per chunk whatever B is: matmuls loop rows outside, tokens inside.
// Each input is quantized once to each activation format its consumers need.

namespace moe {
namespace detail {

// Quantized copies of one input matrix (B rows of n floats), one per activation format, made lazily.
struct ActCache {
    const float* src = nullptr;
    int64_t n = 0, rows = 0;
    bool ready[3] = {false, false, false};
    AlignedBuffer<uint8_t> buf[3];  // sized at session creation
    size_t stride[3] = {0, 0, 0};

    void reset(const float* x, int64_t n_, int64_t rows_) {
        src = x; n = n_; rows = rows_;
        ready[0] = ready[1] = ready[2] = false;
    }
    // Row r of the input in format f; quantizes all rows on first use.
    const void* get(ActFormat f, int64_t r) {
        int i = (int)f;
        if (f == ActFormat::f32) return src + r * n;
        if (!ready[i]) {
            stride[i] = act_row_bytes(f, n);
            for (int64_t t = 0; t < rows; ++t) quantize_act(f, buf[i].data + t * stride[i], src + t * n, n);
            ready[i] = true;
        }
        return buf[i].data + r * stride[i];
    }
};

// One (token, slot) use of an expert: the hidden row it fills and its routing weight.
struct ExpertUse { int32_t token, slot; };

}  // namespace detail
}  // namespace moe

namespace moe {
namespace detail {

struct SessionImpl {
    std::shared_ptr<const ModelImpl> model;
    ThreadPool pool;
    int32_t n_ctx = 0, n_batch = 0, pos = 0, slots = 0;  // slots: FFN uses per token (top-k [+ shared] or 1)
    int64_t n_embd = 0, q_dim = 0, kv_dim = 0, max_ff = 0;

    AlignedBuffer<float> k_cache, v_cache;       // (n_layer, n_ctx, kv_dim)
    AlignedBuffer<float> x, xb, q, k, v, att_out, ffn_out;  // (n_batch, dim) each
    AlignedBuffer<float> scores;                 // (n_threads, n_ctx)
    AlignedBuffer<float> router_logits;          // (n_batch, n_expert)
    AlignedBuffer<float> hidden;                 // (n_batch * slots, max_ff)
    AlignedBuffer<float> logits_batch;           // (n_batch, n_vocab)
    AlignedBuffer<float> logits;                 // (n_vocab)
    AlignedBuffer<uint8_t> hidden_q;             // (n_batch * slots, act row bytes of max_ff)
    size_t hidden_q_stride = 0;
    ActCache act_in, act_att;
    std::vector<int32_t> slot_expert;            // (n_batch * slots): expert id, -1 dense, -2 shared
    std::vector<float> slot_weight;              // (n_batch * slots)
    std::vector<int32_t> expert_first;           // (n_expert + 2 + 1): CSR offsets of uses per expert
    std::vector<ExpertUse> uses;                 // (n_batch * slots), grouped by expert
    std::vector<int32_t> active;                 // experts with uses, in order
    std::vector<int64_t> active_row_start;       // prefix sums of their hidden rows
    std::vector<int32_t> last_experts;           // (n_layer * n_expert_used) for the last token
    std::vector<std::pair<float, int32_t>> topk_scratch;

    bool float_activations = false;              // SessionOptions::float_activations

    explicit SessionImpl(int n_threads) : pool(n_threads) {}
    const KernelTraits& kt(const Weight& w) const { return float_activations ? w.kernel_f32 : w.kernel; }

    Status init(const std::shared_ptr<const ModelImpl>& m, const SessionOptions& o);
    Status forward(const int32_t* tokens, int32_t n, float* all_logits);

    // Expert id encoding for slot_expert: >= 0 routed expert, kDense, kShared.
    static constexpr int32_t kDense = -1, kShared = -2;
    int32_t expert_index(int32_t e) const { return e >= 0 ? e + 2 : e + 2; }  // -2 -> 0, -1 -> 1, e -> e + 2
    void ffn_weights(const LayerWeights& l, int32_t e, const Weight** g, const Weight** u, const Weight** d, int64_t* mat) const {
        if (e == kShared) { *g = &l.gate_shexp; *u = &l.up_shexp; *d = &l.down_shexp; *mat = 0; }
        else if (e == kDense) { *g = &l.gate; *u = &l.up; *d = &l.down; *mat = 0; }
        else { *g = &l.gate_exps; *u = &l.up_exps; *d = &l.down_exps; *mat = e; }
    }
    void attention_layer(int il, int32_t n);
    void ffn_layer(int il, int32_t n);
    void matmul(const Weight& w, int64_t mat, ActCache& in, int32_t n, float* out, int64_t out_stride);
};

inline void rms_norm(float* out, const float* x, const float* w, int64_t n, float eps) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += (double)x[i] * x[i];
    float scale = (float)(1.0 / std::sqrt(sum / (double)n + eps));
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Rotates pairs of one head: NEOX pairs (i, i + n_rot/2), normal pairs (2i, 2i+1).
inline void rope(float* head, int n_rot, int32_t pos, float freq_base, float freq_scale, bool neox) {
    for (int i = 0; i < n_rot / 2; ++i) {
        float theta = (float)pos * freq_scale * std::pow(freq_base, -2.f * (float)i / (float)n_rot);
        float c = std::cos(theta), s = std::sin(theta);
        int a = neox ? i : 2 * i, b = neox ? i + n_rot / 2 : 2 * i + 1;
        float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

inline Status SessionImpl::init(const std::shared_ptr<const ModelImpl>& m, const SessionOptions& o) {
    model = m;
    const ModelInfo& hp = m->info;
    n_ctx = o.n_ctx > 0 ? o.n_ctx : std::min(hp.n_ctx_train, 4096);
    if (n_ctx <= 0 || n_ctx > (1 << 22)) return fail(Status::invalid_argument, "n_ctx %d is out of range", n_ctx);
    n_batch = o.n_batch > 0 ? std::min(o.n_batch, 4096) : 64;
    float_activations = o.float_activations;
    n_embd = hp.n_embd;
    q_dim = (int64_t)hp.n_head * hp.head_dim;
    kv_dim = (int64_t)hp.n_head_kv * hp.head_dim;
    max_ff = std::max<int64_t>(hp.n_ff, hp.n_ff_shared);
    slots = hp.n_expert > 0 ? hp.n_expert_used + (hp.n_ff_shared > 0 ? 1 : 0) : 1;
    const int64_t B = n_batch;
    uint64_t kv_elems = (uint64_t)hp.n_layer * (uint64_t)n_ctx * (uint64_t)kv_dim;
    bool ok = k_cache.allocate((size_t)kv_elems) && v_cache.allocate((size_t)kv_elems) && x.allocate((size_t)(B * n_embd)) &&
              xb.allocate((size_t)(B * n_embd)) && q.allocate((size_t)(B * q_dim)) && k.allocate((size_t)(B * kv_dim)) &&
              v.allocate((size_t)(B * kv_dim)) && att_out.allocate((size_t)(B * q_dim)) && ffn_out.allocate((size_t)(B * n_embd)) &&
              scores.allocate((size_t)pool.size() * (size_t)n_ctx) && router_logits.allocate((size_t)(B * std::max(1, hp.n_expert))) &&
              hidden.allocate((size_t)(B * slots * max_ff)) && logits.allocate((size_t)hp.n_vocab) &&
              logits_batch.allocate((size_t)(B * hp.n_vocab));
    if (!ok) return fail(Status::out_of_memory, "cannot allocate the KV cache and scratch for n_ctx %d", n_ctx);
    hidden_q_stride = std::max(act_row_bytes(ActFormat::q8_k, max_ff / kQKK * kQKK + kQKK), act_row_bytes(ActFormat::q8_0, max_ff / kQK * kQK + kQK));
    hidden_q_stride = std::max(hidden_q_stride, (size_t)max_ff * 4);
    size_t act_rows = std::max(m->max_act_bytes_per_row, (size_t)std::max(n_embd, q_dim) * 4);
    for (int f = 0; f < 3; ++f)
        if (!act_in.buf[f].allocate(act_rows * (size_t)B) || !act_att.buf[f].allocate(act_rows * (size_t)B))
            return fail(Status::out_of_memory, "cannot allocate activation buffers");
    if (!hidden_q.allocate(hidden_q_stride * (size_t)(B * slots))) return fail(Status::out_of_memory, "cannot allocate activation buffers");
    slot_expert.assign((size_t)(B * slots), 0);
    slot_weight.assign((size_t)(B * slots), 0.f);
    expert_first.assign((size_t)hp.n_expert + 3, 0);
    uses.resize((size_t)(B * slots));
    active.reserve((size_t)hp.n_expert + 2);
    active_row_start.reserve((size_t)hp.n_expert + 3);
    last_experts.assign((size_t)hp.n_layer * (size_t)std::max(1, hp.n_expert_used), -1);
    topk_scratch.reserve((size_t)hp.n_expert);
    return Status::ok;
}

// out[t * out_stride + r] = W[mat] row r . in[t], for t < n, all rows; threads split the rows.
inline void SessionImpl::matmul(const Weight& w, int64_t mat, ActCache& in, int32_t n, float* out, int64_t out_stride) {
    const KernelTraits& k = kt(w);
    for (int32_t t = 0; t < n; ++t) in.get(k.act, t);  // quantize before the threads start
    pool.parallel_for([&](int ith, int nth) {
        int64_t r0, r1;
        split_range(w.rows, ith, nth, &r0, &r1);
        for (int64_t r = r0; r < r1; ++r) {
            const uint8_t* row = w.row(mat, r);
            for (int32_t t = 0; t < n; ++t) out[t * out_stride + r] = k.vec_dot(row, in.get(k.act, t), w.cols);
        }
    });
}

inline void SessionImpl::attention_layer(int il, int32_t n) {
    const ModelImpl& m = *model;
    const ModelInfo& hp = m.info;
    const LayerWeights& l = m.layers[(size_t)il];
    const int hd = hp.head_dim, n_head = hp.n_head, n_kv = hp.n_head_kv;

    for (int32_t t = 0; t < n; ++t) rms_norm(xb.data + t * n_embd, x.data + t * n_embd, l.attn_norm.data(), n_embd, hp.rms_eps);
    act_in.reset(xb.data, n_embd, n);
    matmul(l.wq, 0, act_in, n, q.data, q_dim);
    matmul(l.wk, 0, act_in, n, k.data, kv_dim);
    matmul(l.wv, 0, act_in, n, v.data, kv_dim);

    for (int32_t t = 0; t < n; ++t) {
        float* qt = q.data + t * q_dim;
        float* kt = k.data + t * kv_dim;
        float* vt = v.data + t * kv_dim;
        if (!l.bq.empty()) for (int64_t i = 0; i < q_dim; ++i) qt[i] += l.bq[(size_t)i];
        if (!l.bk.empty()) for (int64_t i = 0; i < kv_dim; ++i) kt[i] += l.bk[(size_t)i];
        if (!l.bv.empty()) for (int64_t i = 0; i < kv_dim; ++i) vt[i] += l.bv[(size_t)i];
        if (m.qk_norm == QkNorm::whole) {
            rms_norm(qt, qt, l.q_norm.data(), q_dim, hp.rms_eps);
            rms_norm(kt, kt, l.k_norm.data(), kv_dim, hp.rms_eps);
        } else if (m.qk_norm == QkNorm::per_head) {
            for (int h = 0; h < n_head; ++h) rms_norm(qt + h * hd, qt + h * hd, l.q_norm.data(), hd, hp.rms_eps);
            for (int h = 0; h < n_kv; ++h) rms_norm(kt + h * hd, kt + h * hd, l.k_norm.data(), hd, hp.rms_eps);
        }
        int32_t p = pos + t;
        for (int h = 0; h < n_head; ++h) rope(qt + h * hd, hp.n_rot, p, hp.rope_freq_base, hp.rope_freq_scale, hp.rope_neox);
        for (int h = 0; h < n_kv; ++h) rope(kt + h * hd, hp.n_rot, p, hp.rope_freq_base, hp.rope_freq_scale, hp.rope_neox);
        size_t off = ((size_t)il * (size_t)n_ctx + (size_t)p) * (size_t)kv_dim;
        std::memcpy(k_cache.data + off, kt, (size_t)kv_dim * 4);
        std::memcpy(v_cache.data + off, vt, (size_t)kv_dim * 4);
    }

    // Causal GQA attention: query head h reads KV head h / (n_head / n_kv).
    const float scale = 1.f / std::sqrt((float)hd);
    const int group = n_head / n_kv;
    const float* kl = k_cache.data + (size_t)il * (size_t)n_ctx * (size_t)kv_dim;
    const float* vl = v_cache.data + (size_t)il * (size_t)n_ctx * (size_t)kv_dim;
    pool.parallel_for([&](int ith, int nth) {
        float* sc = scores.data + (size_t)ith * (size_t)n_ctx;
        int64_t w0, w1;
        split_range((int64_t)n * n_head, ith, nth, &w0, &w1);
        for (int64_t w = w0; w < w1; ++w) {
            int32_t t = (int32_t)(w / n_head);
            int h = (int)(w % n_head), kvh = h / group;
            int32_t len = pos + t + 1;
            const float* qh = q.data + t * q_dim + h * hd;
            float mx = -INFINITY;
            for (int32_t j = 0; j < len; ++j) {
                const float* kj = kl + (size_t)j * (size_t)kv_dim + (size_t)kvh * hd;
                float s = 0;
                for (int i = 0; i < hd; ++i) s += qh[i] * kj[i];
                sc[j] = s * scale;
                mx = std::max(mx, sc[j]);
            }
            float sum = 0;
            for (int32_t j = 0; j < len; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
            float inv = 1.f / sum;
            float* o = att_out.data + t * q_dim + h * hd;
            std::fill(o, o + hd, 0.f);
            for (int32_t j = 0; j < len; ++j) {
                const float* vj = vl + (size_t)j * (size_t)kv_dim + (size_t)kvh * hd;
                float a = sc[j] * inv;
                for (int i = 0; i < hd; ++i) o[i] += a * vj[i];
            }
        }
    });

    act_att.reset(att_out.data, q_dim, n);
    matmul(l.wo, 0, act_att, n, ffn_out.data, n_embd);
    for (int32_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < n_embd; ++i) x[t * n_embd + i] += ffn_out[t * n_embd + i] + (l.bo.empty() ? 0.f : l.bo[(size_t)i]);
}

inline void SessionImpl::ffn_layer(int il, int32_t n) {
    const ModelImpl& m = *model;
    const ModelInfo& hp = m.info;
    const LayerWeights& l = m.layers[(size_t)il];

    for (int32_t t = 0; t < n; ++t) rms_norm(xb.data + t * n_embd, x.data + t * n_embd, l.ffn_norm.data(), n_embd, hp.rms_eps);
    act_in.reset(xb.data, n_embd, n);

    // Routing: softmax over all experts, top-k (ties to the lower id), optional renormalisation.
    if (hp.n_expert > 0) {
        matmul(l.router, 0, act_in, n, router_logits.data, hp.n_expert);
        for (int32_t t = 0; t < n; ++t) {
            float* lg = router_logits.data + (int64_t)t * hp.n_expert;
            float mx = *std::max_element(lg, lg + hp.n_expert), sum = 0;
            for (int e = 0; e < hp.n_expert; ++e) { lg[e] = std::exp(lg[e] - mx); sum += lg[e]; }
            for (int e = 0; e < hp.n_expert; ++e) lg[e] /= sum;
            topk_scratch.clear();
            for (int e = 0; e < hp.n_expert; ++e) topk_scratch.emplace_back(lg[e], e);
            std::partial_sort(topk_scratch.begin(), topk_scratch.begin() + hp.n_expert_used, topk_scratch.end(),
                              [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
                                  return a.first > b.first || (a.first == b.first && a.second < b.second);
                              });
            float wsum = 0;
            for (int j = 0; j < hp.n_expert_used; ++j) wsum += topk_scratch[(size_t)j].first;
            for (int j = 0; j < hp.n_expert_used; ++j) {
                slot_expert[(size_t)(t * slots + j)] = topk_scratch[(size_t)j].second;
                slot_weight[(size_t)(t * slots + j)] = hp.expert_weights_norm ? topk_scratch[(size_t)j].first / wsum : topk_scratch[(size_t)j].first;
            }
            if (t == n - 1)
                for (int j = 0; j < hp.n_expert_used; ++j) last_experts[(size_t)(il * hp.n_expert_used + j)] = topk_scratch[(size_t)j].second;
            if (l.gate_shexp) {
                const float* xt = xb.data + t * n_embd;
                float g = 0;
                for (int64_t i = 0; i < n_embd; ++i) g += l.router_shexp[(size_t)i] * xt[i];
                slot_expert[(size_t)(t * slots + hp.n_expert_used)] = kShared;
                slot_weight[(size_t)(t * slots + hp.n_expert_used)] = 1.f / (1.f + std::exp(-g));
            }
        }
    } else {
        for (int32_t t = 0; t < n; ++t) { slot_expert[(size_t)t] = kDense; slot_weight[(size_t)t] = 1.f; }
    }

    // Group the (token, slot) uses by expert (counting sort), so each expert's rows are read once.
    int n_ids = hp.n_expert + 2;
    std::fill(expert_first.begin(), expert_first.end(), 0);
    for (int32_t u = 0; u < n * slots; ++u) ++expert_first[(size_t)expert_index(slot_expert[(size_t)u]) + 1];
    for (int i = 0; i < n_ids; ++i) expert_first[(size_t)i + 1] += expert_first[(size_t)i];
    active.clear();
    active_row_start.clear();
    active_row_start.push_back(0);
    for (int i = 0; i < n_ids; ++i) {
        if (expert_first[(size_t)i + 1] == expert_first[(size_t)i]) continue;
        int32_t e = i - 2;
        const Weight *g, *u, *d;
        int64_t mat;
        ffn_weights(l, e, &g, &u, &d, &mat);
        active.push_back(e);
        active_row_start.push_back(active_row_start.back() + g->rows);
    }
    {
        // Fill uses[] grouped by expert: a second pass with moving cursors (expert_first is restored after).
        for (int32_t u = 0; u < n * slots; ++u) {
            int idx = expert_index(slot_expert[(size_t)u]);
            uses[(size_t)expert_first[(size_t)idx]++] = ExpertUse{u / slots, u % slots};
        }
        for (int i = n_ids; i > 0; --i) expert_first[(size_t)i] = expert_first[(size_t)i - 1];
        expert_first[0] = 0;
    }

    // Phase 1: gate/up rows of every active expert, SwiGLU into hidden[(token, slot)].
    for (int32_t t = 0; t < n; ++t)
        for (int32_t e : active) {
            const Weight *g, *u, *d;
            int64_t mat;
            ffn_weights(l, e, &g, &u, &d, &mat);
            act_in.get(kt(*g).act, t);
            act_in.get(kt(*u).act, t);
        }
    const int64_t total_rows = active_row_start.back();
    pool.parallel_for([&](int ith, int nth) {
        int64_t r0, r1;
        split_range(total_rows, ith, nth, &r0, &r1);
        size_t a = 0;
        for (int64_t gr = r0; gr < r1; ++gr) {
            while (gr >= active_row_start[a + 1]) ++a;
            int32_t e = active[a];
            int64_t r = gr - active_row_start[a];
            const Weight *g, *u, *d;
            int64_t mat;
            ffn_weights(l, e, &g, &u, &d, &mat);
            const uint8_t* grow = g->row(mat, r);
            const uint8_t* urow = u->row(mat, r);
            int idx = expert_index(e);
            for (int32_t k = expert_first[(size_t)idx]; k < expert_first[(size_t)idx + 1]; ++k) {
                const ExpertUse& use = uses[(size_t)k];
                float gv = kt(*g).vec_dot(grow, act_in.get(kt(*g).act, use.token), g->cols);
                float uv = kt(*u).vec_dot(urow, act_in.get(kt(*u).act, use.token), u->cols);
                hidden[(size_t)((use.token * slots + use.slot) * max_ff + r)] = silu(gv) * uv;
            }
        }
    });

    // Phase 2: quantize each hidden row to its down projection's activation format.
    pool.parallel_for([&](int ith, int nth) {
        int64_t u0, u1;
        split_range((int64_t)n * slots, ith, nth, &u0, &u1);
        for (int64_t u = u0; u < u1; ++u) {
            const Weight *g, *up, *d;
            int64_t mat;
            ffn_weights(l, slot_expert[(size_t)u], &g, &up, &d, &mat);
            quantize_act(kt(*d).act, hidden_q.data + (size_t)u * hidden_q_stride, hidden.data + u * max_ff, d->cols);
        }
    });

    // Phase 3: down projections, weighted sum accumulated per output row.
    pool.parallel_for([&](int ith, int nth) {
        int64_t r0, r1;
        split_range(n_embd, ith, nth, &r0, &r1);
        for (int64_t r = r0; r < r1; ++r)
            for (int32_t t = 0; t < n; ++t) {
                float acc = 0;
                for (int32_t s = 0; s < slots; ++s) {
                    size_t u = (size_t)(t * slots + s);
                    const Weight *g, *up, *d;
                    int64_t mat;
                    ffn_weights(l, slot_expert[u], &g, &up, &d, &mat);
                    acc += slot_weight[u] * kt(*d).vec_dot(d->row(mat, r), hidden_q.data + u * hidden_q_stride, d->cols);
                }
                x[t * n_embd + r] += acc;
            }
    });
}

inline Status SessionImpl::forward(const int32_t* tokens, int32_t n, float* all_logits) {
    const ModelImpl& m = *model;
    const ModelInfo& hp = m.info;
    for (int32_t t = 0; t < n; ++t) {
        Status s = dequantize_row((TensorType)m.token_embd.type, m.token_embd.row(0, tokens[t]), x.data + t * n_embd, n_embd);
        if (s != Status::ok) return s;
    }
    for (int il = 0; il < hp.n_layer; ++il) {
        attention_layer(il, n);
        ffn_layer(il, n);
    }
    // Final norm and the output head: every row when all logits are wanted, else the last only.
    int32_t first = all_logits ? 0 : n - 1;
    for (int32_t t = first; t < n; ++t) rms_norm(xb.data + t * n_embd, x.data + t * n_embd, m.output_norm.data(), n_embd, hp.rms_eps);
    act_in.reset(xb.data + first * n_embd, n_embd, n - first);
    matmul(m.output, 0, act_in, n - first, logits_batch.data, hp.n_vocab);
    if (all_logits) std::memcpy(all_logits, logits_batch.data, (size_t)n * (size_t)hp.n_vocab * 4);
    std::memcpy(logits.data, logits_batch.data + (int64_t)(n - first - 1) * hp.n_vocab, (size_t)hp.n_vocab * 4);
    pos += n;
    return Status::ok;
}

}  // namespace detail

Session::Session() = default;
Session::~Session() = default;
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;

Status Session::create(const Model& model, const SessionOptions& options, Session* out) {
    if (!out || !model.valid()) return detail::fail(Status::invalid_argument, "invalid model or null output");
    int n_threads = options.n_threads;
    if (n_threads <= 0) {
#if MOE_DETAIL_HAS_THREADS
        n_threads = (int)std::min(16u, std::max(1u, std::thread::hardware_concurrency()));
#else
        n_threads = 1;
#endif
    }
    if (n_threads > 512) return detail::fail(Status::invalid_argument, "n_threads %d is out of range", n_threads);
#if !MOE_DETAIL_HAS_THREADS
    n_threads = 1;
#endif
    if (options.n_ctx < 0 || options.n_batch < 0) return detail::fail(Status::invalid_argument, "negative n_ctx or n_batch");
    std::unique_ptr<detail::SessionImpl> impl(new (std::nothrow) detail::SessionImpl(n_threads));
    if (!impl) return detail::fail(Status::out_of_memory, "out of memory");
    Status s = impl->init(model.impl_, options);
    if (s != Status::ok) return s;
    out->impl_ = std::move(impl);
    out->model_ = &model;
    return Status::ok;
}

Status Session::eval(const int32_t* tokens, size_t n, float* all_logits) {
    if (!impl_) return detail::fail(Status::invalid_argument, "session not created");
    if (!tokens || n == 0) return detail::fail(Status::invalid_argument, "no tokens to evaluate");
    const int32_t n_vocab = impl_->model->info.n_vocab;
    for (size_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= n_vocab) return detail::fail(Status::invalid_argument, "token id %d is out of range [0, %d)", tokens[i], n_vocab);
    if (n > (size_t)(impl_->n_ctx - impl_->pos))
        return detail::fail(Status::context_full, "%zu tokens do not fit: position %d of n_ctx %d", n, impl_->pos, impl_->n_ctx);
    for (size_t done = 0; done < n;) {
        int32_t chunk = (int32_t)std::min<size_t>(n - done, (size_t)impl_->n_batch);
        Status s = impl_->forward(tokens + done, chunk, all_logits ? all_logits + done * (size_t)n_vocab : nullptr);
        if (s != Status::ok) return s;
        done += (size_t)chunk;
    }
    return Status::ok;
}

const float* Session::logits() const { return impl_ ? impl_->logits.data : nullptr; }
int32_t Session::position() const { return impl_ ? impl_->pos : 0; }
int32_t Session::n_ctx() const { return impl_ ? impl_->n_ctx : 0; }
void Session::reset() { if (impl_) impl_->pos = 0; }
Status Session::truncate(int32_t n) {
    if (!impl_ || n < 0 || n > impl_->pos) return detail::fail(Status::invalid_argument, "cannot truncate to %d", n);
    impl_->pos = n;
    return Status::ok;
}
const Model& Session::model() const { return *model_; }
const int32_t* Session::last_expert_ids() const { return impl_ ? impl_->last_experts.data() : nullptr; }

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] SAMPLER IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>sampler  Chain order as llama.cpp's default: penalties -> top-k -> top-p -> min-p ->
// temperature -> draw. top-p and min-p look at the untempered distribution. The RNG is
// xoshiro256** seeded through splitmix64, so a seed means the same stream everywhere.

namespace moe {

Sampler::Sampler(const SamplerOptions& options) : options_(options) { reset(); }

void Sampler::reset() {
    uint64_t z = options_.seed;
    for (uint64_t& s : rng_state_) {  // splitmix64
        z += 0x9e3779b97f4a7c15ull;
        uint64_t t = z;
        t = (t ^ (t >> 30)) * 0xbf58476d1ce4e5b9ull;
        t = (t ^ (t >> 27)) * 0x94d049bb133111ebull;
        s = t ^ (t >> 31);
    }
    history_.assign((size_t)std::max(0, options_.repeat_last_n), -1);
    history_pos_ = 0;
}

double Sampler::next_uniform() {
    uint64_t* s = rng_state_;
    uint64_t x = s[1] * 5;
    uint64_t result = ((x << 7) | (x >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

void Sampler::accept(int32_t token) {
    if (history_.empty()) return;
    history_[history_pos_] = token;
    history_pos_ = (history_pos_ + 1) % history_.size();
}

int32_t Sampler::sample(const float* logits, int32_t n_vocab) {
    if (!logits || n_vocab <= 0) return -1;
    candidates_.resize((size_t)n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) candidates_[(size_t)i] = Candidate{logits[i], i};
    if (options_.repeat_penalty != 1.f && options_.repeat_penalty > 0) {
        // Penalise each distinct recent token once.
        for (size_t h = 0; h < history_.size(); ++h) {
            int32_t tok = history_[h];
            if (tok < 0 || tok >= n_vocab) continue;
            bool seen_before = false;
            for (size_t j = 0; j < h; ++j) seen_before |= history_[j] == tok;
            if (seen_before) continue;
            float& lg = candidates_[(size_t)tok].logit;
            lg = lg > 0 ? lg / options_.repeat_penalty : lg * options_.repeat_penalty;
        }
    }
    auto better = [](const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
    if (options_.temperature <= 0) return std::min_element(candidates_.begin(), candidates_.end(), better)->id;

    size_t n = candidates_.size();
    if (options_.top_k > 0 && (size_t)options_.top_k < n) {
        std::partial_sort(candidates_.begin(), candidates_.begin() + options_.top_k, candidates_.end(), better);
        n = (size_t)options_.top_k;
    } else {
        std::sort(candidates_.begin(), candidates_.end(), better);
    }
    // Probabilities of the survivors (sorted, so [0] is the max).
    double max_logit = candidates_[0].logit, sum = 0;
    std::vector<double>& p = probs_;
    p.resize(n);
    for (size_t i = 0; i < n; ++i) { p[i] = std::exp((double)candidates_[i].logit - max_logit); sum += p[i]; }
    if (options_.top_p < 1.f) {
        double cum = 0;
        size_t keep = n;
        for (size_t i = 0; i < n; ++i) {
            cum += p[i] / sum;
            if (cum >= options_.top_p) { keep = i + 1; break; }
        }
        n = std::max<size_t>(1, keep);
    }
    if (options_.min_p > 0) {
        size_t keep = 1;
        while (keep < n && p[keep] >= options_.min_p * p[0]) ++keep;
        n = keep;
    }
    sum = 0;
    for (size_t i = 0; i < n; ++i) { p[i] = std::exp(((double)candidates_[i].logit - max_logit) / options_.temperature); sum += p[i]; }
    double r = next_uniform() * sum;
    for (size_t i = 0; i < n; ++i) {
        r -= p[i];
        if (r < 0) return candidates_[i].id;
    }
    return candidates_[n - 1].id;
}

}  // namespace moe

//-----------------------------------------------------------------------------
// [SECTION] GENERATION IMPLEMENTATION
//-----------------------------------------------------------------------------
// >>generate  Prompt, then sample -> stream -> eval one token at a time. Text that could be the
// start of a stop string is held back until it is known not to be one.

namespace moe {

MOE_API Status generate(Session& session, const std::vector<int32_t>& prompt, const GenerateOptions& options, StreamFn on_token, void* user,
                        GenerateResult* result) {
    GenerateResult local;
    GenerateResult& res = result ? *result : local;
    res = GenerateResult{};
    if (!session.logits()) return detail::fail(Status::invalid_argument, "session not created");
    if (options.max_tokens < 0) return detail::fail(Status::invalid_argument, "max_tokens must be >= 0");
    const Model& model = session.model();
    const Tokenizer& tok = model.tokenizer();
    const int32_t n_vocab = model.info().n_vocab;
    Sampler sampler(options.sampler);
    for (int32_t t : prompt) sampler.accept(t);

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

    Detokenizer detok(tok);
    std::string pending;  // decoded but not yet streamed (possible stop-string prefix)
    auto emit = [&](int32_t token, size_t n) -> bool {
        if (n == 0) return true;
        res.text.append(pending, 0, n);
        bool go_on = !on_token || on_token(user, token, pending.data(), n);
        pending.erase(0, n);
        if (!go_on) res.stopped_by_callback = true;
        return go_on;
    };

    Status status = Status::ok;
    for (int32_t i = 0; i < options.max_tokens; ++i) {
        int32_t token = sampler.sample(session.logits(), n_vocab);
        sampler.accept(token);
        res.tokens.push_back(token);
        if (options.stop_at_end_of_generation && tok.valid() && tok.is_end_of_generation(token)) { res.stopped_by_eog = true; break; }
        if (tok.valid()) detok.push(token, &pending);
        // Stop strings: cut at the first match; otherwise stream all but a possible match prefix.
        size_t cut = std::string::npos;
        for (const std::string& s : options.stop)
            if (!s.empty()) cut = std::min(cut, pending.find(s));
        if (cut != std::string::npos) {
            emit(token, cut);
            res.stopped_by_string = true;
            break;
        }
        size_t hold = 0;
        for (const std::string& s : options.stop)
            for (size_t k = std::min(s.size() - 1, pending.size()); k > hold; --k)
                if (pending.compare(pending.size() - k, k, s, 0, k) == 0) { hold = k; break; }
        if (!emit(token, pending.size() - hold)) break;
        if (i + 1 == options.max_tokens) break;  // the last token needs no forward pass
        status = session.eval(&token, 1);
        if (status != Status::ok) break;
    }
    if (!res.stopped_by_string && !res.stopped_by_callback) {
        if (tok.valid()) detok.flush(&pending);
        emit(res.tokens.empty() ? -1 : res.tokens.back(), pending.size());
    }
    res.decode_seconds = detail::now_seconds() - t1;
    return status == Status::context_full && !res.tokens.empty() ? Status::context_full : status;
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

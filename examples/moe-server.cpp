// moe-server: an OpenAI-compatible chat endpoint on one Model, POSIX sockets, standard library only.
//
//   moe-server [-m FILE] [--host 127.0.0.1] [--port 8080] [--parallel N] [-c N] [-t N]
//              [--max-body BYTES] [--max-tokens N] [--max-connections N] [--exact]
//
//   POST /v1/chat/completions  {"messages": [...], "max_tokens", "temperature", "top_p", "top_k",
//                               "min_p", "seed", "stop", "stream", "presence_penalty",
//                               "frequency_penalty", "logit_bias", "grammar" (GBNF),
//                               "response_format" (json_object, json_schema)}  (stream: server-sent events)
//   GET  /v1/models, GET /health
//
// One inference thread owns N Sessions (--parallel, default 4): a request waits for a free one,
// its prompt (rendered with the model's chat template, ChatML when the model has none) reuses the
// longest prefix that session still holds, and then every running request gets one token per
// pass of Session::eval_batch, so an expert's weights are read once for all of them. Connection
// threads parse HTTP and stream what the inference thread produces; a client that goes away
// cancels its request. Requests are bounded (header 16 KiB, body --max-body, tokens
// --max-tokens, connections --max-connections: beyond that 503); bad input gets a JSON error
// {"error": {"message", "type"}} with 400/404/405/413/503.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifndef MOE_DEFAULT_MODEL
#define MOE_DEFAULT_MODEL "models/demo-qwen3moe.gguf"
#endif

namespace {

using moe::detail::TplKind;
using moe::detail::TplValue;

// The template models without one get (ChatML, as Qwen and OLMoE-Instruct use).
const char* kChatMlTemplate =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

struct Config {
    std::string model = MOE_DEFAULT_MODEL, host = "127.0.0.1";
    long long port = 8080, parallel = 4, n_ctx = 4096, threads = 0, max_body = 1 << 20, max_tokens = 1024, max_connections = 64;
    bool exact = false;  // row kernels only: a reply never depends on what its session held before
};

// ---- a request's channel: the inference thread pushes, the connection thread pops ----
struct Job {
    std::vector<int32_t> prompt;
    moe::GenerateOptions gen;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::string> pieces;  // text not yet sent
    bool done = false;
    std::string finish_reason, error;
    int n_prompt = 0, n_generated = 0, n_reused = 0;
    std::atomic<bool> cancelled{false};
};

// ---- the inference thread ----
class Scheduler {
public:
    Scheduler(const moe::Model& model, const Config& cfg) : model_(model), cfg_(cfg) {}
    moe::Status start() {
        moe::SessionOptions so;
        so.n_ctx = (int32_t)cfg_.n_ctx;
        so.n_threads = (int32_t)cfg_.threads;
        if (cfg_.exact) so.gemm_min_tokens = -1;
        slots_.resize((size_t)cfg_.parallel);
        for (size_t i = 0; i < slots_.size(); ++i) {
            if (i > 0) so.n_threads = 1;  // eval_batch runs on slot 0's threads; the others only prefill
            moe::Status s = moe::Session::create(model_, so, &slots_[i].session);
            if (s != moe::Status::ok) return s;
        }
        thread_ = std::thread([this] { loop(); });
        return moe::Status::ok;
    }
    void stop() {
        { std::lock_guard<std::mutex> lock(mu_); quit_ = true; }
        cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }
    void submit(const std::shared_ptr<Job>& job) {
        { std::lock_guard<std::mutex> lock(mu_); queue_.push_back(job); }
        cv_.notify_all();
    }
    int32_t n_ctx() const { return (int32_t)cfg_.n_ctx; }

private:
    struct Slot {
        moe::Session session;
        std::shared_ptr<Job> job;
        std::unique_ptr<moe::GenerateResult> result;
        std::unique_ptr<moe::detail::Generation> gen;
        int32_t next = -1;
    };

    static void finish(Job& job, const char* reason, const std::string& error = std::string()) {
        std::lock_guard<std::mutex> lock(job.mu);
        job.done = true;
        job.finish_reason = reason;
        job.error = error;
        job.cv.notify_all();
    }
    // Streams a piece to the job (the Generation's emit callback); false stops a cancelled job.
    static bool push(Job& job, const char* text, size_t n) {
        std::lock_guard<std::mutex> lock(job.mu);
        job.pieces.emplace_back(text, n);
        job.cv.notify_all();
        return !job.cancelled.load();
    }
    void end_slot(Slot& s) {
        const moe::GenerateResult& r = *s.result;
        s.job->n_generated = (int)r.tokens.size();  // read by the connection thread after `done`
        finish(*s.job, s.job->cancelled.load() ? "cancelled" : r.stopped_by_string || r.stopped_by_eog || r.stopped_by_grammar ? "stop" : "length");
        s.gen.reset();  // holds references into the job and the result: first
        s.result.reset();
        s.job.reset();
        s.next = -1;
    }
    // Starts a job on a free slot: prompt (reusing the slot's cached prefix), then its first token.
    void begin(Slot& s) {
        Job& job = *s.job;
        if (job.cancelled.load()) {  // the client left while the request waited for a slot
            finish(job, "cancelled");
            s.job.reset();
            return;
        }
        size_t reused = 0;
        moe::Status st = s.session.eval_prompt(job.prompt.data(), job.prompt.size(), &reused);
        job.n_reused = (int)reused;
        if (st != moe::Status::ok) {
            finish(job, "error", moe::last_error());
            s.job.reset();
            return;
        }
        s.result.reset(new moe::GenerateResult());
        s.gen.reset(new moe::detail::Generation(job.gen, model_.tokenizer(), *s.result));
        for (int32_t t : job.prompt) s.gen->sampler.accept(t);
        step(s);
    }
    void step(Slot& s) {
        Job& job = *s.job;
        auto emit = [&job](int32_t, const char* text, size_t n) { return push(job, text, n); };
        if (s.gen->options.max_tokens == 0 || s.session.position() >= s.session.n_ctx()) { s.gen->finish(emit); end_slot(s); return; }
        s.next = s.gen->step(s.session.logits(), model_.info().n_vocab, emit);
        if (s.next < 0) end_slot(s);
    }
    void loop() {
        std::vector<moe::Session*> batch;
        std::vector<int32_t> tokens;
        std::vector<Slot*> who;
        for (;;) {
            std::vector<Slot*> starting;
            {
                std::unique_lock<std::mutex> lock(mu_);
                auto busy = [&] {
                    for (Slot& s : slots_)
                        if (s.job) return true;
                    return false;
                };
                auto free_slot = [&]() -> Slot* {
                    for (Slot& s : slots_)
                        if (!s.job) return &s;
                    return nullptr;
                };
                cv_.wait(lock, [&] { return quit_ || busy() || (!queue_.empty() && free_slot()); });
                if (quit_) break;
                while (!queue_.empty()) {
                    Slot* s = free_slot();
                    if (!s) break;
                    s->job = queue_.front();
                    queue_.pop_front();
                    starting.push_back(s);
                }
            }
            for (Slot* s : starting) begin(*s);
            batch.clear(); tokens.clear(); who.clear();
            for (Slot& s : slots_)
                if (s.job && s.next >= 0) {
                    if (s.job->cancelled.load() || s.session.position() >= s.session.n_ctx()) { end_slot(s); continue; }
                    batch.push_back(&s.session);
                    tokens.push_back(s.next);
                    who.push_back(&s);
                }
            if (batch.empty()) continue;
            if (moe::Session::eval_batch(batch.data(), tokens.data(), batch.size()) != moe::Status::ok) {
                const std::string why = moe::last_error();
                for (Slot* s : who) { finish(*s->job, "error", why); s->job.reset(); s->gen.reset(); s->result.reset(); s->next = -1; }
                continue;
            }
            for (Slot* s : who) step(*s);
        }
        std::lock_guard<std::mutex> lock(mu_);  // shutting down: nobody is left waiting
        for (auto& j : queue_) finish(*j, "error", "server shutting down");
        for (Slot& s : slots_)
            if (s.job) finish(*s.job, "error", "server shutting down");
    }

    const moe::Model& model_;
    const Config& cfg_;
    std::vector<Slot> slots_;
    std::deque<std::shared_ptr<Job>> queue_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool quit_ = false;
    std::thread thread_;
};

// ---- HTTP ----
bool send_all(int fd, const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
        const ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        off += (size_t)n;
    }
    return true;
}

std::string json_string(const std::string& s) {
    std::string out;
    moe::detail::json_escape_string(s, false, &out);
    return out;
}

void respond(int fd, int code, const std::string& body, const char* type = "application/json") {
    const char* reason = code == 200 ? "OK" : code == 400 ? "Bad Request" : code == 404 ? "Not Found" : code == 405 ? "Method Not Allowed"
                       : code == 413 ? "Payload Too Large" : code == 503 ? "Service Unavailable" : "Internal Server Error";
    char head[256];
    std::snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", code, reason, type, body.size());
    send_all(fd, head + body);
}
void respond_error(int fd, int code, const std::string& message) {
    const char* type = code == 400 || code == 413 ? "invalid_request_error" : code == 404 || code == 405 ? "not_found_error" : "server_error";
    respond(fd, code, "{\"error\": {\"message\": " + json_string(message) + ", \"type\": \"" + type + "\"}}");
}

struct Request {
    std::string method, path, body;
};

// Reads one request: 16 KiB of header at most, a Content-Length body of at most max_body.
// Returns 0 or the HTTP status to answer with (-1: the connection died).
int read_request(int fd, long long max_body, Request* req) {
    std::string buf;
    char chunk[4096];
    size_t header_end = std::string::npos;
    while ((header_end = buf.find("\r\n\r\n")) == std::string::npos) {
        if (buf.size() > 16384) return 413;
        const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf.append(chunk, (size_t)n);
    }
    const std::string head = buf.substr(0, header_end);
    const size_t sp1 = head.find(' '), sp2 = sp1 == std::string::npos ? sp1 : head.find(' ', sp1 + 1);
    if (sp2 == std::string::npos) return 400;
    req->method = head.substr(0, sp1);
    req->path = head.substr(sp1 + 1, sp2 - sp1 - 1);
    long long length = 0;
    for (size_t at = head.find("\r\n"); at != std::string::npos; at = head.find("\r\n", at + 2)) {
        const size_t end = head.find("\r\n", at + 2);
        std::string line = head.substr(at + 2, end == std::string::npos ? std::string::npos : end - at - 2);
        const size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string name = line.substr(0, colon);
        for (char& c : name) c = (char)std::tolower((unsigned char)c);
        if (name == "content-length") {
            char* e = nullptr;
            const char* v = line.c_str() + colon + 1;
            while (*v == ' ') ++v;
            length = std::strtoll(v, &e, 10);
            if (e == v || length < 0) return 400;
        } else if (name == "transfer-encoding") {
            return 400;  // chunked request bodies are not supported: send Content-Length
        }
    }
    if (length > max_body) return 413;
    req->body = buf.substr(header_end + 4);
    while ((long long)req->body.size() < length) {
        const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        req->body.append(chunk, (size_t)n);
    }
    if ((long long)req->body.size() > length) req->body.resize((size_t)length);
    return 0;
}

// ---- /v1/chat/completions ----
bool number_of(const moe::detail::TplDict& d, const char* key, double* out) {
    const TplValue* v = d.find(key);
    if (!v || v->kind == TplKind::none) return true;  // absent: keep the default
    if (v->kind == TplKind::integer) { *out = (double)v->integer; return true; }
    if (v->kind == TplKind::floating) { *out = v->floating; return true; }
    return false;
}

// Builds the job from the request body; on failure *why says what is wrong (a 400).
bool parse_chat_request(const std::string& body, const moe::Model& model, const Config& cfg, Job* job, bool* stream, std::string* why) {
    TplValue root;
    std::string error;
    if (!moe::detail::parse_json(body, &root, &error)) { *why = "invalid JSON: " + error; return false; }
    if (root.kind != TplKind::dict) { *why = "the request body must be a JSON object"; return false; }
    const moe::detail::TplDict& d = *root.dict;
    const TplValue* messages = d.find("messages");
    if (!messages || messages->kind != TplKind::list || messages->list->items.empty()) { *why = "'messages' must be a non-empty array"; return false; }
    for (const TplValue& m : messages->list->items) {
        const TplValue* role = m.kind == TplKind::dict ? m.dict->find("role") : nullptr;
        if (!role || role->kind != TplKind::string) { *why = "every message needs a string 'role'"; return false; }
    }
    const TplValue* st = d.find("stream");
    *stream = st && st->kind == TplKind::boolean && st->boolean;
    moe::SamplerOptions& so = job->gen.sampler;
    so.temperature = 1.0f; so.top_p = 1.0f; so.top_k = 0; so.min_p = 0;  // the API's defaults
    double v;
    struct Num { const char* key; float* dst; } floats[] = {{"temperature", &so.temperature}, {"top_p", &so.top_p}, {"min_p", &so.min_p},
                                                            {"presence_penalty", &so.presence_penalty}, {"frequency_penalty", &so.frequency_penalty}};
    for (const Num& n : floats) {
        v = *n.dst;
        if (!number_of(d, n.key, &v)) { *why = std::string("'") + n.key + "' must be a number"; return false; }
        *n.dst = (float)v;
    }
    v = so.top_k;
    if (!number_of(d, "top_k", &v) || v < 0 || v > 1e9) { *why = "'top_k' must be a number >= 0"; return false; }
    so.top_k = (int)v;
    v = 0;
    if (!number_of(d, "seed", &v) || !(v >= 0 && v < 9.2e18)) { *why = "'seed' must be a number in [0, 2^63)"; return false; }
    so.seed = (uint64_t)v;
    v = (double)cfg.max_tokens;
    if (!number_of(d, "max_tokens", &v) || !number_of(d, "max_completion_tokens", &v) || v < 0) { *why = "'max_tokens' must be a number >= 0"; return false; }
    job->gen.max_tokens = (int32_t)std::min<double>(v, (double)cfg.max_tokens);
    if (const TplValue* lb = d.find("logit_bias"); lb && lb->kind == TplKind::dict) {
        for (const auto& e : lb->dict->entries) {
            char* end = nullptr;
            const long id = std::strtol(e.first.c_str(), &end, 10);
            double b = 0;
            if (end == e.first.c_str() || *end || id < 0 || id > INT32_MAX || (e.second.kind != TplKind::integer && e.second.kind != TplKind::floating)) {
                *why = "'logit_bias' maps token ids to numbers";
                return false;
            }
            b = e.second.kind == TplKind::integer ? (double)e.second.integer : e.second.floating;
            so.logit_bias.push_back({(int32_t)id, (float)b});
        }
    }
    // Constrained output: "grammar" (GBNF), or "response_format" {"type": "json_object"} /
    // {"type": "json_schema", "json_schema": {"schema": {...}}}.
    if (const TplValue* g = d.find("grammar"); g && g->kind == TplKind::string) so.grammar = g->text;
    if (const TplValue* rf = d.find("response_format"); rf && rf->kind == TplKind::dict) {
        const TplValue* type = rf->dict->find("type");
        std::string schema = "{\"type\": \"object\"}";
        if (type && type->kind == TplKind::string && type->text == "json_schema") {
            const TplValue* js = rf->dict->find("json_schema");
            const TplValue* sc = js && js->kind == TplKind::dict ? js->dict->find("schema") : nullptr;
            if (!sc) { *why = "response_format json_schema needs json_schema.schema"; return false; }
            schema.clear();
            moe::detail::json_dump(*sc, moe::detail::JsonStyle{}, 0, &schema, &error);
        } else if (!type || type->kind != TplKind::string || (type->text != "json_object" && type->text != "text")) {
            *why = "response_format.type must be text, json_object or json_schema";
            return false;
        }
        if (type->text != "text" && moe::json_schema_to_grammar(schema, &so.grammar) != moe::Status::ok) { *why = moe::last_error(); return false; }
    }
    if (moe::check_sampler_options(so, model.info().n_vocab) != moe::Status::ok) { *why = moe::last_error(); return false; }
    if (const TplValue* stop = d.find("stop")) {
        if (stop->kind == TplKind::string) job->gen.stop.push_back(stop->text);
        else if (stop->kind == TplKind::list)
            for (const TplValue& s : stop->list->items) {
                if (s.kind != TplKind::string) { *why = "'stop' must be a string or an array of strings"; return false; }
                job->gen.stop.push_back(s.text);
            }
        else if (stop->kind != TplKind::none) { *why = "'stop' must be a string or an array of strings"; return false; }
    }
    // The prompt: the messages through the chat template.
    std::string messages_json;
    if (!moe::detail::json_dump(*messages, moe::detail::JsonStyle{}, 0, &messages_json, &error)) { *why = error; return false; }
    const moe::Tokenizer& tok = model.tokenizer();
    moe::ChatTemplateOptions co;
    co.add_generation_prompt = true;
    if (tok.bos() >= 0) co.bos_token = tok.token_text(tok.bos());
    const std::string& tmpl = tok.chat_template().empty() ? std::string(kChatMlTemplate) : tok.chat_template();
    std::string prompt;
    if (moe::render_chat_template(tmpl, messages_json, co, &prompt) != moe::Status::ok) { *why = std::string("chat template: ") + moe::last_error(); return false; }
    if (tok.encode(prompt, true, true, &job->prompt) != moe::Status::ok) { *why = moe::last_error(); return false; }
    if (job->prompt.empty()) { *why = "the prompt is empty"; return false; }
    job->n_prompt = (int)job->prompt.size();
    return true;
}

std::atomic<long long> g_request_id{0};

void serve_chat(int fd, const Request& req, const moe::Model& model, const Config& cfg, Scheduler& sched) {
    auto job = std::make_shared<Job>();
    bool stream = false;
    std::string why;
    if (!parse_chat_request(req.body, model, cfg, job.get(), &stream, &why)) { respond_error(fd, 400, why); return; }
    if (job->prompt.size() >= (size_t)sched.n_ctx()) {
        respond_error(fd, 400, "the prompt has " + std::to_string(job->prompt.size()) + " tokens; the context holds " + std::to_string(sched.n_ctx()));
        return;
    }
    const std::string id = "chatcmpl-" + std::to_string(++g_request_id);
    const long long created = (long long)std::time(nullptr);
    sched.submit(job);
    std::string text;
    bool client_ok = true;
    if (stream) {
        client_ok = send_all(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n");
    }
    auto chunk = [&](const std::string& delta_json, const char* finish) {
        return "data: {\"id\": \"" + id + "\", \"object\": \"chat.completion.chunk\", \"created\": " + std::to_string(created) +
               ", \"model\": \"moe_infer\", \"choices\": [{\"index\": 0, \"delta\": " + delta_json + ", \"finish_reason\": " +
               (finish ? "\"" + std::string(finish) + "\"" : std::string("null")) + "}]}\n\n";
    };
    if (stream && client_ok) client_ok = send_all(fd, chunk("{\"role\": \"assistant\", \"content\": \"\"}", nullptr));
    for (;;) {
        std::deque<std::string> pieces;
        bool done;
        {
            std::unique_lock<std::mutex> lock(job->mu);
            job->cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return job->done || !job->pieces.empty(); });
            pieces.swap(job->pieces);
            done = job->done;
        }
        char probe;  // a closed connection reads as end of file: the client went away
        if (client_ok && ::recv(fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT) == 0) client_ok = false;
        for (const std::string& p : pieces) {
            text += p;
            if (stream && client_ok) client_ok = send_all(fd, chunk("{\"content\": " + json_string(p) + "}", nullptr));
        }
        if (!client_ok) job->cancelled.store(true);  // the client went away: stop generating for it
        if (done) break;
    }
    if (!job->error.empty()) {
        if (stream) { if (client_ok) send_all(fd, "data: {\"error\": {\"message\": " + json_string(job->error) + ", \"type\": \"server_error\"}}\n\n"); }
        else respond_error(fd, 500, job->error);
        return;
    }
    const std::string usage = "{\"prompt_tokens\": " + std::to_string(job->n_prompt) + ", \"completion_tokens\": " + std::to_string(job->n_generated) +
                              ", \"total_tokens\": " + std::to_string(job->n_prompt + job->n_generated) + ", \"prompt_tokens_reused\": " + std::to_string(job->n_reused) + "}";
    if (stream) {
        if (client_ok) send_all(fd, chunk("{}", job->finish_reason.c_str()) + "data: [DONE]\n\n");
        return;
    }
    respond(fd, 200, "{\"id\": \"" + id + "\", \"object\": \"chat.completion\", \"created\": " + std::to_string(created) +
                     ", \"model\": \"moe_infer\", \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": " + json_string(text) +
                     "}, \"finish_reason\": \"" + job->finish_reason + "\"}], \"usage\": " + usage + "}");
}

std::atomic<int> g_connections{0};

void handle(int fd, const moe::Model& model, const Config& cfg, Scheduler& sched) {
    timeval tv{30, 0};  // a client that stalls mid-request, or stops reading the reply, is dropped
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    Request req;
    const int rc = read_request(fd, cfg.max_body, &req);
    if (rc == 413) respond_error(fd, 413, "request too large (header 16 KiB, body " + std::to_string(cfg.max_body) + " bytes at most)");
    else if (rc == 400) respond_error(fd, 400, "malformed HTTP request");
    else if (rc == 0) {
        const std::string path = req.path.substr(0, req.path.find('?'));
        if (path == "/v1/chat/completions") {
            if (req.method != "POST") respond_error(fd, 405, "use POST for " + path);
            else serve_chat(fd, req, model, cfg, sched);
        } else if (path == "/v1/models" && req.method == "GET") {
            respond(fd, 200, "{\"object\": \"list\", \"data\": [{\"id\": \"moe_infer\", \"object\": \"model\", \"owned_by\": \"local\", \"path\": " +
                                 json_string(cfg.model) + "}]}");
        } else if (path == "/health" && req.method == "GET") {
            respond(fd, 200, "{\"status\": \"ok\"}");
        } else {
            respond_error(fd, 404, "no route for " + req.method + " " + path);
        }
    }
    ::shutdown(fd, SHUT_WR);
    ::close(fd);
    --g_connections;
}

bool parse_ll(const char* s, long long lo, long long hi, long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (*end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    Config cfg;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "--exact") { cfg.exact = true; continue; }
        if (k == "-h" || k == "--help") {
            std::puts("usage: moe-server [-m FILE] [--host 127.0.0.1] [--port 8080] [--parallel 4] [-c 4096] [-t N]\n"
                      "                  [--max-body 1048576] [--max-tokens 1024] [--max-connections 64] [--exact]\n"
                      "  --exact: prompts on row kernels only, so a reused cached prefix gives the same bits as a fresh one\n"
                      "  POST /v1/chat/completions (OpenAI format, \"stream\": true for server-sent events), GET /v1/models, GET /health");
            return 0;
        }
        const char* v = i + 1 < argc ? argv[++i] : nullptr;
        if (!v) { std::fprintf(stderr, "error: %s needs a value (see --help)\n", k.c_str()); return 1; }
        bool ok = true;
        if (k == "-m") cfg.model = v;
        else if (k == "--host") cfg.host = v;
        else if (k == "--port") ok = parse_ll(v, 0, 65535, &cfg.port);
        else if (k == "--parallel") ok = parse_ll(v, 1, 256, &cfg.parallel);
        else if (k == "-c") ok = parse_ll(v, 16, moe::kMaxContextLength, &cfg.n_ctx);
        else if (k == "-t") ok = parse_ll(v, 1, 512, &cfg.threads);
        else if (k == "--max-body") ok = parse_ll(v, 1024, 1ll << 30, &cfg.max_body);
        else if (k == "--max-tokens") ok = parse_ll(v, 1, 1 << 20, &cfg.max_tokens);
        else if (k == "--max-connections") ok = parse_ll(v, 1, 100000, &cfg.max_connections);
        else { std::fprintf(stderr, "error: unknown option %s (see --help)\n", k.c_str()); return 1; }
        if (!ok) { std::fprintf(stderr, "error: bad value '%s' for %s\n", v, k.c_str()); return 1; }
    }
    moe::Model model;
    if (moe::Model::load(cfg.model.c_str(), moe::LoadOptions{}, &model) != moe::Status::ok) {
        std::fprintf(stderr, "error: %s\n", moe::last_error());
        return 1;
    }
    Scheduler sched(model, cfg);
    if (sched.start() != moe::Status::ok) {
        std::fprintf(stderr, "error: %s\n", moe::last_error());
        return 1;
    }
    const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)cfg.port);
    if (inet_pton(AF_INET, cfg.host.c_str(), &addr.sin_addr) != 1) { std::fprintf(stderr, "error: --host %s is not an IPv4 address\n", cfg.host.c_str()); return 1; }
    if (listener < 0 || ::bind(listener, (sockaddr*)&addr, sizeof addr) != 0 || ::listen(listener, 128) != 0) {
        std::fprintf(stderr, "error: cannot listen on %s:%lld: %s\n", cfg.host.c_str(), cfg.port, std::strerror(errno));
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(listener, (sockaddr*)&addr, &len);
    std::printf("moe-server: listening on http://%s:%d (%lld parallel sequences)\n", cfg.host.c_str(), ntohs(addr.sin_port), cfg.parallel);
    std::fflush(stdout);
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        const int fd = ::accept(listener, nullptr, nullptr);
        if (fd < 0) {  // out of descriptors or a connection error passed on: wait a little, go on serving
            if (errno != EINTR) std::this_thread::sleep_for(std::chrono::milliseconds(10));
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (g_connections.load() >= cfg.max_connections) {
            respond_error(fd, 503, "too many connections (--max-connections " + std::to_string(cfg.max_connections) + ")");
            ::close(fd);
            continue;
        }
        ++g_connections;
        std::thread(handle, fd, std::cref(model), std::cref(cfg), std::ref(sched)).detach();
    }
}

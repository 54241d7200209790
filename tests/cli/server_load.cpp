// Bounded load test of examples/moe-server on loopback: C clients send R chat requests each at
// once (streamed and not, greedy), and every reply is checked: HTTP status, JSON shape, usage, the
// SSE framing, and - since greedy decoding in a batch is bit-identical to decoding alone - each
// prompt's text equals the text the same prompt got when it ran alone first. Then the error paths:
// bad JSON, bad fields, unknown route, wrong method, an oversized body, a client that vanishes
// mid-stream (the server must keep serving).
//
//   server_load PORT [CLIENTS] [REQUESTS]     (the server must already listen on 127.0.0.1:PORT)
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using moe::detail::TplKind;
using moe::detail::TplValue;

int g_port = 0;
std::atomic<int> g_failures{0};
std::mutex g_print;

void fail(const std::string& what) {
    std::lock_guard<std::mutex> lock(g_print);
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++g_failures;
}

int connect_loopback() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)g_port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || ::connect(fd, (sockaddr*)&addr, sizeof addr) != 0) {
        if (fd >= 0) ::close(fd);
        return -1;
    }
    return fd;
}

// Sends a raw request and reads the whole reply (the server closes after each); returns the
// status code (0: no reply), with the body in *body.
int exchange(const std::string& raw, std::string* body) {
    const int fd = connect_loopback();
    if (fd < 0) return 0;
    size_t off = 0;
    while (off < raw.size()) {
        const ssize_t n = ::send(fd, raw.data() + off, raw.size() - off, MSG_NOSIGNAL);
        if (n <= 0) break;  // the server may answer (413) before reading everything
        off += (size_t)n;
    }
    std::string reply;
    char buf[8192];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) reply.append(buf, (size_t)n);
    ::close(fd);
    const size_t head_end = reply.find("\r\n\r\n");
    if (reply.compare(0, 9, "HTTP/1.1 ") != 0 || head_end == std::string::npos) return 0;
    *body = reply.substr(head_end + 4);
    return std::atoi(reply.c_str() + 9);
}

std::string post(const std::string& path, const std::string& json) {
    return "POST " + path + " HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(json.size()) +
           "\r\n\r\n" + json;
}

const TplValue* at(const TplValue& v, const char* key) { return v.kind == TplKind::dict ? v.dict->find(key) : nullptr; }

std::string request_json(int prompt, bool stream, int max_tokens) {
    static const char* kPrompts[] = {"In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek",
                                     "And it came to pass", "Hear, O Israel"};
    return std::string("{\"messages\": [{\"role\": \"system\", \"content\": \"Answer in the words of the scripture.\"}, ") +
           "{\"role\": \"user\", \"content\": \"" + kPrompts[prompt % 6] + "\"}], \"max_tokens\": " + std::to_string(max_tokens) +
           ", \"temperature\": 0, \"stream\": " + (stream ? "true" : "false") + "}";
}

// One chat completion; returns the generated text ("" and a failure on any malformed reply).
std::string chat(int prompt, bool stream, int max_tokens, const std::string& who) {
    std::string body;
    const int code = exchange(post("/v1/chat/completions", request_json(prompt, stream, max_tokens)), &body);
    if (code != 200) { fail(who + ": status " + std::to_string(code) + " " + body.substr(0, 200)); return ""; }
    std::string text, error;
    if (!stream) {
        TplValue v;
        if (!moe::detail::parse_json(body, &v, &error)) { fail(who + ": reply is not JSON: " + error); return ""; }
        const TplValue* choices = at(v, "choices");
        const TplValue* usage = at(v, "usage");
        if (!choices || choices->kind != TplKind::list || choices->list->items.size() != 1) { fail(who + ": no choices"); return ""; }
        const TplValue* content = at(*at(choices->list->items[0], "message"), "content");
        const TplValue* reason = at(choices->list->items[0], "finish_reason");
        const TplValue* completion = usage ? at(*usage, "completion_tokens") : nullptr;
        if (!content || content->kind != TplKind::string) { fail(who + ": no message content"); return ""; }
        if (!reason || reason->kind != TplKind::string || (reason->text != "stop" && reason->text != "length")) fail(who + ": bad finish_reason");
        if (!completion || completion->kind != TplKind::integer || completion->integer < 1 || completion->integer > max_tokens)
            fail(who + ": usage.completion_tokens not in [1, max_tokens]");
        return content->text;
    }
    // Server-sent events: "data: {json}\n\n" chunks, the first with the role, a last one with the
    // finish reason, then "data: [DONE]".
    bool done = false, saw_role = false, saw_finish = false;
    size_t pos = 0;
    while (pos < body.size()) {
        const size_t end = body.find("\n\n", pos);
        if (end == std::string::npos) { fail(who + ": unterminated event"); return ""; }
        const std::string event = body.substr(pos, end - pos);
        pos = end + 2;
        if (event.compare(0, 6, "data: ") != 0) { fail(who + ": event without data: " + event.substr(0, 80)); return ""; }
        if (done) { fail(who + ": data after [DONE]"); return ""; }
        if (event == "data: [DONE]") { done = true; continue; }
        TplValue v;
        if (!moe::detail::parse_json(event.substr(6), &v, &error)) { fail(who + ": event is not JSON: " + error); return ""; }
        const TplValue* choices = at(v, "choices");
        if (!choices || choices->kind != TplKind::list || choices->list->items.empty()) { fail(who + ": event without choices"); return ""; }
        const TplValue* delta = at(choices->list->items[0], "delta");
        const TplValue* reason = at(choices->list->items[0], "finish_reason");
        if (!delta) { fail(who + ": event without delta"); return ""; }
        if (at(*delta, "role")) saw_role = true;
        if (const TplValue* c = at(*delta, "content")) text += c->text;
        if (reason && reason->kind == TplKind::string) saw_finish = true;
    }
    if (!done || !saw_role || !saw_finish) fail(who + ": stream lacks the role chunk, the finish chunk or [DONE]");
    return text;
}

void expect_error(const std::string& raw, int want, const std::string& what) {
    std::string body, error;
    const int code = exchange(raw, &body);
    TplValue v;
    if (code != want) { fail(what + ": status " + std::to_string(code) + ", expected " + std::to_string(want)); return; }
    if (!moe::detail::parse_json(body, &v, &error) || !at(v, "error") || !at(*at(v, "error"), "message")) fail(what + ": no JSON error body");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) { std::fprintf(stderr, "usage: server_load PORT [CLIENTS] [REQUESTS]\n"); return 2; }
    g_port = std::atoi(argv[1]);
    const int clients = argc > 2 ? std::atoi(argv[2]) : 6, requests = argc > 3 ? std::atoi(argv[3]) : 4, max_tokens = 12;
    // References: each prompt alone, not streamed.
    std::vector<std::string> alone(6);
    for (int p = 0; p < 6; ++p) alone[(size_t)p] = chat(p, false, max_tokens, "alone " + std::to_string(p));
    for (int p = 0; p < 6; ++p)
        if (alone[(size_t)p].empty()) fail("prompt " + std::to_string(p) + " produced no text alone");
    // The load: every client sends its requests back to back, all clients at once.
    std::vector<std::thread> threads;
    std::atomic<int> served{0};
    for (int c = 0; c < clients; ++c)
        threads.emplace_back([&, c] {
            for (int r = 0; r < requests; ++r) {
                const int p = (c + r) % 6;
                const bool stream = (c + r) % 2 == 1;
                const std::string who = "client " + std::to_string(c) + " request " + std::to_string(r) + (stream ? " (stream)" : "");
                const std::string text = chat(p, stream, max_tokens, who);
                if (text != alone[(size_t)p]) fail(who + ": text differs from the prompt alone: '" + text + "' vs '" + alone[(size_t)p] + "'");
                ++served;
            }
        });
    // Meanwhile, a client that asks for a long stream and hangs up after the first bytes.
    threads.emplace_back([] {
        const int fd = connect_loopback();
        if (fd < 0) { fail("vanishing client could not connect"); return; }
        const std::string raw = post("/v1/chat/completions", request_json(0, true, 200));
        (void)::send(fd, raw.data(), raw.size(), MSG_NOSIGNAL);
        char buf[64];
        (void)::recv(fd, buf, sizeof buf, 0);
        ::close(fd);
    });
    for (std::thread& t : threads) t.join();
    // Error paths, each a JSON error with the right status.
    expect_error(post("/v1/chat/completions", "{\"messages\": [}"), 400, "bad JSON");
    expect_error(post("/v1/chat/completions", "[1, 2]"), 400, "not an object");
    expect_error(post("/v1/chat/completions", "{\"messages\": []}"), 400, "no messages");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"content\": \"x\"}]}"), 400, "message without role");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": \"hot\"}"), 400, "bad temperature");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_p\": 7}"), 400, "top_p out of range");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"99999999\": 1}}"), 400, "logit_bias id");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}"), 400, "lone surrogate");
    expect_error(post("/v1/nope", "{}"), 404, "unknown route");
    expect_error("GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "wrong method");
    expect_error(post("/v1/chat/completions", std::string(3 << 20, ' ')), 413, "oversized body");
    expect_error("GARBAGE\r\n\r\n", 400, "malformed request line");
    // Constrained output: the reply is a JSON object with an integer "n" (response_format json_schema).
    {
        std::string body, error;
        const std::string req = "{\"messages\": [{\"role\": \"user\", \"content\": \"Count\"}], \"max_tokens\": 200, \"seed\": 3, "
                                "\"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"c\", \"schema\": "
                                "{\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\"}}, \"required\": [\"n\"]}}}}";
        const int code = exchange(post("/v1/chat/completions", req), &body);
        TplValue reply, doc;
        const TplValue* choices = nullptr;
        if (code != 200 || !moe::detail::parse_json(body, &reply, &error) || !(choices = at(reply, "choices")) || choices->kind != TplKind::list) {
            fail("json_schema request: status " + std::to_string(code) + " " + body.substr(0, 200));
        } else {
            const TplValue* content = at(*at(choices->list->items[0], "message"), "content");
            const TplValue* n = nullptr;
            if (!content || !moe::detail::parse_json(content->text, &doc, &error) || !(n = at(doc, "n")) || n->kind != TplKind::integer)
                fail("json_schema reply is not an object with an integer n: " + (content ? content->text : std::string("(none)")));
        }
    }
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"response_format\": "
                                               "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {\"type\": \"string\", \"pattern\": \"a\"}}}}"),
                 400, "unsupported schema keyword");
    expect_error(post("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"grammar\": \"root ::= nothing\"}"), 400,
                 "bad grammar");
    // Still serving after all that.
    if (chat(1, false, max_tokens, "after the errors") != alone[1]) fail("the server answers differently after the error paths");
    std::printf("server_load: %d concurrent requests served, %d failures\n", served.load(), g_failures.load());
    return g_failures.load() == 0 ? 0 : 1;
}

// Chat templates: every template in tests/data/chat rendered for every conversation must match
// Python jinja2's rendering byte for byte (expected/ and inputs/ are written by
// render_reference.py, never by this code); plus the JSON parser, Jinja features, and errors.
// Public API only: moe::detail is not visible in this translation unit.
#include "moe_infer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace {

const std::string kChatDir = std::string(MOE_SOURCE_DIR) + "/tests/data/chat/";
constexpr int64_t kFixedNow = 1768473000;  // 2026-01-15 10:30:00 UTC, as in render_reference.py

bool read_file(const std::string& path, std::string* out) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    out->clear();
    char buffer[65536];
    size_t n;
    while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) out->append(buffer, n);
    std::fclose(f);
    return true;
}

// Lines of a text file (no trailing empty line).
std::vector<std::string> read_lines(const std::string& path) {
    std::string text;
    std::vector<std::string> lines;
    if (!read_file(path, &text)) return lines;
    size_t start = 0;
    for (size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1) lines.push_back(text.substr(start, nl - start));
    if (start < text.size()) lines.push_back(text.substr(start));
    return lines;
}

moe::Status render(const std::string& source, const std::string& messages, moe::ChatTemplateOptions options, std::string* out) {
    options.strftime_now_time = kFixedNow;
    return moe::render_chat_template(source, messages, options, out);
}

moe::Status render_simple(const std::string& source, std::string* out, const std::string& context = std::string()) {
    moe::ChatTemplateOptions options;
    options.extra_context_json = context;
    return render(source, "[]", options, out);
}

// Compares a rendering with an expected file: text, or "ERROR..." when jinja2 raised.
void check_expected(const std::string& label, moe::Status status, const std::string& rendered, const std::string& expected) {
    if (expected.compare(0, 5, "ERROR") == 0) {
        EXPECT_NE(status, moe::Status::ok) << label << ": jinja2 raised " << expected << " but we rendered:\n" << rendered;
        if (expected.compare(0, 7, "ERROR: ") == 0) {  // raise_exception: the message must come through
            EXPECT_NE(std::string(moe::last_error()).find(expected.substr(7)), std::string::npos)
                << label << ": " << moe::last_error();
        }
        return;
    }
    ASSERT_EQ(status, moe::Status::ok) << label << ": " << moe::last_error();
    EXPECT_EQ(rendered, expected) << label;
}

void check_template(const std::string& name) {
    const std::string inputs = kChatDir + "inputs/";
    std::string source;
    ASSERT_TRUE(read_file(kChatDir + name + ".jinja", &source)) << name;
    const std::vector<std::string> cases = read_lines(inputs + "cases.txt");
    ASSERT_GE(cases.size(), 10u);
    for (const std::string& c : cases) {
        moe::ChatTemplateOptions options;
        for (const std::string& line : read_lines(inputs + c + ".options.txt")) {
            const size_t eq = line.find('=');
            const std::string key = line.substr(0, eq), value = line.substr(eq + 1);
            if (key == "add_generation_prompt") options.add_generation_prompt = value == "1";
            else if (key == "enable_thinking") options.enable_thinking = std::atoi(value.c_str());
            else if (key == "bos_token") options.bos_token = value;
            else if (key == "eos_token") options.eos_token = value;
        }
        read_file(inputs + c + ".tools.json", &options.tools_json);  // absent: stays empty
        read_file(inputs + c + ".extra.json", &options.extra_context_json);
        std::string messages, expected, rendered;
        const std::string label = name + "__" + c;
        ASSERT_TRUE(read_file(inputs + c + ".messages.json", &messages)) << label;
        ASSERT_TRUE(read_file(kChatDir + "expected/" + label + ".txt", &expected)) << label;
        check_expected(label, render(source, messages, options, &rendered), rendered, expected);
    }
}

}  // namespace

TEST(ChatTemplate, Qwen35) { check_template("qwen3.5"); }
TEST(ChatTemplate, Qwen2) { check_template("qwen2"); }
TEST(ChatTemplate, Phi3) { check_template("phi-3"); }
TEST(ChatTemplate, Qwen3) { check_template("qwen3"); }
TEST(ChatTemplate, GptOss) { check_template("gpt-oss"); }
TEST(ChatTemplate, DeepSeekV31) { check_template("deepseek-v3.1"); }
TEST(ChatTemplate, Glm45) { check_template("glm-4.5"); }
TEST(ChatTemplate, Lfm2) { check_template("lfm2"); }
TEST(ChatTemplate, Mixtral) { check_template("mixtral"); }
TEST(ChatTemplate, Olmoe) { check_template("olmoe"); }

// Hand-written feature templates (features.json); expected output from jinja2.
TEST(ChatTemplate, JinjaFeatures) {
    const std::string inputs = kChatDir + "inputs/";
    const std::vector<std::string> features = read_lines(inputs + "features.txt");
    ASSERT_GE(features.size(), 20u);
    for (const std::string& name : features) {
        std::string source, expected, rendered;
        moe::ChatTemplateOptions options;
        ASSERT_TRUE(read_file(inputs + "feature__" + name + ".jinja", &source)) << name;
        ASSERT_TRUE(read_file(inputs + "feature__" + name + ".vars.json", &options.extra_context_json)) << name;
        ASSERT_TRUE(read_file(kChatDir + "expected/feature__" + name + ".txt", &expected)) << name;
        options.bos_token = options.eos_token = "";
        check_expected("feature " + name, render(source, "[]", options, &rendered), rendered, expected);
    }
}

// JSON goes in as one message and comes back out through tojson (json.dumps formatting).
TEST(ChatTemplate, JsonParserAcceptsValid) {
    struct Case { const char* json; const char* dumped; };
    const Case cases[] = {
        {"  {\"a\": [1, -2, 3.5, 1e3, -0, true, false, null], \"b\": {}}  ", "{\"a\": [1, -2, 3.5, 1000.0, 0, true, false, null], \"b\": {}}"},
        {"\"\\u00e9\\ud83d\\ude00\\n\\/\\\"\"", "\"\xc3\xa9\xf0\x9f\x98\x80\\n/\\\"\""},
        {"{\"z\":1,\"a\":2,\"z\":3}", "{\"z\": 3, \"a\": 2}"},  // a repeated key: first position, last value
        {"9223372036854775807", "9223372036854775807"},
        {"-9223372036854775808", "-9223372036854775808"},
        {"92233720368547758070", "9.223372036854776e+19"},  // beyond int64: a float
        {"1.5E-7", "1.5e-07"},
        {"[]", "[]"},
        {"\"\xe6\x97\xa5\xe6\x9c\xac\"", "\"\xe6\x97\xa5\xe6\x9c\xac\""},
        {"\"\\u0000\\u001f\\u007f\"", "\"\\u0000\\u001f\x7f\""},
    };
    for (const Case& c : cases) {
        std::string out;
        moe::ChatTemplateOptions options;
        ASSERT_EQ(render("{{ messages[0] | tojson }}", std::string("[") + c.json + "]", options, &out), moe::Status::ok)
            << c.json << ": " << moe::last_error();
        EXPECT_EQ(out, c.dumped) << c.json;
    }
    std::string nested, out;
    for (int i = 0; i < 500; ++i) nested += "[";
    for (int i = 0; i < 500; ++i) nested += "]";
    EXPECT_EQ(render("{{ messages | length }}", "[" + nested + "]", moe::ChatTemplateOptions(), &out), moe::Status::ok)
        << moe::last_error();
}

TEST(ChatTemplate, JsonParserRejectsInvalid) {
    std::string deep;
    for (int i = 0; i < 100000; ++i) deep += "[";
    const std::string cases[] = {
        "", "   ", "[1, 2", "{\"a\": 1", "{\"a\" 1}", "{a: 1}", "[1,]", "{\"a\":1,}", "01", "1.", ".5", "-", "1e", "+1",
        "\"abc", "\"\\x41\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"a\tb\"",
        "\"\xff\"", "\"\xc3\"", "\"\xed\xa0\x80\"", "tru", "nul", "[1] x", "{} {}", "1e400", "-1e400", "NaN", "[Infinity]",
        "'single'", deep, std::string("\"a\0b\"", 5)};
    for (const std::string& json : cases) {
        std::string out;
        moe::ChatTemplateOptions options;
        options.extra_context_json = "{\"x\": " + json + "}";
        EXPECT_EQ(render("x", "[]", options, &out), moe::Status::invalid_argument) << json.substr(0, 40);
        EXPECT_NE(std::string(moe::last_error()).find("byte offset"), std::string::npos) << moe::last_error();
        EXPECT_EQ(render("x", json, moe::ChatTemplateOptions(), &out), moe::Status::invalid_argument) << json.substr(0, 40);
    }
    std::string out;
    moe::ChatTemplateOptions options;
    EXPECT_EQ(render("x", "[{\"role\": \"user\",}]", options, &out), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("offset 17"), std::string::npos) << moe::last_error();
    EXPECT_EQ(render("x", "{\"role\": \"user\"}", options, &out), moe::Status::invalid_argument);  // not an array
    options.tools_json = "[{";
    EXPECT_EQ(render("x", "[]", options, &out), moe::Status::invalid_argument);
    options.tools_json.clear();
    options.extra_context_json = "[1]";
    EXPECT_EQ(render("x", "[]", options, &out), moe::Status::invalid_argument);
}

TEST(ChatTemplate, ErrorsNameTheConstructAndLine) {
    std::string out;
    EXPECT_EQ(render_simple("line1\n{{ 'x' | wordwrap(3) }}", &out), moe::Status::unsupported);
    EXPECT_NE(std::string(moe::last_error()).find("filter 'wordwrap'"), std::string::npos) << moe::last_error();
    EXPECT_NE(std::string(moe::last_error()).find("line 2"), std::string::npos) << moe::last_error();

    EXPECT_EQ(render_simple("{% if 1 is prime %}{% endif %}", &out), moe::Status::unsupported);
    EXPECT_NE(std::string(moe::last_error()).find("test 'prime'"), std::string::npos) << moe::last_error();

    EXPECT_EQ(render_simple("a\nb\n{% include 'other.jinja' %}", &out), moe::Status::unsupported);
    EXPECT_NE(std::string(moe::last_error()).find("statement 'include'"), std::string::npos) << moe::last_error();
    EXPECT_NE(std::string(moe::last_error()).find("line 3"), std::string::npos) << moe::last_error();

    EXPECT_EQ(render_simple("{{ 'abc'.zfill(5) }}", &out), moe::Status::unsupported);
    EXPECT_NE(std::string(moe::last_error()).find("method 'zfill'"), std::string::npos) << moe::last_error();

    EXPECT_EQ(render_simple("{{ raise_exception('Roles must alternate!') }}", &out), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("Roles must alternate!"), std::string::npos) << moe::last_error();

    const char* const syntax_errors[] = {"{% if x %}never closed", "{{ 1 + }}", "{% for %}{% endfor %}", "{{ x", "{% endif %}",
                                         "{# open comment", "{{ 'unterminated }}", "{% set %}", "{{ x | }}", "{{ (1, 2 }}",
                                         "{% break %}", "{% macro m( %}{% endmacro %}"};
    for (const char* t : syntax_errors) {
        EXPECT_EQ(render_simple(t, &out), moe::Status::invalid_argument) << t;
        EXPECT_NE(std::string(moe::last_error()).find("line "), std::string::npos) << t << ": " << moe::last_error();
    }
    EXPECT_EQ(render_simple("ok\n\n{% for x in y %}\n{{ x + }}\n{% endfor %}", &out), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("line 4"), std::string::npos) << moe::last_error();

    const char* const runtime_errors[] = {"{{ nope.attr }}", "{{ 1 + 'a' }}", "{{ 1 / 0 }}", "{{ 5 // 0 }}", "{{ nope() }}",
                                          "{{ {'a': 1} | tojson if nope.x }}", "{{ 1 < 'a' }}", "{% for x in 5 %}{% endfor %}",
                                          "{% set a, b = [1] %}", "{{ 'a' | items }}", "{{ range(10000000) }}",
                                          "{% set x = 1 %}{% set x.y = 2 %}", "{{ 1 in 2 }}"};
    for (const char* t : runtime_errors) {
        EXPECT_EQ(render_simple(t, &out), moe::Status::invalid_argument) << t;
        EXPECT_NE(std::string(moe::last_error()).find("line 1"), std::string::npos) << t << ": " << moe::last_error();
    }
    EXPECT_EQ(render_simple("\xff{{ 1 }}", &out), moe::Status::invalid_argument);  // not UTF-8
}

TEST(ChatTemplate, HostileTemplatesHitLimits) {
    std::string out;
    // Unbounded macro recursion.
    EXPECT_EQ(render_simple("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", &out), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("nested too deeply"), std::string::npos) << moe::last_error();
    // Output growth by doubling a string in a namespace.
    EXPECT_EQ(render_simple("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                            "{{ ns.s | length }}",
                            &out),
              moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("64 MiB"), std::string::npos) << moe::last_error();
    EXPECT_EQ(render_simple("{{ 'ab' * 100000000000 }}", &out), moe::Status::invalid_argument);
    // Too many loop iterations.
    EXPECT_EQ(render_simple("{% for a in range(1000000) %}{% for b in range(1000000) %}{% endfor %}{% endfor %}", &out),
              moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("too many"), std::string::npos) << moe::last_error();
    // Deep nesting in the source.
    std::string deep = "{{ ";
    for (int i = 0; i < 5000; ++i) deep += "(";
    deep += "1";
    for (int i = 0; i < 5000; ++i) deep += ")";
    EXPECT_EQ(render_simple(deep + " }}", &out), moe::Status::invalid_argument);
    std::string chain = "{{ 1";
    for (int i = 0; i < 5000; ++i) chain += " + 1";
    EXPECT_EQ(render_simple(chain + " }}", &out), moe::Status::invalid_argument);
    std::string blocks;
    for (int i = 0; i < 5000; ++i) blocks += "{% if true %}";
    EXPECT_EQ(render_simple(blocks, &out), moe::Status::invalid_argument);
    // Values nested ever deeper through a namespace; a namespace stored in itself.
    EXPECT_EQ(render_simple("{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}", &out),
              moe::Status::invalid_argument);
    EXPECT_EQ(render_simple("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", &out), moe::Status::unsupported);
    EXPECT_EQ(render_simple("{% macro m() %}{% endmacro %}{% set ns = namespace() %}{% set ns.m = [m] %}", &out),
              moe::Status::unsupported);
}

TEST(ChatTemplate, OptionsBecomeVariables) {
    std::string out;
    moe::ChatTemplateOptions options;
    const std::string probe = "{{ add_generation_prompt }}|{{ enable_thinking is defined }}|{{ tools is defined }}|{{ bos_token }}"
                              "{{ eos_token }}|{{ reasoning_effort | default('none') }}";
    ASSERT_EQ(render(probe, "[]", options, &out), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(out, "True|False|False||none");
    options.add_generation_prompt = false;
    options.enable_thinking = 0;
    options.tools_json = "[]";
    options.bos_token = "<s>";
    options.eos_token = "</s>";
    options.extra_context_json = "{\"reasoning_effort\": \"low\"}";
    ASSERT_EQ(render(probe + "{{ enable_thinking }}", "[]", options, &out), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(out, "False|True|True|<s></s>|lowFalse");
}

TEST(ChatTemplate, HundredMessagesRenderQuickly) {
    std::string source, messages = "[";
    ASSERT_TRUE(read_file(kChatDir + "qwen3.5.jinja", &source));
    for (int i = 0; i < 100; ++i) {
        if (i) messages += ",";
        messages += i % 2 == 0 ? "{\"role\": \"user\", \"content\": \"question " + std::to_string(i) + "\"}"
                               : "{\"role\": \"assistant\", \"content\": \"answer " + std::to_string(i) + "\"}";
    }
    messages += "]";
    moe::ChatTemplateOptions options;
    std::string out;
    const auto start = std::chrono::steady_clock::now();
    ASSERT_EQ(render(source, messages, options, &out), moe::Status::ok) << moe::last_error();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_NE(out.find("answer 99"), std::string::npos);
    EXPECT_LT(seconds, 1.0);  // milliseconds in practice; generous for sanitizer builds
}

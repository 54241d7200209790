# Writes conversations.json: the chat cases every template is rendered for.
import json
import os
B, E = "<s>", "</s>"
weather_tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "Forecast days"}},
        "required": ["city"]}}}
time_tool = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}, "verbose": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": []}}}
def case(name, messages, agp=True, **kw):
    c = {"name": name, "messages": messages, "add_generation_prompt": agp, "bos_token": B, "eos_token": E}
    c.update(kw)
    return c
u = lambda t: {"role": "user", "content": t}
a = lambda t: {"role": "assistant", "content": t}
s = lambda t: {"role": "system", "content": t}
cases = [
    case("basic", [u("Hello!"), a("Hi there. How can I help?"), u("What is 2+2?")]),
    case("system", [s("You are a terse assistant."), u("Name a prime number.")]),
    case("ends_assistant", [s("Be brief."), u("Say hi."), a("Hi.")], agp=False),
    case("tools", [s("You can call tools."), u("Weather in Paris?"),
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "extra": {"a": [1, 2.5, True, None]}}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        a("It is 21 degrees and clear in Paris."), u("Thanks!")], tools=[weather_tool, time_tool]),
    case("tools_string_args", [u("Time in Tokyo and Paris?"),
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"Asia/Tokyo\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"Europe/Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "09:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "02:00"}], tools=[time_tool]),
    case("thinking_on", [u("Is 17 prime?"), {"role": "assistant", "content": "Yes, 17 is prime.",
        "reasoning_content": "Check divisors up to 4: 2, 3 do not divide 17."}, u("And 21?")], enable_thinking=True),
    case("thinking_off", [u("Quick: capital of France?")], enable_thinking=False),
    case("thinking_in_content", [u("Think then answer: 3*3?"),
        a("<think>\n3 times 3 is 9.\n</think>\n\nIt is 9.")], agp=False, enable_thinking=True),
    case("reasoning_last_turn", [u("Pick a colour."), {"role": "assistant", "content": "Blue.",
        "reasoning_content": "Any colour works; blue is common."}], agp=False),
    case("unicode", [s("Réponds en français 🇫🇷."), u("Ça va? 你好 👋 Привет"), a("Très bien ✨ — merci!"), u("日本語もOK？ 🎌")]),
    case("special_chars", [u("Quotes \" and ' and backslash \\ and {{ braces }} {% tags %} {# c #}\nnew\tline\r\n"),
        a("Sure: \"\\n\" is a newline; </s> <|im_end|>"), u("ok")]),
    case("empty_content", [u(""), a(""), u("still there?")]),
    case("many_turns", [m for i in range(12) for m in (u("question %d" % i), a("answer %d" % i))] + [u("last")]),
    case("gpt_oss_thinking", [s("Developer rules here."), u("Hi"),
        {"role": "assistant", "content": "Hello!", "thinking": "User greets; greet back."}], agp=False,
        extra={"reasoning_effort": "high"}),
    case("lone_user_no_gen", [u("just this")], agp=False),
    case("content_parts", [{"role": "system", "content": [{"type": "text", "text": "Sys part."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]}]),
    case("null_content_tool_call", [u("Weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "cold"}], tools=[weather_tool]),
]
json.dump(cases, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conversations.json"), "w", encoding="utf-8"), ensure_ascii=False, indent=1)

#!/usr/bin/env python3
"""check_vocab.py LLAMA_PEER VOCAB.gguf: llama_peer must reproduce llama.cpp's own tokenizer test
expectations (VOCAB.gguf.inp / VOCAB.gguf.out, cases split by "\\n__ggml_vocab_test__\\n";
add_special=false, parse_special=false as in llama.cpp's tests/test-tokenizer-0.cpp)."""
import subprocess
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: check_vocab.py LLAMA_PEER VOCAB.gguf")
    peer, vocab = sys.argv[1], sys.argv[2]
    with open(vocab + ".out", encoding="utf-8") as f:
        want = [",".join(line.split()) for line in f.read().split("\n")]
    if want and want[-1] == "":
        want.pop()  # trailing newline of the file
    res = subprocess.run([peer, "-m", vocab, "--tokenize-cases", vocab + ".inp", "--no-parse-special"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if res.returncode != 0:
        sys.exit("llama_peer failed: " + res.stderr.decode(errors="replace").strip())
    got = res.stdout.decode().split("\n")
    if got and got[-1] == "":
        got.pop()
    bad = 0
    if len(got) != len(want):
        print(f"case count differs: llama_peer {len(got)}, .out {len(want)}")
        bad += 1
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            bad += 1
            print(f"case {i}: llama_peer [{g}] != expected [{w}]")
    print(f"{vocab}: {len(want)} cases, {bad} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

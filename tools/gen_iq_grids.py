#!/usr/bin/env python3
"""gen_iq_grids.py: prints the IQ grid tables of the QUANT FORMATS section of moe_infer.h from ggml's
ggml-common.h (MIT, the ggml authors), as compact level codes.

    python3 tools/gen_iq_grids.py build/_peer/llama.cpp/ggml/src/ggml-common.h > /tmp/grids.inc

The grids are part of the IQ formats: each entry is a group of 8 (IQ2_*, IQ1_*) or 4 (IQ3_*) small
values. ggml stores them as uint64/uint32 with one byte per value; every value is one of a few
levels, so an entry fits 16 bits as level indices (2 bits per value for IQ2/IQ1, 3 bits for IQ3;
value j in bits [b*j, b*j+b)). moe_infer.h expands the codes back at compile time (constexpr) and
the GgmlBlocks test proves the result on blocks written by ggml's own quantizers.
"""
import re
import sys

GRIDS = [  # name in ggml, name here, entry width in bytes, levels (byte values, signed for iq1s)
    ("iq2xxs_grid", "kIq2xxsGridCodes", 8, [0x08, 0x19, 0x2b]),
    ("iq2xs_grid", "kIq2xsGridCodes", 8, [0x08, 0x19, 0x2b]),
    ("iq2s_grid", "kIq2sGridCodes", 8, [0x08, 0x19, 0x2b]),
    ("iq3xxs_grid", "kIq3xxsGridCodes", 4, [4, 12, 20, 28, 36, 44, 52, 62]),
    ("iq3s_grid", "kIq3sGridCodes", 4, [1, 3, 5, 7, 9, 11, 13, 15]),
    ("iq1s_grid", "kIq1sGridCodes", 8, [0xff, 0x00, 0x01]),  # -1, 0, 1
]


def main():
    text = open(sys.argv[1]).read()
    for gname, name, width, levels in GRIDS:
        m = re.search(r"GGML_TABLE_BEGIN\(\w+, " + gname + r", \w+\)(.*?)GGML_TABLE_END", text, re.S)
        if not m:
            sys.exit("no table " + gname)
        entries = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", m.group(1))]
        bits = 2 if len(levels) <= 4 else 3
        codes = []
        for e in entries:
            code = 0
            for j in range(width):
                b = (e >> (8 * j)) & 0xff
                if b not in levels:
                    sys.exit("%s: value %#x not a level" % (gname, b))
                code |= levels.index(b) << (bits * j)
            codes.append(code)
        print("// %s: %d entries (ggml's %s), %d-bit level indices" % (name, len(codes), gname, bits))
        print("constexpr uint16_t %s[%d] = {" % (name, len(codes)))
        for i in range(0, len(codes), 16):
            print("    " + ", ".join("%#06x" % c for c in codes[i:i + 16]) + ",")
        print("};")


if __name__ == "__main__":
    main()

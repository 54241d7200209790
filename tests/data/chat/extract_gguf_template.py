#!/usr/bin/env python3
"""Extract tokenizer.chat_template from a GGUF file (minimal reader, metadata only)."""
import struct, sys

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

def read_string(f):
    (n,) = struct.unpack('<Q', f.read(8))
    return f.read(n)

def skip_value(f, vtype):
    if vtype == 8:
        read_string(f)
    elif vtype == 9:
        etype, count = struct.unpack('<IQ', f.read(12))
        for _ in range(count):
            skip_value(f, etype)
    else:
        f.read(SCALAR_SIZES[vtype])

def chat_template(path):
    with open(path, 'rb') as f:
        assert f.read(4) == b'GGUF'
        version, n_tensors, n_kv = struct.unpack('<Iqq', f.read(20))
        for _ in range(n_kv):
            key = read_string(f).decode()
            (vtype,) = struct.unpack('<I', f.read(4))
            if key == 'tokenizer.chat_template' and vtype == 8:
                return read_string(f).decode('utf-8')
            skip_value(f, vtype)
    return None

if __name__ == '__main__':
    # usage: extract_gguf_template.py FILE.gguf OUT.jinja
    text = chat_template(sys.argv[1])
    if text is None:
        sys.exit('no tokenizer.chat_template in ' + sys.argv[1])
    with open(sys.argv[2], 'w', encoding='utf-8', newline='') as out:
        out.write(text)

#!/usr/bin/env python3
"""Minimal GGUF v3 writer/reader and the ggml Q8_0 format, numpy only.

Written from the format description in the project's shared docs (formats.md 1.1-1.3, 2.2);
no code from other projects.

    python3 gguf_io.py FILE.gguf          # print metadata and the tensor table
    python3 gguf_io.py --selftest         # round-trip test of writer/reader/Q8_0

Layout reminders
  * everything little-endian; strings are u64 length + UTF-8 bytes
  * tensor dims are stored in ggml order (ne0 = contiguous dim) = reversed numpy shape
  * tensor data offsets are relative to the data section, each the sum of the previous tensors'
    sizes padded to `general.alignment` (32 here), in tensor-info order
  * Q8_0 block (34 bytes): fp16 d, then 32 int8 q; value = fp16(d) * q
"""
import struct
import sys

import numpy as np

# gguf value types (formats.md 1.2)
GGUF_UINT8, GGUF_INT8, GGUF_UINT16, GGUF_INT16, GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32, \
    GGUF_BOOL, GGUF_STRING, GGUF_ARRAY, GGUF_UINT64, GGUF_INT64, GGUF_FLOAT64 = range(13)

_SCALAR_FMT = {
    GGUF_UINT8: "<B", GGUF_INT8: "<b", GGUF_UINT16: "<H", GGUF_INT16: "<h",
    GGUF_UINT32: "<I", GGUF_INT32: "<i", GGUF_FLOAT32: "<f", GGUF_BOOL: "<?",
    GGUF_UINT64: "<Q", GGUF_INT64: "<q", GGUF_FLOAT64: "<d",
}

# ggml tensor types used here (formats.md 1.3)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
GGML_TYPE_NAME = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q8_0: "Q8_0"}
# (block elements, bytes per block)
GGML_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q8_0: (32, 34)}

QK8_0 = 32
Q8_0_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])
assert Q8_0_DTYPE.itemsize == 34


# ----------------------------------------------------------------------------------------------
# Q8_0
def q8_0_quantize(x):
    """x: float array whose last dim is a multiple of 32 (blocks run along the last = contiguous
    dim). Returns a structured array of Q8_0 blocks, shape x.shape[:-1] + (n/32,).
    Same arithmetic as ggml's reference quantizer: d = amax/127 (f32), id = 1/d, q = roundf(x*id)
    (ties away from zero), d stored as fp16 (round-to-nearest-even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.shape[-1] % QK8_0 == 0, x.shape
    blocks = x.reshape(-1, QK8_0)
    amax = np.max(np.abs(blocks), axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = (blocks * inv[:, None]).astype(np.float32).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)          # roundf
    q = np.clip(q, -128, 127).astype(np.int8)
    out = np.empty(blocks.shape[0], dtype=Q8_0_DTYPE)
    out["d"] = d.astype(np.float16)
    out["qs"] = q
    return out.reshape(x.shape[:-1] + (x.shape[-1] // QK8_0,))


def q8_0_dequantize(blocks, shape=None):
    """Inverse: float32 array of shape blocks.shape[:-1] + (nblocks*32,) (or `shape`)."""
    b = blocks.reshape(-1)
    y = b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)
    y = y.reshape(blocks.shape[:-1] + (blocks.shape[-1] * QK8_0,))
    return y.reshape(shape) if shape is not None else y


def q8_0_roundtrip(x):
    """Quantize then dequantize (float32, same shape)."""
    x = np.asarray(x, dtype=np.float32)
    return q8_0_dequantize(q8_0_quantize(x)).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# writer
def _pad(n, a):
    return (n + a - 1) // a * a


def _enc_string(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _enc_value(vtype, value):
    if vtype == GGUF_STRING:
        return _enc_string(value)
    if vtype == GGUF_ARRAY:
        etype, items = value
        if etype == GGUF_ARRAY:
            raise ValueError("nested arrays are not allowed in GGUF")
        head = struct.pack("<IQ", etype, len(items))
        if etype == GGUF_STRING:
            return head + b"".join(_enc_string(s) for s in items)
        fmt = _SCALAR_FMT[etype]
        return head + np.asarray(items, dtype=np.dtype(fmt)).tobytes()
    return struct.pack(_SCALAR_FMT[vtype], value)


class GGUFWriter:
    def __init__(self, alignment=32):
        assert alignment > 0 and alignment & (alignment - 1) == 0
        self.alignment = alignment
        self.kv = []        # (key, type, value)
        self.tensors = []   # (name, ne tuple (ggml order), ggml type, payload bytes)

    # metadata
    def add(self, key, vtype, value):
        if any(k == key for k, _, _ in self.kv):
            raise ValueError("duplicate key " + key)
        self.kv.append((key, vtype, value))

    def add_u32(self, key, v): self.add(key, GGUF_UINT32, int(v))
    def add_i32(self, key, v): self.add(key, GGUF_INT32, int(v))
    def add_f32(self, key, v): self.add(key, GGUF_FLOAT32, float(v))
    def add_bool(self, key, v): self.add(key, GGUF_BOOL, bool(v))
    def add_str(self, key, v): self.add(key, GGUF_STRING, v)
    def add_array(self, key, etype, items): self.add(key, GGUF_ARRAY, (etype, list(items)))

    # tensors
    def add_tensor(self, name, array, ggml_type):
        """array: numpy array in numpy/PyTorch order ([..., out, in]); stored with reversed dims."""
        if any(t[0] == name for t in self.tensors):
            raise ValueError("duplicate tensor " + name)
        if len(name.encode()) > 63:
            raise ValueError("tensor name too long: " + name)
        a = np.asarray(array)
        ne = tuple(int(s) for s in reversed(a.shape))
        if ggml_type == GGML_F32:
            payload = np.ascontiguousarray(a, dtype="<f4").tobytes()
        elif ggml_type == GGML_F16:
            payload = np.ascontiguousarray(a, dtype="<f2").tobytes()
        elif ggml_type == GGML_Q8_0:
            payload = q8_0_quantize(a).tobytes()
        else:
            raise ValueError("unsupported type %d" % ggml_type)
        assert len(payload) == tensor_nbytes(ne, ggml_type)
        self.tensors.append((name, ne, ggml_type, payload))

    def write(self, path):
        out = bytearray()
        out += b"GGUF" + struct.pack("<I", 3)
        out += struct.pack("<QQ", len(self.tensors), len(self.kv))
        for key, vtype, value in self.kv:
            out += _enc_string(key) + struct.pack("<I", vtype) + _enc_value(vtype, value)
        offset = 0
        for name, ne, gtype, payload in self.tensors:
            out += _enc_string(name) + struct.pack("<I", len(ne))
            out += struct.pack("<%dq" % len(ne), *ne)
            out += struct.pack("<IQ", gtype, offset)
            offset += _pad(len(payload), self.alignment)
        if self.tensors:
            out += b"\0" * (_pad(len(out), self.alignment) - len(out))
        for name, ne, gtype, payload in self.tensors:
            out += payload
            out += b"\0" * (_pad(len(payload), self.alignment) - len(payload))
        with open(path, "wb") as f:
            f.write(out)
        return len(out)


def tensor_nbytes(ne, ggml_type):
    blk, bsz = GGML_BLOCK[ggml_type]
    assert ne[0] % blk == 0
    n = (ne[0] // blk) * bsz
    for d in ne[1:]:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# reader (strict: checks the things llama.cpp checks)
class GGUFReader:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.pos = 0
        buf = self.buf
        if buf[:4] != b"GGUF":
            raise ValueError("bad magic")
        self.pos = 4
        self.version = self._u("<I")
        if self.version != 3:
            raise ValueError("unsupported version %d" % self.version)
        n_tensors = self._u("<Q")
        n_kv = self._u("<Q")
        self.kv = {}
        self.kv_types = {}
        for _ in range(n_kv):
            key = self._str()
            if key in self.kv:
                raise ValueError("duplicate key " + key)
            vtype = self._u("<I")
            self.kv_types[key] = vtype
            self.kv[key] = self._value(vtype)
        self.alignment = self.kv.get("general.alignment", 32)
        self.tensors = {}
        self.tensor_order = []
        expect = 0
        for _ in range(n_tensors):
            name = self._str()
            nd = self._u("<I")
            if not 1 <= nd <= 4:
                raise ValueError("bad n_dims for " + name)
            ne = tuple(self._u("<q") for _ in range(nd))
            gtype = self._u("<I")
            off = self._u("<Q")
            if name in self.tensors:
                raise ValueError("duplicate tensor " + name)
            if off != expect:
                raise ValueError("tensor %s offset %d, expected %d" % (name, off, expect))
            nb = tensor_nbytes(ne, gtype)
            expect += _pad(nb, self.alignment)
            self.tensors[name] = (ne, gtype, off, nb)
            self.tensor_order.append(name)
        self.data_offset = _pad(self.pos, self.alignment)
        for name in self.tensor_order:
            ne, gtype, off, nb = self.tensors[name]
            if self.data_offset + off + nb > len(buf):
                raise ValueError("tensor %s out of bounds" % name)

    def _u(self, fmt):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self):
        n = self._u("<Q")
        s = self.buf[self.pos:self.pos + n]
        if len(s) != n:
            raise ValueError("truncated string")
        self.pos += n
        return s.decode("utf-8")

    def _value(self, vtype):
        if vtype == GGUF_STRING:
            return self._str()
        if vtype == GGUF_ARRAY:
            etype = self._u("<I")
            n = self._u("<Q")
            if etype == GGUF_STRING:
                return [self._str() for _ in range(n)]
            if etype == GGUF_ARRAY:
                raise ValueError("nested array")
            dt = np.dtype(_SCALAR_FMT[etype])
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return a.tolist()
        return self._u(_SCALAR_FMT[vtype])

    def raw(self, name):
        ne, gtype, off, nb = self.tensors[name]
        s = self.data_offset + off
        return self.buf[s:s + nb]

    def tensor(self, name):
        """Dequantized float32 numpy array in numpy order (reversed ne)."""
        ne, gtype, off, nb = self.tensors[name]
        shape = tuple(reversed(ne))
        raw = self.raw(name)
        if gtype == GGML_F32:
            return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        if gtype == GGML_F16:
            return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
        if gtype == GGML_Q8_0:
            b = np.frombuffer(raw, dtype=Q8_0_DTYPE)
            return q8_0_dequantize(b.reshape(-1, ne[0] // QK8_0)).reshape(shape)
        raise ValueError("unsupported type %d" % gtype)


def dump(path):
    r = GGUFReader(path)
    print("GGUF v%d, %d KV, %d tensors, alignment %d, data offset %d" %
          (r.version, len(r.kv), len(r.tensors), r.alignment, r.data_offset))
    for k, v in r.kv.items():
        if isinstance(v, list):
            print("  %-45s [%d] %s" % (k, len(v), repr(v[:6])[:-1] + ", ...]" if len(v) > 6 else repr(v)))
        else:
            print("  %-45s %r" % (k, v))
    for name in r.tensor_order:
        ne, gtype, off, nb = r.tensors[name]
        print("  %-28s %-5s ne=%-18s off=%-10d %d B" % (name, GGML_TYPE_NAME.get(gtype, gtype), list(ne), off, nb))


def _selftest():
    import os
    import tempfile
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    x[0, 0, :32] = 0.0                                   # an all-zero block
    x[1, 1, 5] = 1e3                                     # an outlier
    rt = q8_0_roundtrip(x)
    assert rt.shape == x.shape
    assert np.all(np.abs(rt - x) <= np.abs(x).reshape(-1, 32).max(1).repeat(32).reshape(x.shape) / 127 * 0.5 + 1e-3)
    assert np.array_equal(q8_0_roundtrip(rt), rt), "Q8_0 round trip must be idempotent"
    # ties: 0.5*d rounds away from zero
    t = np.zeros(32, np.float32); t[0] = 127.0; t[1] = 0.5; t[2] = -0.5; t[3] = 1.5
    qb = q8_0_quantize(t)
    assert list(qb["qs"][0][:4]) == [127, 1, -1, 2], qb["qs"][0][:4]
    w = GGUFWriter()
    w.add_str("general.architecture", "test")
    w.add_u32("general.alignment", 32)
    w.add_f32("test.eps", 1e-6)
    w.add_bool("test.flag", False)
    w.add_array("test.strs", GGUF_STRING, ["a", "Ġb", ""])
    w.add_array("test.ints", GGUF_INT32, [1, 3, -2])
    w.add_tensor("a.weight", x, GGML_Q8_0)
    w.add_tensor("b.weight", np.arange(7, dtype=np.float32), GGML_F32)
    w.add_tensor("c.weight", x[0], GGML_F16)
    fd, p = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        w.write(p)
        r = GGUFReader(p)
        assert r.kv["general.architecture"] == "test"
        assert r.kv["test.strs"] == ["a", "Ġb", ""]
        assert r.kv["test.ints"] == [1, 3, -2]
        assert r.kv["test.flag"] is False
        assert abs(r.kv["test.eps"] - 1e-6) < 1e-12
        assert r.tensors["a.weight"][0] == (64, 5, 3)
        assert np.array_equal(r.tensor("a.weight"), rt)
        assert np.array_equal(r.tensor("b.weight"), np.arange(7, dtype=np.float32))
        assert np.array_equal(r.tensor("c.weight"), x[0].astype(np.float16).astype(np.float32))
        assert r.data_offset % 32 == 0
        for n in r.tensor_order:
            assert r.tensors[n][2] % 32 == 0
    finally:
        os.unlink(p)
    print("gguf_io selftest ok")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--selftest":
        _selftest()
    elif len(sys.argv) == 2:
        dump(sys.argv[1])
    else:
        print(__doc__)
        sys.exit(2)

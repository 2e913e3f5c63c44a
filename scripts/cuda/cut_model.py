#!/usr/bin/env python3
"""Writes a copy of a llama-family GGUF that keeps only its first N decoder blocks.

For GPU checks on a machine that cannot download the model and can carry only a few tens of MB:
the cut model is still a real model (the default model's embedding, tokenizer, norms and first
blocks, as they are), so GPU and CPU can be compared on it token for token.

    python3 scripts/cuda/cut_model.py IN.gguf OUT.gguf --blocks 4
"""

import argparse
import struct

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.data[self.at:self.at + n].decode()
        self.at += n
        return s

    def skip_value(self, t):
        if t in SCALARS:
            self.take(SCALARS[t])
        elif t == 8:
            self.string()
        elif t == 9:
            inner, n = self.take("I"), self.take("Q")
            if inner in SCALARS:
                self.at += n * struct.calcsize("<" + SCALARS[inner])
            else:
                for _ in range(n):
                    self.skip_value(inner)
        else:
            raise ValueError(f"unknown GGUF value type {t}")


def string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--blocks", type=int, default=4, help="decoder blocks to keep")
    args = ap.parse_args()
    data = open(args.input, "rb").read()
    r = Reader(data)
    magic, version, n_tensors, n_kv = r.take("4s"), r.take("I"), r.take("Q"), r.take("Q")
    assert magic == b"GGUF" and version >= 2, "not a GGUF v2+ file"
    kvs, alignment, blocks_key = [], 32, None
    for _ in range(n_kv):
        start = r.at
        key = r.string()
        t = r.take("I")
        value_at = r.at
        r.skip_value(t)
        raw = data[start:r.at]
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, value_at)[0]
        if key.endswith(".block_count"):
            blocks_key = key
            assert t == 4, "block_count is a u32"
            have = struct.unpack_from("<I", data, value_at)[0]
            assert args.blocks <= have, f"the model has {have} blocks"
            raw = string(key) + struct.pack("<II", 4, args.blocks)
        kvs.append(raw)
    assert blocks_key, "no block_count in the metadata"
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = r.take("I")
        shape = [r.take("Q") for _ in range(dims)]
        ttype, offset = r.take("I"), r.take("Q")
        tensors.append((name, shape, ttype, offset))
    base = (r.at + alignment - 1) // alignment * alignment
    ends = sorted(t[3] for t in tensors) + [len(data) - base]
    size = {o: ends[ends.index(o) + 1] - o for o in sorted(t[3] for t in tensors)}

    def kept(name):
        return not name.startswith("blk.") or int(name.split(".")[1]) < args.blocks

    keep = [t for t in tensors if kept(t[0])]
    head = struct.pack("<4sIQQ", b"GGUF", version, len(keep), len(kvs)) + b"".join(kvs)
    infos, offset, chunks = b"", 0, []
    for name, shape, ttype, old in keep:
        infos += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", ttype, offset)
        n = size[old]
        chunks.append(data[base + old:base + old + n])
        offset += n
    out = head + infos
    out += b"\0" * ((-len(out)) % alignment)
    with open(args.output, "wb") as f:
        f.write(out)
        for c in chunks:
            f.write(c)
    print(f"{args.output}: {len(keep)} of {len(tensors)} tensors, {args.blocks} blocks, "
          f"{(len(out) + offset) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

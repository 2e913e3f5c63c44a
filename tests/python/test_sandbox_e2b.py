"""The official `e2b` and `e2b-code-interpreter` SDKs, unmodified, against `lastmile sandbox`.

The server runs with API keys on (an admin key in its environment, as a shell would pass it);
each test's SDK client uses a key made with the admin API, exactly as a user would.
"""

import os
import time
import urllib.request

import pytest

from conftest import SANDBOX_ADMIN_KEY as ADMIN_KEY
from conftest import admin_request as _request

def sdk_env(monkeypatch, url, key):
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", key)


@pytest.fixture
def key(sandbox_server, monkeypatch):
    url, _ = sandbox_server
    k = _request(url, "POST", "/admin/keys", {"name": "e2b-sdk"})["key"]
    sdk_env(monkeypatch, url, k)
    return k


def test_commands_stdout_stderr_exit_codes_env_cwd(key):
    from e2b import CommandExitException, Sandbox

    with Sandbox.create(envs={"SANDBOX_WIDE": "everywhere"}) as sb:
        r = sb.commands.run("echo out; echo err >&2")
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)

        with pytest.raises(CommandExitException) as e:
            sb.commands.run("echo partial; exit 7")
        assert e.value.exit_code == 7 and e.value.stdout == "partial\n"

        r = sb.commands.run('echo "$ONE-$SANDBOX_WIDE"', envs={"ONE": "1"})
        assert r.stdout == "1-everywhere\n"

        sb.files.make_dir("/home/user/work/sub")
        assert sb.commands.run("pwd", cwd="/home/user/work/sub").stdout == "/home/user/work/sub\n"
        assert sb.commands.run("pwd").stdout == "/home/user\n"
        assert sb.commands.run("whoami").stdout == "user\n"

        # Output streams to callbacks as it is written, not at the end.
        seen = []
        sb.commands.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=seen.append)
        assert "".join(seen) == "1\n2\n3\n" and len(seen) == 3

        # A command past its timeout is stopped and the SDK raises its timeout error.
        from e2b import TimeoutException

        t = time.time()
        with pytest.raises(TimeoutException):
            sb.commands.run("sleep 30", timeout=1)
        assert time.time() - t < 10
        deadline = time.time() + 5
        while any("sleep 30" in " ".join(p.args) for p in sb.commands.list()) and time.time() < deadline:
            time.sleep(0.05)
        assert all("sleep 30" not in " ".join(p.args) for p in sb.commands.list())


def test_background_command_reattach_stdin_and_kill(key):
    from e2b import CommandExitException, Sandbox

    with Sandbox.create() as sb:
        h = sb.commands.run("echo started; sleep 60", background=True)
        assert h.pid > 0
        assert h.pid in [p.pid for p in sb.commands.list()]
        # Another client reattaches by pid and sees its end when it is killed.
        again = sb.commands.connect(h.pid)
        assert h.kill()
        with pytest.raises(CommandExitException) as e:
            again.wait()
        assert e.value.exit_code != 0
        assert h.pid not in [p.pid for p in sb.commands.list()]
        assert sb.commands.kill(h.pid) is False

        # stdin: a background `cat` echoes what we send, then ends when stdin closes.
        cat = sb.commands.run("cat", background=True, stdin=True)
        sb.commands.send_stdin(cat.pid, "hello stdin\n")
        sb.commands.close_stdin(cat.pid)
        out = cat.wait()
        assert out.stdout == "hello stdin\n" and out.exit_code == 0

        # A server started in the background is reachable from later commands (one network).
        sb.commands.run("python3 -m http.server 8000 --bind 127.0.0.1", background=True)
        r = sb.commands.run(
            "for i in $(seq 50); do python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://127.0.0.1:8000/\").status)' 2>/dev/null && break; sleep 0.1; done"
        )
        assert r.stdout.strip() == "200"


def test_files_round_trip_text_binary_listing(key):
    from e2b import NotFoundException, Sandbox

    with Sandbox.create() as sb:
        sb.files.write("notes/hello.txt", "héllo wörld\n")
        assert sb.files.read("/home/user/notes/hello.txt") == "héllo wörld\n"
        assert sb.commands.run("cat notes/hello.txt").stdout == "héllo wörld\n"

        blob = os.urandom(10 * 1024 * 1024)
        info = sb.files.write("/tmp/blob.bin", blob)
        assert info.path == "/tmp/blob.bin"
        assert bytes(sb.files.read("/tmp/blob.bin", format="bytes")) == blob
        assert sb.commands.run("stat -c %s /tmp/blob.bin").stdout.strip() == str(len(blob))
        # Streamed both ways: a file object up, a stream down.
        import io

        sb.files.write("/tmp/streamed.bin", io.BytesIO(blob[:3_000_000]))
        chunks = b"".join(sb.files.read("/tmp/streamed.bin", format="stream"))
        assert chunks == blob[:3_000_000]

        names = sorted(e.name for e in sb.files.list("/home/user/notes"))
        assert names == ["hello.txt"]
        deep = sorted(e.path for e in sb.files.list("/home/user", depth=2))
        assert "/home/user/notes/hello.txt" in deep
        assert sb.files.exists("notes/hello.txt") and not sb.files.exists("nope.txt")
        sb.files.rename("notes/hello.txt", "notes/renamed.txt")
        assert sb.files.exists("notes/renamed.txt")
        sb.files.remove("notes")
        assert not sb.files.exists("notes")
        with pytest.raises(NotFoundException):
            sb.files.read("/home/user/missing.txt")
        assert sb.files.get_info("/tmp/blob.bin").size == len(blob)


def test_code_interpreter_keeps_state_and_reports_errors(key):
    from e2b_code_interpreter import Sandbox

    with Sandbox.create() as sb:
        first = sb.run_code("x = 40\nprint('side effect')\nx + 2")
        assert first.error is None
        assert first.logs.stdout == ["side effect\n"]
        assert first.text == "42"
        second = sb.run_code("x * 10")
        assert second.text == "400"
        assert second.execution_count == 2
        bad = sb.run_code("1 / 0")
        assert bad.error is not None and bad.error.name == "ZeroDivisionError"
        assert "ZeroDivisionError" in bad.error.traceback
        # Contexts are independent namespaces.
        ctx = sb.create_code_context()
        other = sb.run_code("'x' in globals()", context=ctx)
        assert other.text == "False"
        assert sb.run_code("x", envs={"A": "b"}).text == "40"
        # A thread a cell leaves printing does not stall the sandbox between cells.
        sb.run_code(
            "import threading\n"
            "def spam():\n"
            "    for i in range(20000):\n"
            "        print('x' * 100)\n"
            "threading.Thread(target=spam).start()"
        )
        time.sleep(1)
        assert sb.commands.run("echo still here", timeout=10).stdout == "still here\n"
        assert sb.run_code("1 + 1", timeout=20).text == "2"


def test_timeout_set_expiry_list_kill_and_other_keys(sandbox_server, key, monkeypatch):
    from e2b import Sandbox, SandboxException

    url, _ = sandbox_server
    sb = Sandbox.create(timeout=60, metadata={"suite": "e2b", "run": "1"})
    other = Sandbox.create(timeout=60, metadata={"suite": "other"})
    from e2b.sandbox.sandbox_api import SandboxQuery

    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"})).next_items()
    assert [s.sandbox_id for s in listed] == [sb.sandbox_id]
    assert listed[0].metadata == {"suite": "e2b", "run": "1"}

    info = sb.get_info()
    assert info.template_id == "base" and info.state.value == "running"
    sb.set_timeout(2)
    assert (sb.get_info().end_at - info.started_at).total_seconds() < 30
    deadline = time.time() + 10
    while sb.is_running() and time.time() < deadline:
        time.sleep(0.2)
    assert not sb.is_running()
    with pytest.raises(SandboxException):
        sb.commands.run("echo too late")

    # Another key sees none of this key's sandboxes.
    intruder_key = _request(url, "POST", "/admin/keys", {"name": "intruder"})["key"]
    from e2b import Sandbox as S2

    monkeypatch.setenv("E2B_API_KEY", intruder_key)
    assert all(s.sandbox_id != other.sandbox_id for s in S2.list().next_items())
    with pytest.raises(Exception) as e:
        S2.connect(other.sandbox_id)
    assert "not found" in str(e.value).lower()
    assert S2.kill(other.sandbox_id) is False
    monkeypatch.setenv("E2B_API_KEY", key)
    assert other.is_running()
    other.kill()
    assert not other.is_running()
    # Killing what is gone answers "not found", not an error.
    assert Sandbox.kill(other.sandbox_id) is False


def test_per_key_sandbox_limit(sandbox_server, key):
    from e2b import Sandbox

    made = [Sandbox.create(timeout=30) for _ in range(6)]
    try:
        with pytest.raises(Exception) as e:
            Sandbox.create(timeout=30)
        assert "limit" in str(e.value)
    finally:
        for s in made:
            s.kill()


def test_admin_and_metrics(sandbox_server, key):
    from e2b import Sandbox

    url, _ = sandbox_server
    with Sandbox.create() as sb:
        sb.commands.run("true")
        listed = _request(url, "GET", "/admin/sandboxes")
        assert "bwrap" in listed["backend"]
        mine = [s for s in listed["sandboxes"] if s["sandboxID"] == sb.sandbox_id]
        assert mine and mine[0]["memoryUsedBytes"] is not None
        req = urllib.request.Request(url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        assert 'lastmile_sandboxes_live{template="base"' in text
        assert "lastmile_sandbox_create_seconds_count" in text
        assert "lastmile_sandbox_commands_total" in text


def test_custom_template_resources_and_start_command(key):
    from e2b import Sandbox

    with Sandbox.create(template="web") as sb:
        info = sb.get_info()
        assert info.template_id == "web" and info.memory_mb == 256
        started = [p for p in sb.commands.list() if p.tag == "start"]
        assert started and "http.server" in " ".join(started[0].args)
        r = sb.commands.run(
            "for i in $(seq 50); do python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://127.0.0.1:8000/\").status)' 2>/dev/null && break; sleep 0.1; done"
        )
        assert r.stdout.strip() == "200"
        # The template's memory limit is the cgroup's.
        code = sb.commands.run("python3 -c 'x = bytearray(400 * 1024**2)' && echo fits || echo killed").stdout
        assert code.strip() == "killed"
    from e2b import SandboxException

    with pytest.raises(SandboxException) as e:
        Sandbox.create(template="no-such-template")
    assert "not found" in str(e.value)


def test_watch_dir_reports_changes(key):
    from e2b import FilesystemEventType, Sandbox

    with Sandbox.create() as sb:
        sb.files.make_dir("/home/user/w/sub")
        handle = sb.files.watch_dir("/home/user/w", recursive=True)
        sb.files.write("/home/user/w/a.txt", "one")
        sb.commands.run("echo two >> /home/user/w/sub/b.txt && rm /home/user/w/a.txt && mkdir /home/user/w/new && touch /home/user/w/new/c.txt")
        seen = []
        deadline = time.time() + 5
        while time.time() < deadline:
            seen += [(e.name, e.type) for e in handle.get_new_events()]
            if ("new/c.txt", FilesystemEventType.CREATE) in seen:
                break
            time.sleep(0.1)
        handle.stop()
        assert ("a.txt", FilesystemEventType.CREATE) in seen, seen
        assert ("a.txt", FilesystemEventType.REMOVE) in seen, seen
        assert ("sub/b.txt", FilesystemEventType.WRITE) in seen, seen
        # A folder made after the watch began is watched too.
        assert ("new/c.txt", FilesystemEventType.CREATE) in seen, seen
        with pytest.raises(Exception):
            handle.get_new_events()


def test_pty_terminal_session(key):
    from e2b import PtySize, Sandbox

    with Sandbox.create() as sb:
        term = sb.pty.create(PtySize(rows=24, cols=100))
        sb.pty.send_stdin(term.pid, b"stty size; tty; echo pty-$((6*7))\n")
        out = ""
        events = iter(term)
        while "pty-42\r\n" not in out:
            _, _, data = next(events)
            if data:
                out += bytes(data).decode(errors="replace")
        assert "24 100" in out and "/dev/pts/" in out, out
        # Resized, the program on it sees the new size.
        sb.pty.resize(term.pid, PtySize(rows=30, cols=120))
        sb.pty.send_stdin(term.pid, b"stty size; exit\n")
        for _, _, data in events:
            if data:
                out += bytes(data).decode(errors="replace")
        assert "30 120" in out, out
        assert term.wait().exit_code == 0


def test_pause_stops_everything_and_connect_resumes_where_it_was(key):
    from e2b import Sandbox, SandboxQuery, SandboxState

    sb = Sandbox.create(timeout=4)
    try:
        # A clock in the background, writing the time ten times a second.
        clock = sb.commands.run(
            "python3 -c 'import time\nwhile True:\n    print(time.time(), flush=True)\n"
            "    time.sleep(0.1)' > /tmp/clock", background=True)
        sb.files.write("/home/user/state.txt", "kept")
        time.sleep(0.5)

        assert sb.pause() is True
        assert Sandbox.pause(sb.sandbox_id) is False, "pausing a paused sandbox: False (409)"
        assert Sandbox.get_info(sb.sandbox_id).state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sb.sandbox_id]
        running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
        assert sb.sandbox_id not in [s.sandbox_id for s in running]
        # While paused, its data plane says so at once (nothing in it could answer).
        t = time.time()
        with pytest.raises(Exception) as e:
            sb.files.read("/home/user/state.txt")
        assert "paused" in str(e.value) and time.time() - t < 5, e.value
        # Paused past its 4 s timeout: the timeout does not run while paused.
        time.sleep(5)

        resumed = Sandbox.connect(sb.sandbox_id, timeout=30)
        assert Sandbox.get_info(sb.sandbox_id).state == SandboxState.RUNNING
        assert resumed.files.read("/home/user/state.txt") == "kept"
        time.sleep(0.5)
        # The clock was stopped, not killed: it shows one gap of the pause, and runs on.
        ticks = [float(t) for t in resumed.files.read("/tmp/clock").split()]
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert max(gaps) > 4.5, f"no process ran while paused: {max(gaps)}"
        assert sorted(gaps)[-2] < 1.0, "one pause, one gap"
        assert ticks[-1] > time.time() - 1, "the clock runs again"
        assert clock.pid in [p.pid for p in resumed.commands.list()]
        # Connecting to a running sandbox changes nothing.
        Sandbox.connect(sb.sandbox_id)
        assert resumed.commands.run("echo alive").stdout == "alive\n"
    finally:
        sb.kill()


def test_an_idle_sandbox_lives_its_timeout(key):
    """Sandboxes die with lastmile (the parent-death signal), which Linux ties to the thread
    that forked them: launched from a pool thread that exited after 10 idle seconds, every
    sandbox was killed then, whatever its timeout. Idle past that, it must still answer."""
    from e2b import Sandbox

    with Sandbox.create(timeout=120) as sb:
        sb.commands.run("echo warm")
        time.sleep(13)
        assert sb.commands.run("echo still here").stdout == "still here\n"
        assert sb.is_running()

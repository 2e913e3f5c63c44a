"""Escape attempts from inside a sandbox, through the official `e2b` SDK: each must fail inside
the sandbox, and the host must not notice beyond the sandbox's own limits."""

import os
import time
import uuid

import pytest

from conftest import SANDBOX_ADMIN_KEY, SANDBOX_CANARY, admin_request

SANDBOX_HOST_UID = 65534  # the unprivileged host user bubblewrap runs as


@pytest.fixture
def key(sandbox_server, monkeypatch):
    url, _ = sandbox_server
    k = admin_request(url, "POST", "/admin/keys", {"name": "escape"})["key"]
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", k)
    return k


def run(sb, cmd, **kw):
    """Runs `cmd`; returns (exit code, stdout, stderr) whatever the exit code."""
    from e2b import CommandExitException

    try:
        r = sb.commands.run(cmd, **kw)
        return r.exit_code, r.stdout, r.stderr
    except CommandExitException as e:
        return e.exit_code, e.stdout, e.stderr


def host_pids_of(uid):
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            out.add(int(pid))
                        break
        except OSError:
            pass
    return out


def test_host_secrets_and_files_are_invisible(key):
    from e2b import Sandbox

    home = os.environ.get("LASTMILE_HOME", os.path.expanduser("~/.cache/lastmile"))
    with Sandbox.create() as sb:
        code, _, _ = run(sb, f"ls {home}")
        assert code != 0
        assert run(sb, "ls /root")[0] != 0
        assert run(sb, "ls /work")[0] != 0
        # Every process's environment, bubblewrap's own pid 1 included.
        _, out, _ = run(sb, "for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ; done 2>/dev/null; env")
        assert "HOME=/home/user" in out  # the read worked
        assert SANDBOX_CANARY not in out and SANDBOX_ADMIN_KEY not in out
        assert "LASTMILE_ADMIN_KEY" not in out


def test_writes_stay_inside(key):
    from e2b import Sandbox

    with Sandbox.create() as sb:
        for path in ["/usr/escape", "/etc/escape", "/escape", "/bin/escape", "/proc/escape"]:
            assert run(sb, f"touch {path}")[0] != 0, path
        marker = f"/tmp/lastmile-escape-{uuid.uuid4().hex}"
        assert run(sb, f"echo pwned > {marker} && cat {marker}")[1] == "pwned\n"
        assert not os.path.exists(marker)


def test_no_network_by_default(key, sandbox_server):
    from e2b import Sandbox

    url, _ = sandbox_server
    port = int(url.rsplit(":", 1)[1])
    with Sandbox.create() as sb:
        _, devs, _ = run(sb, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert devs.split() == ["lo"]
        code, out, _ = run(
            sb,
            "python3 -c \"import socket; socket.create_connection(('127.0.0.1', %d), timeout=2)\" 2>&1" % port,
        )
        assert code != 0 and "refused" in out.lower()
    with pytest.raises(Exception) as e:
        Sandbox.create(allow_internet_access=True)
    assert "internet" in str(e.value).lower()


def test_fork_bomb_is_contained_and_killing_leaves_nothing(key, sandbox_server):
    from e2b import Sandbox

    url, _ = sandbox_server
    before = host_pids_of(SANDBOX_HOST_UID)
    sb = Sandbox.create()
    sb.commands.run("bash -c ':(){ :|:& };:'", background=True, timeout=0)
    time.sleep(2)
    # The pids limit holds: never more than the template's 256 on the host.
    counts = []
    seen = set()
    for _ in range(10):
        now = host_pids_of(SANDBOX_HOST_UID) - before
        seen |= now
        counts.append(len(now))
        t = time.time()
        admin_request(url, "GET", "/admin/sandboxes")
        # The host stays responsive beside the bomb (the sandbox has one core of two).
        assert time.time() - t < 1.0
        time.sleep(0.1)
    assert max(counts) <= 256 and max(counts) > 50
    sb.kill()
    deadline = time.time() + 10
    while seen & host_pids_of(SANDBOX_HOST_UID) and time.time() < deadline:
        time.sleep(0.1)
    assert not seen & host_pids_of(SANDBOX_HOST_UID)


def test_memory_limit_kills_inside_only(key, sandbox_server):
    from e2b import Sandbox

    url, proc = sandbox_server
    with Sandbox.create() as sb:
        code, _, _ = run(sb, "python3 -c 'x = bytearray(2 * 1024**3); print(len(x))'")
        assert code != 0
        # The sandbox's own daemon survived: it goes on serving.
        assert run(sb, "echo alive")[1] == "alive\n"
        mine = [s for s in admin_request(url, "GET", "/admin/sandboxes")["sandboxes"] if s["sandboxID"] == sb.sandbox_id]
        assert mine[0]["oomEvents"] > 0
    assert proc.poll() is None


def test_cannot_signal_ptrace_mount_or_nest(key, sandbox_server):
    from e2b import Sandbox

    _, proc = sandbox_server
    with Sandbox.create() as sb:
        code, _, err = run(sb, f"kill -9 {proc.pid}")
        assert code != 0 and "No such process" in err
        assert proc.poll() is None
        code, out, _ = run(
            sb,
            "python3 -c \"import ctypes,os; l=ctypes.CDLL(None, use_errno=True); "
            "print(l.ptrace(16, 1, 0, 0), ctypes.get_errno())\"",
        )
        assert out.split() == ["-1", "1"]  # PTRACE_ATTACH fails with EPERM
        assert run(sb, "unshare -U true")[0] != 0
        assert run(sb, "unshare -n true")[0] != 0
        assert run(sb, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")[0] != 0
        # No capabilities at all.
        _, status, _ = run(sb, "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status")
        assert all(line.split()[1] == "0000000000000000" for line in status.splitlines())


def test_sandboxes_cannot_see_each_other(key):
    from e2b import Sandbox

    with Sandbox.create() as a, Sandbox.create() as b:
        a.files.write("/home/user/secret.txt", "mine")
        a.files.write("/tmp/secret.txt", "mine")
        a.commands.run("sleep 300", background=True)
        assert not b.files.exists("/home/user/secret.txt")
        assert not b.files.exists("/tmp/secret.txt")
        _, procs, _ = run(b, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
        assert "sleep 300" not in procs
        # a's data-plane token does not open b.
        import httpx

        r = httpx.get(
            os.environ["E2B_SANDBOX_URL"] + "/files",
            params={"path": "/home/user/secret.txt"},
            headers={"E2b-Sandbox-Id": b.sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": "0" * 64},
        )
        assert r.status_code == 502


def test_killing_lastmile_leaves_no_sandbox_behind(tmp_path, monkeypatch):
    import glob
    import signal
    import subprocess

    from conftest import BINARY, _free_port
    from e2b import Sandbox

    def start():
        port = _free_port()
        p = subprocess.Popen(
            [str(BINARY), "sandbox", "--port", str(port), "--usage-db", str(tmp_path / "db")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return p, url
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("no server")

    before = host_pids_of(SANDBOX_HOST_UID)
    proc, url = start()
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", "open")
    sb = Sandbox.create()
    sb.commands.run("sleep 300", background=True)
    sb.commands.run("nohup sleep 301 >/dev/null 2>&1 &")
    ours = host_pids_of(SANDBOX_HOST_UID) - before
    assert len(ours) >= 4  # bubblewrap, the sandbox's init, the agent, the sleeps
    folders = lambda pid: [  # noqa: E731
        p for pattern in ("/sys/fs/cgroup/*/lastmile-sandboxes/%d", "/sys/fs/cgroup/*/*/*/lastmile-sandboxes/%d",
                          "/sys/fs/cgroup/lastmile-sandboxes/%d", "/sys/fs/cgroup/*/*/lastmile-sandboxes/%d")
        for p in glob.glob(pattern % pid)
    ]
    assert folders(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while ours & host_pids_of(SANDBOX_HOST_UID) and time.time() < deadline:
        time.sleep(0.1)
    assert not ours & host_pids_of(SANDBOX_HOST_UID)
    # The next lastmile clears the cgroup folders the dead one left.
    again, _ = start()
    try:
        assert folders(proc.pid) == []
    finally:
        again.terminate()
        again.wait(timeout=20)

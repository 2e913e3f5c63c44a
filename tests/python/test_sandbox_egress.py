"""Internet access for sandboxes (`--sandbox-egress`), through the official `e2b` SDK: a sandbox
that asks gets a network, behind a filter it cannot change; the host, its loopback, private and
link-local ranges (cloud metadata) stay out of reach unless the operator exempts them; the
client's `network` allow/deny lists narrow it further.

This machine has no internet, so "out" is the host's own address, which a server reaches only
once its operator exempts it; on the server without the exemption the same address is refused.
"""

import socket
import subprocess
import threading

import pytest

from conftest import admin_request, start_sandbox_server, stop_server


def host_address():
    """A non-loopback IPv4 address of this host."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    raise AssertionError(f"this host has no global IPv4 address: {out!r}")


@pytest.fixture(scope="module")
def listener():
    """A TCP server on every host address that greets each connection with `hello`."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"hello")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def server_with(tmp_path_factory, monkeypatch, *args):
    tmp = tmp_path_factory.mktemp("egress")
    url, proc, log = start_sandbox_server(tmp, *args)
    key = admin_request(url, "POST", "/admin/keys", {"name": "egress"})["key"]
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", key)
    return proc, log


def connect(sb, host, port):
    """What a connection from inside the sandbox gets: the greeting, or the error's name."""
    from e2b import CommandExitException

    code = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('{host}', {port}), timeout=3)\n"
        "    print(s.recv(5).decode())\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno)\n"
    )
    sb.files.write("/tmp/connect.py", code)
    try:
        return sb.commands.run("python3 /tmp/connect.py", timeout=20).stdout.strip()
    except CommandExitException as e:
        return f"exit {e.exit_code}: {e.stderr}"


def test_egress_reaches_out_but_never_the_host_or_private_ranges(
        tmp_path_factory, monkeypatch, listener):
    from e2b import CommandExitException, Sandbox

    proc, log = server_with(tmp_path_factory, monkeypatch, "--sandbox-egress")
    try:
        ip = host_address()
        with Sandbox.create(allow_internet_access=True) as sb:
            devs = sb.commands.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").stdout
            assert sorted(devs.split()) == ["lo", "tap0"]
            assert sb.files.read("/etc/resolv.conf") == "nameserver 10.0.2.3\n"
            # The host, through its own address, its loopback seen from the sandbox (10.0.2.2),
            # cloud metadata and the LAN: rejected by the filter (EHOSTUNREACH at once, where
            # without it they would time out or be refused).
            for host in [ip, "10.0.2.2", "169.254.169.254", "192.168.1.1"]:
                assert connect(sb, host, listener) == "OSError 113", host
            assert connect(sb, "127.0.0.1", listener).startswith("ConnectionRefusedError")
            # The filter is out of the sandbox's reach.
            for cmd in ["nft flush ruleset", "ip link set tap0 down", "ip route del default"]:
                with pytest.raises(CommandExitException):
                    sb.commands.run(cmd)
            assert connect(sb, "169.254.169.254", 80) == "OSError 113"
        # Without asking: no network at all.
        with Sandbox.create() as sb:
            devs = sb.commands.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").stdout
            assert devs.split() == ["lo"]
        # Domain names cannot be filtered by address: refused, naming the field.
        with pytest.raises(Exception) as e:
            Sandbox.create(allow_internet_access=True, network={"allow_out": ["example.com"]})
        assert "allowOut" in str(e.value)
    finally:
        stop_server(proc)
        log.close()


def test_an_exempted_address_is_reached_and_client_rules_narrow_it(
        tmp_path_factory, monkeypatch, listener):
    from e2b import Sandbox

    ip = host_address()
    proc, log = server_with(tmp_path_factory, monkeypatch,
                            "--sandbox-egress", "--sandbox-egress-allow", f"{ip}/32")
    try:
        with Sandbox.create(allow_internet_access=True) as sb:
            assert connect(sb, ip, listener) == "hello"
            # Still refused: the rest of the server's policy.
            assert connect(sb, "10.0.2.2", listener) == "OSError 113"
        with Sandbox.create(allow_internet_access=True,
                            network={"deny_out": [f"{ip}/32"]}) as sb:
            assert connect(sb, ip, listener) == "OSError 113"
        with Sandbox.create(allow_internet_access=True,
                            network={"allow_out": ["1.1.1.1"], "deny_out": ["0.0.0.0/0"]}) as sb:
            assert connect(sb, ip, listener) == "OSError 113", "an allow-list without it"
        with Sandbox.create(allow_internet_access=True,
                            network={"allow_out": [ip], "deny_out": ["0.0.0.0/0"]}) as sb:
            assert connect(sb, ip, listener) == "hello", "an allow-list with it"
    finally:
        stop_server(proc)
        log.close()

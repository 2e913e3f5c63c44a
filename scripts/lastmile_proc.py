"""Starting `lastmile` servers from the benchmark scripts, the one way (as
`lastmile_control::launcher` does in Rust).

`start(args)` runs `lastmile ARGS --host 127.0.0.1 --port 0` and waits for the line every server
command prints on stdout once it listens, `lastmile: listening on http://127.0.0.1:PORT`: no port
is picked here, so two servers can never race for one (as bind-to-0, close, pass the number on
did). Its stderr and the rest of its stdout go to a log file, never to /dev/null; if it exits or
stays silent before listening, the error shows the end of that log. On Linux the server is
killed when the script dies (PR_SET_PDEATHSIG). A `Server` is stopped by `stop()` or by leaving
its `with` block.

    from lastmile_proc import start
    with start(["serve", "--threads", "1"]) as server:
        print(server.url)
"""

import ctypes
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
LISTENING = "lastmile: listening on "

_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child, before exec: SIGKILL when the parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def parse_listening(line):
    """The base URL in a `lastmile: listening on URL` line, or None."""
    line = line.rstrip("\r\n")
    if line.startswith(LISTENING) and line[len(LISTENING):].startswith("http://"):
        return line[len(LISTENING):]
    return None


def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Server:
    """A started server: `url`, `port`, `proc` (its Popen) and `log` (its log file's path)."""

    def __init__(self, proc, url, log):
        self.proc = proc
        self.url = url
        self.log = log

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout=30):
        """SIGTERM (in-flight requests finish), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        """SIGKILL, now."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(args, log=None, env=None, timeout=120, binary=BIN, host="127.0.0.1"):
    """Runs `binary ARGS --host HOST --port 0` and returns a `Server` once it listens.

    `log`: the file its output is appended to (default: a new file in the temp folder); `env`:
    its environment (default: this one with RUST_LOG=warn). Raises RuntimeError, with the end of
    the log, if it exits or does not listen within `timeout` seconds."""
    if log is None:
        fd, log = tempfile.mkstemp(prefix=f"lastmile-{args[0]}-", suffix=".log")
        os.close(fd)
    if env is None:
        env = dict(os.environ, RUST_LOG="warn")
    logf = open(log, "ab")
    cmd = [str(binary), *map(str, args), "--host", host, "--port", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                            env=env, preexec_fn=_die_with_parent)
    found = queue.Queue()

    def copy_stdout():
        reported = False
        for raw in proc.stdout:
            if not reported:
                url = parse_listening(raw.decode(errors="replace"))
                if url:
                    found.put(url)
                    reported = True
            logf.write(raw)
            logf.flush()
        found.put(None)
        logf.close()

    threading.Thread(target=copy_stdout, name=f"lastmile-{proc.pid}-stdout", daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd)} did not listen within {timeout} s; the end of {log}:\n"
                           f"{_tail(log)}") from None
    if url is None:
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed its stdout but lives on
            proc.kill()
            code = proc.wait()
        raise RuntimeError(f"{' '.join(cmd)} exited ({code}) before it listened; the end of {log}:\n"
                           f"{_tail(log)}")
    return Server(proc, url, log)


def wait_healthy(url, proc=None, timeout=120):
    """Waits until `url`/health answers 200 (a server still loading answers otherwise, or not at
    all); exits with a message if `proc` (its Popen, where given) ends first or `timeout`
    seconds pass."""
    import sys
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{url} exited early")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} never became healthy")


def free_port_for_foreign_server():
    """A port nothing listens on now, for servers that cannot report a port they picked
    (llama.cpp's llama-server): another process may take it before they bind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import sys
    import urllib.request

    with start(sys.argv[1:] or ["serve", "--threads", "1"]) as server:
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
            print(f"{server.url}: /health {r.status}; log {server.log}")

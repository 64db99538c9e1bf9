"""The official E2B SDK against dormouse-server: create, run code, pause,
list, connect, files, commands, kill, and connect to a killed sandbox.

Run by server/tests/sdk.rs with E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY pointing at the server under test."""

import io
import os
import time
from datetime import datetime, timezone

import httpx

from e2b import CommandExitException, NotFoundException, SandboxQuery, SandboxState
from e2b_code_interpreter import Sandbox


def step(name, t0=[time.monotonic()]):
    now = time.monotonic()
    print(f"[{now - t0[0]:7.2f}s] {name}", flush=True)


step("create")
sbx = Sandbox.create(metadata={"suite": "basic"})
sid = sbx.sandbox_id
step(f"created {sid}")

ex = sbx.run_code("x = 42")
assert ex.error is None, ex.error
step("run_code x = 42")

assert sbx.pause() is True
step("paused")
assert sbx.pause() is False, "pausing a paused sandbox says False (409)"

paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
assert sid in [s.sandbox_id for s in paused], paused
info = [s for s in paused if s.sandbox_id == sid][0]
assert info.state == SandboxState.PAUSED and info.metadata == {"suite": "basic"}, info
running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
assert sid not in [s.sandbox_id for s in running]
step("listed as paused")

sbx = Sandbox.connect(sid)
step("connected (resumed)")
ex = sbx.run_code("print(x)")
assert ex.logs.stdout == ["42\n"], ex.logs
ex = sbx.run_code("x + 1")
assert ex.text == "43", ex.text
ex = sbx.run_code("1 / 0")
assert ex.error is not None and ex.error.name == "ZeroDivisionError", ex.error
step("state kept: print(x) -> 42")

sbx.set_timeout(900)
info = sbx.get_info()
left = (info.end_at - datetime.now(timezone.utc)).total_seconds()
assert 800 < left <= 900, (info.end_at, left)
assert info.state == SandboxState.RUNNING and info.metadata == {"suite": "basic"}, info
step("set_timeout and get_info")

info = sbx.files.write("/home/user/data/f.txt", "hello")
assert info.path == "/home/user/data/f.txt", info
assert sbx.files.read("/home/user/data/f.txt") == "hello"
assert bytes(sbx.files.read("/home/user/data/f.txt", format="bytes")) == b"hello"
names = [e.name for e in sbx.files.list("/home/user/data")]
assert names == ["f.txt"], names
assert sbx.files.exists("/home/user/data/f.txt")
assert not sbx.files.exists("/home/user/nope")
try:
    sbx.files.read("/home/user/nope")
    raise AssertionError("reading a missing file must fail")
except NotFoundException:
    pass
assert sbx.files.make_dir("/home/user/data/sub") is True
assert sbx.files.make_dir("/home/user/data/sub") is False
sbx.files.write_files([
    {"path": "/home/user/data/sub/a.txt", "data": "A"},
    {"path": "/home/user/data/sub/b.bin", "data": b"\x00\xff"},
])
big = bytes(range(256)) * 8192  # 2 MiB, streamed as application/octet-stream
sbx.files.write("/home/user/data/big.bin", io.BytesIO(big))
assert bytes(sbx.files.read("/home/user/data/big.bin", format="bytes")) == big
moved = sbx.files.rename("/home/user/data/sub/a.txt", "/home/user/data/a2.txt")
assert moved.path == "/home/user/data/a2.txt", moved
assert sbx.files.get_info("/home/user/data/a2.txt").size == 1
sbx.files.remove("/home/user/data/sub")
assert not sbx.files.exists("/home/user/data/sub")
watcher = sbx.files.watch_dir("/home/user/data")
sbx.files.write("/home/user/data/new.txt", "n")
deadline = time.monotonic() + 60
seen = []
while not any(e.name == "new.txt" for e in seen):
    assert time.monotonic() < deadline, seen
    time.sleep(0.5)
    seen += watcher.get_new_events()
watcher.stop()
step("files make_dir/write_files/octet-stream/rename/remove/watch_dir")

ctx = sbx.create_code_context()
sbx.run_code("z = 'in ctx'", context=ctx)
assert sbx.run_code("z", context=ctx).text == "'in ctx'"
assert sbx.run_code("z").error.name == "NameError"
assert ctx.id in [c.id for c in sbx.list_code_contexts()]
sbx.restart_code_context(ctx)
assert sbx.run_code("z", context=ctx).error.name == "NameError", "a restarted context is empty"
sbx.remove_code_context(ctx)
assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
step("code contexts")

r = sbx.commands.run("echo hi")
assert (r.stdout, r.exit_code) == ("hi\n", 0), r
try:
    sbx.commands.run("echo oops >&2; exit 3")
    raise AssertionError("a failing command must raise")
except CommandExitException as e:
    assert e.exit_code == 3 and e.stderr == "oops\n", e
r = sbx.commands.run("cat /home/user/data/f.txt")
assert r.stdout == "hello"
step("commands.run")

h = sbx.commands.run("sleep 300", background=True)
pids = [p.pid for p in sbx.commands.list()]
assert h.pid in pids, (h.pid, pids)
assert h.kill() is True
step("background command listed and killed")

h = sbx.commands.run("cat", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "abc\n")
sbx.commands.stream_input(h.pid, ["d", "e\n"])
sbx.commands.close_stdin(h.pid)
r = h.wait()
assert r.stdout == "abc\nde\n", r
h = sbx.commands.run("sleep 300", background=True)
h2 = sbx.commands.connect(h.pid)
assert h2.pid == h.pid
assert sbx.commands.kill(h.pid) is True
try:
    h2.wait()
    raise AssertionError("a killed command ends with an error")
except CommandExitException as e:
    assert e.exit_code == -1, e
assert sbx.commands.kill(h.pid) is False
step("stdin (send, stream, close), connect to a running command")

# A guest server through get_host(port): {port}-{id}.{domain} as Host.
sbx.commands.run(
    "python3 -m http.server 8000 --bind 127.0.0.1 --directory /home/user/data",
    background=True,
)
host = sbx.get_host(8000)
assert host.startswith(f"8000-{sid}."), host
url = os.environ["E2B_SANDBOX_URL"] + "/f.txt"
auth = {"Host": host, "E2B-Traffic-Access-Token": sbx.traffic_access_token}
deadline = time.monotonic() + 120
while True:
    r = httpx.get(url, headers=auth, timeout=30)
    if r.status_code == 200:
        break
    assert r.status_code == 502 and time.monotonic() < deadline, (r.status_code, r.text)
    time.sleep(1)
assert r.text == "hello", r.text
assert httpx.get(url, headers={"Host": host}, timeout=30).status_code == 401
step("guest port 8000 through get_host")

assert sbx.kill() is True
step("killed")
try:
    Sandbox.connect(sid)
    raise AssertionError("connect to a killed sandbox must fail")
except NotFoundException:
    pass
assert Sandbox.kill(sid) is False
step("connect after kill: NotFoundException")
print("OK")

"""The official E2B SDK against dormouse-server: create, run code, pause,
list, connect, files, commands, kill, and connect to a killed sandbox.

Run by server/tests/sdk.rs with E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY pointing at the server under test."""

import time

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
step("files write/read/list/exists")

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

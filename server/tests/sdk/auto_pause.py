"""Auto-pause through the SDK: a sandbox created with
lifecycle={"on_timeout": "pause"} pauses when its timeout runs out, keeps
its state, and connect resumes it (and it pauses again later)."""

import time

from e2b import SandboxQuery, SandboxState
from e2b_code_interpreter import Sandbox


def state_of(sid):
    for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING, SandboxState.PAUSED])).next_items():
        if s.sandbox_id == sid:
            return s.state
    return None


def wait_paused(sid, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if state_of(sid) == SandboxState.PAUSED:
            return
        time.sleep(1)
    raise AssertionError(f"{sid} did not pause within {limit} s")


sbx = Sandbox.create(timeout=20, lifecycle={"on_timeout": "pause"})
sid = sbx.sandbox_id
info = sbx.get_info()
assert info.state == SandboxState.RUNNING, info
sbx.run_code("y = 'kept'")
print("created", sid, flush=True)

wait_paused(sid, 120)
print("auto-paused", flush=True)

sbx = Sandbox.connect(sid, timeout=20)
ex = sbx.run_code("print(y)")
assert ex.logs.stdout == ["kept\n"], ex.logs
assert state_of(sid) == SandboxState.RUNNING
print("resumed with state", flush=True)

wait_paused(sid, 120)
print("auto-paused again", flush=True)

# A plain sandbox with a short timeout is killed at expiry instead.
doomed = Sandbox.create(timeout=5)
did = doomed.sandbox_id
deadline = time.monotonic() + 120
while state_of(did) is not None:
    assert time.monotonic() < deadline, "a timed-out sandbox was not killed"
    time.sleep(1)
print("killed at timeout", flush=True)

Sandbox.kill(sid)
print("OK")

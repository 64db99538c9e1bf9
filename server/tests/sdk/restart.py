"""Across a server restart: `before` creates a sandbox with state and
leaves it running (the test then SIGTERMs the server, which pauses it);
`after ID` connects to it on the new server and finds the state."""

import sys

from e2b import SandboxQuery, SandboxState
from e2b_code_interpreter import Sandbox

if sys.argv[1] == "before":
    sbx = Sandbox.create(timeout=3600)
    sbx.run_code("survivor = [1, 2, 3]")
    sbx.files.write("/home/user/kept.txt", "on disk")
    print(f"sandbox {sbx.sandbox_id}")
else:
    sid = sys.argv[2]
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sid in [s.sandbox_id for s in paused], paused
    sbx = Sandbox.connect(sid)
    assert sbx.run_code("sum(survivor)").text == "6"
    assert sbx.files.read("/home/user/kept.txt") == "on disk"
    assert sbx.kill() is True
print("OK")

"""20 clients at once, each creating a sandbox, running code, pausing,
resuming and killing it. No request may fail."""

import os
import sys
import threading
import time

from e2b_code_interpreter import Sandbox

N = int(os.environ.get("CLIENTS", "20"))
errors = []
timings = []


def client(i):
    try:
        t0 = time.monotonic()
        sbx = Sandbox.create(metadata={"client": str(i)})
        sbx.run_code(f"v = {i} * 2")
        assert sbx.pause() is True
        sbx = Sandbox.connect(sbx.sandbox_id)
        ex = sbx.run_code("print(v)")
        assert ex.logs.stdout == [f"{i * 2}\n"], ex.logs
        assert sbx.kill() is True
        timings.append(time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        errors.append(f"client {i}: {type(e).__name__}: {e}")


threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
t0 = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"{N} clients in {time.monotonic() - t0:.1f}s; each {min(timings or [0]):.1f}-{max(timings or [0]):.1f}s", flush=True)
if errors:
    print("\n".join(errors))
    sys.exit(1)
left = Sandbox.list().next_items()
assert left == [], f"sandboxes left behind: {[s.sandbox_id for s in left]}"
print("OK")

"""Listing through the SDK: metadata filters (quoted keys and values
included), state, template and started_after filters, and pages of a
given size with next tokens, oldest start first."""

import time
from datetime import datetime, timedelta, timezone

from e2b import SandboxQuery, SandboxState
from e2b_code_interpreter import Sandbox

tag = {"suite": "paging", "odd key": "a+b/é"}
before = datetime.now(timezone.utc) - timedelta(seconds=5)
sbxs = []
for i in range(3):
    sbxs.append(Sandbox.create(metadata={**tag, "n": str(i)}))
    time.sleep(0.01)
ids = [s.sandbox_id for s in sbxs]
assert sbxs[1].pause() is True


def listed(**query):
    p = Sandbox.list(query=SandboxQuery(**query))
    items = p.next_items()
    while p.has_next:
        items += p.next_items()
    return [s.sandbox_id for s in items]


p = Sandbox.list(query=SandboxQuery(metadata=tag), limit=2)
page1 = p.next_items()
assert len(page1) == 2 and p.has_next, page1
page2 = p.next_items()
assert len(page2) == 1 and not p.has_next, page2
assert [s.sandbox_id for s in page1 + page2] == ids, (page1, page2, ids)
assert page1[0].metadata == {**tag, "n": "0"}, page1[0].metadata

assert listed(metadata={**tag, "n": "1"}) == [ids[1]]
assert listed(metadata=tag, state=[SandboxState.PAUSED]) == [ids[1]]
assert listed(metadata=tag, state=[SandboxState.RUNNING]) == [ids[0], ids[2]]
assert listed(metadata={"suite": "nope"}) == []
assert listed(metadata=tag, template="code-interpreter-v1") == ids
assert listed(metadata=tag, template="other") == []
assert listed(metadata=tag, started_after=before) == ids
assert listed(metadata=tag, started_after=datetime.now(timezone.utc) + timedelta(hours=1)) == []

for sid in ids:
    assert Sandbox.kill(sid) is True
assert listed(metadata=tag) == []
print("OK")

"""Bad requests get a 4xx JSON error and leave the server healthy."""

import os

import httpx
from e2b_code_interpreter import Sandbox

API = os.environ["E2B_API_URL"]
KEY = os.environ["E2B_API_KEY"]
H = {"X-API-KEY": KEY}
c = httpx.Client(base_url=API, timeout=60)


def expect(resp, status):
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body.get("code"), int) and isinstance(body.get("message"), str), body
    return body


expect(c.post("/v2/sandboxes", content=b"{not json", headers={**H, "Content-Type": "application/json"}), 400)
expect(c.post("/v2/sandboxes", json={"templateID": 5}, headers=H), 400)
expect(c.post("/v2/sandboxes", json={"templateID": "base", "timeout": "soon"}, headers=H), 400)
expect(c.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"a": 1}}, headers=H), 400)
expect(c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 10**9}, headers=H), 400)
expect(c.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"dormouse.owner": "x"}}, headers=H), 400)
expect(c.post("/v2/sandboxes", json={"templateID": "no-such-template"}, headers=H), 404)
expect(c.post("/v2/sandboxes", json={"templateID": "base"}), 401)
expect(c.post("/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": "wrong"}), 401)
expect(c.get("/v2/sandboxes", headers={"X-API-KEY": "wrong"}), 401)
expect(c.post("/v2/sandboxes", content=b"{" + b" " * (1 << 20) + b"}", headers={**H, "Content-Type": "application/json"}), 413)
expect(c.get("/no/such/route", headers=H), 404)
expect(c.get("/sandboxes/not-an-id", headers=H), 404)
expect(c.delete("/sandboxes/../../etc", headers=H), 404)
expect(c.post("/v2/sandboxes/0123456789abcdef0123/connect", json={}, headers=H), 404)
expect(c.get("/v2/sandboxes?state=sleeping", headers=H), 400)
expect(c.get("/v2/sandboxes?limit=0", headers=H), 400)
expect(c.get("/v2/sandboxes?nextToken=garbage", headers=H), 400)

sbx = Sandbox.create()
sid = sbx.sandbox_id
data = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
info = c.post(f"/v2/sandboxes/{sid}/connect", json={}, headers=H).json()
tok = {"X-Access-Token": info["envdAccessToken"]}
# Another key's sandbox is invisible, and data-plane calls need its token.
other = {"X-API-KEY": os.environ["E2B_OTHER_KEY"]}
expect(c.get(f"/sandboxes/{sid}", headers=other), 404)
expect(c.delete(f"/sandboxes/{sid}", headers=other), 404)
assert sid not in [s["sandboxID"] for s in c.get("/v2/sandboxes", headers=other).json()]
expect(c.get("/files", params={"path": "/etc/hostname"}, headers=data), 401)
expect(c.get("/files", params={"path": "/etc/hostname"}, headers={**data, "X-Access-Token": "nope"}), 401)
# Paths that climb out of the root, missing ones, directories.
expect(c.get("/files", params={"path": "/../../etc/passwd"}, headers={**data, **tok}), 400)
expect(c.get("/files", params={"path": "../../../../x"}, headers={**data, **tok}), 400)
expect(c.post("/files", params={"path": "/../x"}, content=b"x", headers={**data, **tok, "Content-Type": "application/octet-stream"}), 400)
expect(c.get("/files", params={"path": "/no/such/file"}, headers={**data, **tok}), 404)
expect(c.get("/files", params={"path": "/etc"}, headers={**data, **tok}), 400)
expect(c.get("/files", headers={**data, **tok}), 400)
r = c.post("/filesystem.Filesystem/Stat", content=b"{bad", headers={**data, **tok, "Content-Type": "application/json"})
assert r.status_code == 400 and r.json()["code"] == "invalid_argument", r.text
r = c.post("/filesystem.Filesystem/Nope", json={}, headers={**data, **tok})
assert r.status_code == 501 and r.json()["code"] == "unimplemented", r.text
expect(c.get("/files", params={"path": "/x"}, headers={"E2b-Sandbox-Id": "bad", "E2b-Sandbox-Port": "49983"}), 502)
expect(c.get("/files", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "99999"}), 400)
# Still healthy and the sandbox still works.
assert c.get("/health").status_code == 200
assert sbx.commands.run("echo alive").stdout == "alive\n"
sbx.kill()
print("OK")

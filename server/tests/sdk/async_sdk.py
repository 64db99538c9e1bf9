"""The asynchronous SDK: run code, watch a directory (the WatchDir
stream), commands, pause and connect."""

import asyncio

from e2b_code_interpreter import AsyncSandbox


async def main():
    sbx = await AsyncSandbox.create()
    ex = await sbx.run_code("a = 6 * 7; a")
    assert ex.text == "42", ex
    events = []
    watch = await sbx.files.watch_dir("/home/user", on_event=events.append)
    await sbx.files.write("/home/user/w.txt", "x")
    for _ in range(120):
        if any(e.name == "w.txt" for e in events):
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"no event for w.txt: {events}")
    await watch.stop()
    r = await sbx.commands.run("echo async")
    assert r.stdout == "async\n", r
    assert await sbx.pause() is True
    sbx = await AsyncSandbox.connect(sbx.sandbox_id)
    assert (await sbx.run_code("a")).text == "42"
    assert await sbx.kill() is True


asyncio.run(main())
print("OK")

# The code-interpreter driver of dormouse-agent (see guest/agent/src/interp.rs).
#
# One long-lived python3 per context runs this script, started as
#   python3 -u -c BOOTSTRAP <this source>
# with fd 0 = /dev/null, fds 1 and 2 = pipes the agent forwards as the run's
# Stdout/Stderr frames, fd 3 = requests and fd 4 = events, one JSON object a
# line each way:
#   requests: {"code": "...", "env": [["NAME", "value"], ...]}
#   events:   {"t": "ready"} once at start, then per request:
#             [{"t": "result", "text": ...}] [{"t": "error", "name": ...,
#             "value": ..., "traceback": ...}] {"t": "end"}
# stdout and stderr are flushed before each event, so the agent, which
# drains the output pipes before forwarding an event, keeps the order.
#
# SIGINT (the agent's timeout or a host that went away) raises
# KeyboardInterrupt in the user's code only: it is ignored while idle and
# remembered while a request is being prepared.

import ast
import json
import linecache
import os
import signal
import sys
import types

_REQUESTS_FD = 3
_EVENTS_FD = 4
_MAX_REQUEST = 8 << 20
# Characters kept of the texts sent back (the agent caps bytes too).
_MAX_RESULT = 160 * 1024
_MAX_NAME = 256
_MAX_VALUE = 64 * 1024
_MAX_TRACEBACK = 96 * 1024
_CO_COROUTINE = 0x80
_FLAGS = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
_DRIVER_FILE = sys._getframe().f_code.co_filename

_IDLE, _PREPARING, _RUNNING = 0, 1, 2
_state = _IDLE
_interrupted = False
_loop = None


def _on_sigint(signum, frame):
    global _interrupted
    if _state == _RUNNING:
        raise KeyboardInterrupt
    if _state == _PREPARING:
        _interrupted = True


def _enter_running():
    global _state
    _state = _RUNNING
    if _interrupted:
        raise KeyboardInterrupt


def _send(event):
    data = (json.dumps(event) + "\n").encode("ascii")
    while data:
        data = data[os.write(_EVENTS_FD, data):]


def _clean(text, limit, keep_tail=False):
    # Lone surrogates are not valid UTF-8 (nor valid JSON for the agent).
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = len(text) - limit
        if keep_tail:
            text = "[... %d characters cut ...]\n%s" % (cut, text[-limit:])
        else:
            text = "%s... [%d characters cut]" % (text[:limit], cut)
    return text


def _flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _execute(code, ns):
    global _loop
    if code.co_flags & _CO_COROUTINE:
        if _loop is None:
            import asyncio

            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
        return _loop.run_until_complete(eval(code, ns))
    return eval(code, ns)


def _strip(te, seen):
    import traceback

    while te is not None and id(te) not in seen:
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != _DRIVER_FILE]
        )
        if te.__cause__ is not None:
            _strip(te.__cause__, seen)
        te = te.__context__


def _describe(exc):
    name = type(exc).__name__
    try:
        value = str(exc)
    except BaseException:
        value = "<unprintable %s object>" % name
    try:
        import traceback

        te = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
        _strip(te, set())
        text = "".join(te.format())
    except BaseException:
        text = ""
    return {
        "t": "error",
        "name": _clean(name, _MAX_NAME),
        "value": _clean(value, _MAX_VALUE),
        "traceback": _clean(text, _MAX_TRACEBACK, keep_tail=True),
    }


def _run(ns, code, number):
    """Runs one cell; returns the events that report it."""
    global _state
    filename = "<cell %d>" % number
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = compile(code, filename, "exec", ast.PyCF_ONLY_AST | _FLAGS)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", _FLAGS)
        tail = compile(last, filename, "eval", _FLAGS) if last is not None else None
        _enter_running()
        try:
            _execute(body, ns)
            value = _execute(tail, ns) if tail is not None else None
            text = None if value is None else repr(value)
        finally:
            _state = _PREPARING
        if text is None:
            return []
        return [{"t": "result", "text": _clean(text, _MAX_RESULT)}]
    except BaseException as exc:
        _state = _PREPARING
        return [_describe(exc)]


def _apply_env(env):
    saved = []
    for name, value in env:
        saved.append((name, os.environ.get(name)))
        os.environ[name] = value
    return saved


def _restore_env(saved):
    for name, value in reversed(saved):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def main():
    global _state, _interrupted
    signal.signal(signal.SIGINT, _on_sigint)
    for fd in (_REQUESTS_FD, _EVENTS_FD):
        os.set_inheritable(fd, False)
    # The user's code runs in a module of its own that is `__main__` (so
    # pickle finds its classes); the driver's globals stay out of sight.
    user = types.ModuleType("__main__")
    user.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = user
    ns = user.__dict__
    requests = open(_REQUESTS_FD, "rb", buffering=1 << 20)
    # Whole lines: `print(x)` is one write ("42\n"), not two ("42", "\n"),
    # so readers see the lines a notebook would; a partial line goes at
    # the end of the run (_flush) or when the code flushes.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):
            pass
    _send({"t": "ready"})
    number = 0
    while True:
        _state = _IDLE
        _interrupted = False
        line = requests.readline(_MAX_REQUEST)
        _state = _PREPARING
        if not line:
            return 0
        if not line.endswith(b"\n"):
            sys.stderr.write("dormouse driver: request line too long\n")
            return 2
        request = json.loads(line)
        number += 1
        saved = _apply_env(request.get("env") or [])
        try:
            events = _run(ns, request["code"], number)
        finally:
            _restore_env(saved)
        _flush()
        for event in events:
            _send(event)
        _send({"t": "end"})


sys.exit(main())

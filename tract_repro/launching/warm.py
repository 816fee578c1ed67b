"""Warm-started stage processes: ``python -m tract_repro.warm [--] CMD [ARG ...]`` (the server and its client).

Runs CMD (e.g. ``dvc repro digits_table1``) beside a server that has imported torch,
torch._dynamo (which ``torch.optim`` loads), clean-fid and the entry points once.  Each entry point
starts with ``warm.forward(__name__, __spec__)``: run as ``python -m tract_repro.X`` inside CMD, it
hands its arguments, working directory, environment and stdin/stdout/stderr to the server, which
forks a child that runs the module as ``python -m`` would; the client exits with the child's
status.  Signals sent to the client reach the child, and a client that dies takes its child with it.
A digits pipeline starts ~90 such processes, each ~4-6 s of imports before any work (measured in
``benchmarks/digits_overheads.py --only warm``).

A client runs its module itself, as without the server, when ``$TRACT_WARM`` names no server, the
server cannot be reached, or the two processes differ in what the server fixed when it imported:
the interpreter and its options, ``sys.path``, the tract_repro sources (paths, sizes, modification
times) and the environment variables that libraries read as they load (:data:`LOAD_TIME_ENV`).
Only Linux serves (elsewhere CMD runs alone): it forks a process that has loaded torch, as the
launcher does for its seeds.
"""
import hashlib
import json
import os
import selectors
import signal
import socket
import sys
from pathlib import Path

from tract_repro.common.cli import command

ENV = "TRACT_WARM"  # the server's socket, set in CMD's environment
# What the entry points import, not the entry points themselves: `python -m X` runs X as a fresh
# __main__, so a server that had imported X (and registered its gin configurables) could not serve it.
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "tract_repro.config", "tract_repro.launching.seeds", "tract_repro.evaluation.frechet",
           "tract_repro.evaluation.generate", "tract_repro.evaluation.runs", "tract_repro.sampling.images",
           "tract_repro.results.experiments", "cleanfid.fid", "matplotlib", "pandas", "tabulate")
LOAD_TIME_ENV = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "CUDA_", "CUBLAS", "CUDNN", "NCCL_",
                 "TORCH", "PYTORCH_", "LD_", "LANG", "LC_")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_served = False  # True in a child the server forked


def served():
    """Whether this process is a child of a warm server."""
    return _served


def identity():
    """What a server fixed when it imported its libraries: a client is served only if it matches."""
    sources = hashlib.sha256()
    for path in sorted(Path(__file__).parents[1].rglob("*.py")):  # every tract_repro source
        stat = path.stat()
        sources.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"python": sys.executable, "flags": list(sys.flags), "warnoptions": sys.warnoptions,
            "xoptions": {k: str(v) for k, v in sys._xoptions.items()}, "path": sys.path,
            "sources": sources.hexdigest(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(LOAD_TIME_ENV)}}


def _send(conn, message, fds=()):
    data = (json.dumps(message) + "\n").encode()
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.sendall(data)


def _receive(conn, maxfds=0):
    """(one newline-terminated JSON message, the up to ``maxfds`` descriptors sent with it); None at EOF."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, received, _, _ = socket.recv_fds(conn, 1 << 16, maxfds)
        fds += received
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        data += chunk
    return json.loads(data), fds


def forward(name, spec):
    """Called first by an entry point: as ``__main__`` with a warm server named in ``$TRACT_WARM``,
    run there and exit with its status; otherwise return, and the caller runs cold."""
    if name != "__main__" or spec is None or _served or not os.environ.get(ENV):
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.environ[ENV])
        _send(conn, {"module": spec.name, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
                     "identity": identity()}, fds=(0, 1, 2))
        reply, _ = _receive(conn)
    except OSError:  # no server (gone, or never started) or a closed standard stream: run cold
        conn.close()
        return
    if not reply or not reply.get("pid"):
        conn.close()
        if reply:
            print(f"warm start skipped ({reply.get('why')}); running cold", file=sys.stderr, flush=True)
        return
    pid = reply["pid"]
    for number in FORWARDED:
        signal.signal(number, lambda number, frame: os.kill(pid, number))
    try:
        done, _ = _receive(conn)
    except OSError:
        done = None
    if done is None:
        print(f"warm server went away while running {spec.name}", file=sys.stderr, flush=True)
        os._exit(1)
    code = os.waitstatus_to_exitcode(done["status"])
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _run_child(request, loaded, fds, closing):
    """In the forked child: become the client's ``python -m MODULE ARGV`` and run it (``loaded``: the
    environment variables the server's imports set, as the client's own imports would have)."""
    global _served
    import io
    import random
    import runpy
    import traceback

    from tract_repro.launching.process import exit_now

    os.setpgid(0, 0)  # signals come through the client only (not twice from a terminal)
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, *FORWARDED):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in closing:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    streams = []
    for fd, like in enumerate((sys.stdin, sys.stdout, sys.stderr)):  # as the interpreter opens them
        raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        streams.append(io.TextIOWrapper(buffered, encoding=like.encoding, errors=like.errors,
                                        line_buffering=fd == 2 or raw.isatty(), write_through=unbuffered and fd > 0))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in loaded.items():
        os.environ.setdefault(key, value)
    sys.argv = ["-m", *request["argv"]]
    random.seed()  # a fresh interpreter's unseeded generators differ per process
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    _served = True
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:  # noqa: B036 -- as the interpreter does: traceback, status 1
        traceback.print_exc()
        code = 1
    exit_now(code)


def serve(cmd):
    """Run ``cmd`` with a warm server beside it until it exits; return its exit status."""
    import importlib
    import subprocess
    import tempfile

    if not sys.platform.startswith("linux"):
        return subprocess.call(cmd)
    directory = tempfile.mkdtemp(prefix="tract-warm-")
    path = os.path.join(directory, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    try:
        command = subprocess.Popen(cmd, env=dict(os.environ, **{ENV: path}))
    except OSError as error:
        listener.close()
        os.unlink(path)
        os.rmdir(directory)
        print(f"cannot run {cmd[0]!r}: {error.strerror}", file=sys.stderr)
        return 127
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the command and the clients
    signal.signal(signal.SIGTERM, lambda number, frame: command.send_signal(number))
    mine, before = identity(), dict(os.environ)  # a client calls forward() in this state
    for module in PRELOAD:  # while the command starts; a client arriving meanwhile waits in the backlog
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    loaded = {k: v for k, v in os.environ.items() if before.get(k) != v}  # e.g. TORCHINDUCTOR_CACHE_DIR
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children = {}  # pid -> the client's connection
    try:
        while command.poll() is None:
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is listener:
                    _accept(listener, mine, loaded, children, selector,
                            closing=(listener.fileno(), wake_r, wake_w, selector.fileno()))
                elif key.fileobj == wake_r:
                    os.read(wake_r, 512)
                else:  # a client's connection only ever closes: its process ended, so its child must too
                    selector.unregister(key.fileobj)
                    _kill(key.data)
            for pid, conn in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del children[pid]
                    if _registered(selector, conn):
                        selector.unregister(conn)
                    try:
                        _send(conn, {"status": status})
                    except OSError:
                        pass
                    conn.close()
    finally:
        for pid in children:
            _kill(pid)
        listener.close()
        os.unlink(path)
        os.rmdir(directory)
    return command.wait()


def _registered(selector, conn):
    try:
        selector.get_key(conn)
        return True
    except KeyError:
        return False


def _kill(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _accept(listener, mine, loaded, children, selector, closing):
    conn, _ = listener.accept()
    conn.settimeout(30)
    try:
        request, fds = _receive(conn, maxfds=3)
    except (OSError, ValueError):
        conn.close()
        return
    if request is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    theirs = request["identity"]
    why = next((f"{key} differs from the server's" for key in mine if theirs.get(key) != mine[key]), None)
    if why is None and request["module"] in sys.modules:
        why = f"the server has imported {request['module']} itself"
    if why:
        for fd in fds:
            os.close(fd)
        _send(conn, {"why": why})
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(request, loaded, fds, closing=(*closing, *(c.fileno() for c in children.values()), conn.fileno()))
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    selector.register(conn, selectors.EVENT_READ, data=pid)
    try:
        _send(conn, {"pid": pid})
    except OSError:
        _kill(pid)


@command
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m tract_repro.warm [--] CMD [ARG ...]")
        return 0 if argv else 2
    code = serve(argv)
    return 128 - code if code < 0 else code

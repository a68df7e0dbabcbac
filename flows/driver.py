"""A project's driver: one long-lived process that runs the `rae stage` commands of a project.

`dvc repro` starts one `rae stage` process per stage. Each would import torch, Prefect and
MLflow again (~4 s) and open a new Ray job whose workers start and import the stages' code
again. Instead the first `rae stage` of a project starts this driver and hands it its command;
every later `rae stage` hands over its command too: its argv, its environment and its terminal
(stdin, stdout and stderr, passed as file descriptors over a Unix socket), then exits with the
command's exit code. The stages thus share one Ray job with warm workers, as under `rae run`.

A driver serves one command at a time, and only commands of its own project folder, Python,
code (the modules' sizes and times) and import-time settings (RAE_*, PREFECT_*, MLFLOW_*,
RAY_*, threads, CUDA): anything else starts a new driver in its place. It is recorded in
`$PREFECT_HOME/services.json` beside the shared Prefect server and Ray head, and stops with
them (flows.services' watchdog) or after as long without a command. A command sent while it is
busy runs in its own process as before (and meets the project's lock). RAE_DRIVER=0, or
RAE_SERVICES_IDLE_S=0, runs every command in its own process.

    python -m flows.driver serve ROOT ADDRESS    the driver (started by `hand_over`)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from flows import services

log = logging.getLogger(__name__)
IN_DRIVER = "RAE_IN_DRIVER"  # set in the driver: its commands run in it, never handed on
START_TIMEOUT_S = 30.0
# settings read when a module is imported or Ray is joined: a driver serves only their values
IMPORT_TIME = ("RAE_", "PREFECT_", "MLFLOW_", "RAY_", "OMP_", "MKL_", "CUDA_", "NCCL_", "TORCH",
               "PYTORCH_", "HF_", "PYTHON", "LD_", "GIT_")
PER_COMMAND = ("RAE_T0",)  # the command's own start time


def enabled() -> bool:
    return (os.environ.get("RAE_DRIVER", "1") != "0" and not os.environ.get(IN_DRIVER)
            and services.idle_timeout() > 0)


def identity(root: Path) -> str:
    """What a driver must share with a command to run it (see the module's docstring)."""
    h = hashlib.sha256(f"{sys.executable}\0{Path(root).resolve()}".encode())
    for package in ("flows", "rae_core"):
        base = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for f in sorted(base.rglob("*.py")):
            st = f.stat()
            h.update(f"{f}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    for key in sorted(os.environ):
        if key.startswith(IMPORT_TIME) and key not in PER_COMMAND:
            h.update(f"{key}={os.environ[key]}\0".encode())
    return h.hexdigest()[:16]


def address_for(home: Path) -> str:
    """The driver's socket: short (a Unix socket path has at most 107 bytes), one per project."""
    tag = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"rae-driver-{os.getuid()}-{tag}.sock")


# ---- the `rae stage` side ----------------------------------------------------------------

def hand_over(argv: list[str], root: Path) -> int | None:
    """Run `argv` in the project's driver, starting one if none serves this command; its exit
    code, or None when the command is to run in this process (no driver, or it is busy)."""
    if not enabled():
        return None
    home = Path(os.environ["PREFECT_HOME"])
    key = identity(root)
    try:
        entry = _driver_for(home, root, key)
        conn = _connect(entry["address"], entry["pid"])
    except OSError as e:
        log.info("rae: no driver (%s); the command runs in this process", e)
        return None
    with conn:
        return _converse(conn, argv, root, entry, home)


def _driver_for(home: Path, root: Path, key: str) -> dict:
    """The recorded driver when it serves `key`; else a new one (the old one asked to stop)."""
    with services._locked(home):
        rec = services.read(home)
        entry = rec.get("driver")
        if entry and entry.get("key") == key and services._pid_alive(entry["pid"]):
            return entry
        if entry and services._pid_alive(entry["pid"]):
            _ask_to_stop(entry)
        address = address_for(home)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        pid = services._spawn([sys.executable, "-m", "flows.driver", "serve", str(root), address],
                              home / "services" / "driver.log")
        rec["driver"] = {"pid": pid, "address": address, "key": key, "root": str(root),
                         "launched": time.time()}
        services._write(home, rec)
        return rec["driver"]


def _ask_to_stop(entry: dict) -> None:
    """A driver of other code or settings: it ends once idle (a busy one finishes first)."""
    with contextlib.suppress(OSError), _connect(entry["address"], entry["pid"], 2.0) as conn:
        _send(conn, {"stop": True}, [])


def _connect(address: str, pid: int, timeout_s: float = START_TIMEOUT_S) -> socket.socket:
    """Connect to a driver's socket, waiting while a new driver starts listening."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(address)
            return conn
        except OSError:
            conn.close()
            if not services._pid_alive(pid) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _converse(conn: socket.socket, argv: list[str], root: Path, entry: dict,
              home: Path) -> int | None:
    """Send the command with this process's terminal; relay Ctrl-C; return its exit code."""
    with contextlib.ExitStack() as stack:
        fds = [fd if _is_open(fd) else stack.enter_context(open(os.devnull, "r+b")).fileno()
               for fd in (0, 1, 2)]
        _send(conn, {"argv": argv, "env": dict(os.environ), "cwd": str(root)}, fds)

    def relay(signum, _frame) -> None:  # the driver runs in its own session: no terminal signals
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGINT)

    previous = {sig: signal.signal(sig, relay)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    reply = _await_reply(conn, entry, home, watch_ray="RAY_ADDRESS" not in os.environ)
    if reply is None:
        print(f"rae: error: the project's driver (pid {entry['pid']}) ended during the command; "
              f"its log: {home / 'services' / 'driver.log'}", file=sys.stderr)
        return 1
    if reply.get("busy"):  # the command runs here after all: its signals are its own again
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return None
    return int(reply["rc"])


def _await_reply(conn: socket.socket, entry: dict, home: Path, watch_ray: bool,
                 poll_s: float = 2.0, grace_s: float = 10.0) -> dict | None:
    """The driver's reply. When the command uses the project's Ray head (`watch_ray`) and the
    head, having answered, stops answering for `grace_s` without the driver reporting it (its own
    watch is a thread of a process that Ray's client may hold for a minute), this prints the
    line the driver would have printed and kills the driver, as its own watch would have."""
    conn.settimeout(poll_s)
    seen, lost_since, data = None, None, b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            head = services.read(home).get("ray") if watch_ray else None
            if head and services._accepts(head["address"], timeout=poll_s):
                seen, lost_since = head["address"], None
            elif head and head["address"] == seen:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > grace_s:
                    print(services.ray_head_lost_line(seen), file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(entry["pid"], signal.SIGKILL)
                    return {"rc": 1}
            continue
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _send(conn: socket.socket, message: dict, fds: list[int]) -> None:
    payload = json.dumps(message).encode()
    socket.send_fds(conn, [len(payload).to_bytes(8, "big")], fds)
    conn.sendall(payload)


# ---- the driver's side ---------------------------------------------------------------------

_current: socket.socket | None = None  # the connection of the command being run


def ending(rc: int) -> None:
    """Tell the command's sender its exit code now: the driver is about to end (os._exit)."""
    if _current is not None:
        with contextlib.suppress(OSError):
            _current.sendall(json.dumps({"rc": rc}).encode() + b"\n")


def serve(root: Path, address: str) -> None:
    """Accept commands until the watchdog stops this process, until a driver of other code or
    settings replaces it, or until it has had none for the services' idle timeout."""
    sys.stdout.reconfigure(line_buffering=True)  # a command's lines reach its terminal as made
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket runs commands: its owner's only
    try:
        listener.bind(address)
    finally:
        os.umask(old_umask)
    mine = os.stat(address).st_ino  # a driver that replaced this one may reuse the path
    listener.listen(8)
    commands: queue.Queue = queue.Queue()
    busy, stop = threading.Event(), threading.Event()

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            try:
                message, fds = _receive(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            if message.get("stop"):
                stop.set()
                if not busy.is_set():
                    commands.put(None)
                conn.close()
            elif busy.is_set() or stop.is_set():
                _close_all(fds)
                with contextlib.suppress(OSError):
                    conn.sendall(b'{"busy": true}\n')
                conn.close()
            else:
                busy.set()
                commands.put((conn, message, fds))

    threading.Thread(target=accept, name="driver-accept", daemon=True).start()
    log.info("driver for %s listening on %s", root, address)
    idle_s = services.idle_timeout() + 30.0  # the watchdog stops it first, with the services
    try:
        while not stop.is_set():
            try:
                item = commands.get(timeout=idle_s)
            except queue.Empty:
                break
            if item is None:
                break
            try:
                if not _run(*item):
                    break
            finally:
                busy.clear()
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(address).st_ino == mine:
                os.unlink(address)
        log.info("driver for %s ended", root)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10.0)
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size, payload = int.from_bytes(header, "big"), b""
    while len(payload) < size:
        chunk = conn.recv(min(1 << 16, size - len(payload)))
        if not chunk:
            _close_all(fds)
            raise ValueError("connection closed mid-message")
        payload += chunk
    conn.settimeout(None)
    return json.loads(payload), list(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run(conn: socket.socket, message: dict, fds: list[int]) -> bool:
    """One command with the sender's terminal and environment; False: this driver should end
    (the command was interrupted, or it broke in a way that may have left state behind)."""
    global _current
    from flows import cli, source

    saved = [os.dup(fd) for fd in (0, 1, 2)]
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
    _close_all(fds)
    os.environ.clear()
    os.environ.update(message["env"])
    os.environ[IN_DRIVER] = "1"
    os.chdir(message["cwd"])
    done = threading.Event()
    _current = conn
    threading.Thread(target=_interrupt_when_gone, args=(conn, done), daemon=True).start()
    keep = True
    source.git_source.cache_clear()  # a commit or an edited params.yaml since the last command
    try:
        rc = cli.main(message["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:
        rc, keep = 130, False
    except BaseException:  # noqa: BLE001 - cli.main reports its own errors; this is a bug
        log.exception("driver: %s", " ".join(message["argv"]))
        rc, keep = 1, False
    finally:
        done.set()
        _current = None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, target in zip(saved, (0, 1, 2), strict=True):
            os.dup2(fd, target)
        _close_all(saved)
    services.release(Path(os.environ["PREFECT_HOME"]), os.getpid())
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")
    conn.close()
    return keep


def _interrupt_when_gone(conn: socket.socket, done: threading.Event) -> None:
    """The sender was killed: stop its command as its own process would have stopped."""
    with contextlib.suppress(OSError):
        while not done.is_set():
            if conn.recv(1, socket.MSG_PEEK) == b"":
                break
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGINT)


def _log_to_file(path: Path) -> None:
    """The driver's own lines go to its log: its stderr is each command's while it runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 4:
        sys.exit("usage: python -m flows.driver serve ROOT ADDRESS")
    # run as flows.driver, not __main__: cli's `driver.ending` must see this module's command
    from flows import driver

    driver._log_to_file(Path(os.environ["PREFECT_HOME"]) / "services" / "driver.log")
    driver.serve(Path(sys.argv[2]), sys.argv[3])

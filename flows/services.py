"""A local Prefect server and Ray head that the `rae` processes of one project share.

`dvc repro` runs one `rae stage` process per stage; each would otherwise start its own temporary
Prefect server (~8-13 s) and local Ray (~10 s). The first `rae run` or `rae stage` starts both as
background processes, side by side and while it goes on importing and opening the tracking store,
and records them in `$PREFECT_HOME/services.json`; later ones join them while they answer. A
watchdog stops them once no `rae` process has used them for RAE_SERVICES_IDLE_S seconds (0:
nothing shared, each process starts its own). PREFECT_API_URL or RAY_ADDRESS set by a
deployment or a team wins: that service is then neither started nor joined here.

    python -m flows.services watch HOME    the watchdog (started by `attach`)
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from flows import stores
from flows.env import project_home
from rae_core.errors import RaeError

log = logging.getLogger(__name__)
RECORD = "services.json"
START_TIMEOUT_S = 120.0
# what services.json may record, each stopped as a process group: the driver first (flows.driver),
# the watchdog before what it minds
RECORDED = ("driver", "watchdog", "prefect", "ray")
_released_at_exit: set[Path] = set()
_watching_ray = False


def idle_timeout() -> float:
    return float(os.environ.get("RAE_SERVICES_IDLE_S", "120"))


def attach(command: str, root: Path, cfg, wait: bool = True) -> Callable[[], None]:
    """Point this `rae run`/`rae stage` at the project's shared services, starting those that do
    not answer. Returns a function that waits until they all do: with `wait=False` the caller
    does its own start-up work first (imports, the tracking store) while they boot."""
    if command not in ("run", "stage"):
        return _nothing
    share_checkpoints(root)
    if not (os.environ.get("PREFECT_API_URL") or
            os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")):
        stores.seed("prefect", Path(os.environ["PREFECT_HOME"]) / "prefect.db")
    if idle_timeout() <= 0:
        return _nothing
    wanted = [name for name, var in (("prefect", "PREFECT_API_URL"), ("ray", "RAY_ADDRESS"))
              if not os.environ.get(var)]
    if not wanted:
        return _nothing
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    home = Path(os.environ["PREFECT_HOME"])
    with _locked(home):
        rec = read(home)
        fresh = [n for n in wanted if not (answers(n, rec.get(n)) or _starting(rec.get(n)))]
        for name in fresh:
            _stop(rec.pop(name, None))
        rec.update(_launch(fresh, home, max(os.cpu_count() or 1, need)))
        if not answers("watchdog", rec.get("watchdog")):
            rec["watchdog"] = {"pid": _spawn([sys.executable, "-m", "flows.services", "watch",
                                              str(home)], home / "services" / "watchdog.log", mode="a")}
        rec["users"] = [p for p in rec.get("users", []) if _pid_alive(p)] + [os.getpid()]
        rec["touched"], rec["idle_s"] = time.time(), idle_timeout()  # the latest user's setting
        _write(home, rec)
    if home not in _released_at_exit:  # a driver attaches once per command
        _released_at_exit.add(home)
        atexit.register(release, home, os.getpid())
    if "prefect" in wanted:
        os.environ["PREFECT_API_URL"] = rec["prefect"]["url"]
        if context := sys.modules.get("prefect.context"):  # imported by an earlier command
            context.refresh_global_settings_context()
    if "ray" in wanted and rec["ray"]["num_cpus"] >= need:
        os.environ["RAE_LOCAL_RAY"] = rec["ray"]["address"]  # read by ensure_ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("rae: using %s", ", ".join(f"{n} {rec[n].get('url') or rec[n].get('address')}"
                                        for n in wanted))

    def ready() -> None:
        _await({n: rec[n] for n in wanted}, home)
        with _locked(home):  # answered once: from now on, silence means it is gone
            now = read(home)
            for n in wanted:
                if now.get(n, {}).get("pid") == rec[n]["pid"]:
                    now[n]["ready"] = True
            if now:
                _write(home, now)

    if wait:
        ready()
    return ready


def _nothing() -> None:
    return None


def _starting(entry: dict | None) -> bool:
    """Launched by another process moments ago and still booting: join it, do not replace it."""
    return bool(entry and not entry.get("ready") and _pid_alive(entry["pid"]) and
                time.time() - entry.get("launched", 0) < START_TIMEOUT_S)


def share_checkpoints(root: Path) -> None:
    """In the copy `dvc exp run --temp/--queue` runs in, runs/checkpoints is the project's:
    the experiment resumes from, and leaves, checkpoints where its next run finds them."""
    home, root = project_home(root), Path(root).resolve()
    link = root / "runs" / "checkpoints"
    if home == root or link.exists() or link.is_symlink():
        return
    target = home / "runs" / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def read(home: Path) -> dict:
    try:
        return json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def answers(name: str, entry: dict | None) -> bool:
    """Whether a recorded service still runs and accepts connections."""
    if not entry or not _pid_alive(entry["pid"]):
        return False
    if name == "prefect":
        try:
            # a generous timeout: on busy cores a live server can take seconds to answer
            with urllib.request.urlopen(entry["url"] + "/health", timeout=20) as resp:
                return resp.status == 200
        except OSError:
            return False
    if name == "ray":
        return _accepts(entry["address"], timeout=20)
    return True


def _accepts(address: str, timeout: float) -> bool:
    """Whether host:port accepts a TCP connection."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "services.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write(home: Path, rec: dict) -> None:
    tmp = home / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, home / RECORD)


def release(home: Path, pid: int) -> None:
    """The watchdog counts idle time from the last user's exit (or a driver's last command)."""
    with _locked(home):
        rec = read(home)
        if rec:
            rec["users"] = [p for p in rec.get("users", []) if p != pid]
            rec["touched"] = time.time()
            _write(home, rec)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a stopped child of this process lingers as a zombie until reaped
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


# Ports a server is started on: above Ray's worker ports (10002-19999) and below Linux's
# ephemeral range (32768-60999), from which the kernel hands out port 0 and outgoing connections.
# A port freed by binding port 0 can be taken again by any process starting meanwhile (a Ray head
# opens a dozen such ports) before the server that was meant to have it binds it.
SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port in SERVER_PORTS that nothing listens on now."""
    import random

    tries = min(200, len(SERVER_PORTS))
    for port in random.sample(SERVER_PORTS, tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RaeError(f"no free loopback port in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1} "
                   f"after {tries} tries; stop the servers that hold them")


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _spawn(cmd: list[str], logfile: Path, env: dict | None = None, mode: str = "w") -> int:
    """A process in its own session (stopped as a group), outliving this one."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, mode) as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True).pid


def _launch(names: list[str], home: Path, num_cpus: int) -> dict:
    """Start the named services side by side, without waiting for them."""
    logs, started = home / "services", {}
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "RAE_LOCAL_RAY")}
    if "prefect" in names:
        port = free_port()
        started["prefect"] = {
            "url": f"http://127.0.0.1:{port}/api",
            "pid": _spawn([_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                           str(port), "--no-ui"], logs / "prefect.log", env)}
    if "ray" in names:
        port = free_port()
        # Ray's sockets live under its temp dir, whose path must stay short.
        temp = Path(tempfile.gettempdir()) / \
            f"rae-ray-{hashlib.sha1(str(home).encode()).hexdigest()[:8]}"
        started["ray"] = {
            "address": f"127.0.0.1:{port}", "num_cpus": num_cpus,
            "pid": _spawn([_tool("ray"), "start", "--head", "--block",
                           "--node-ip-address=127.0.0.1", f"--port={port}",
                           f"--num-cpus={num_cpus}", "--include-dashboard=false",
                           "--disable-usage-stats", f"--temp-dir={temp}"],
                          logs / "ray.log", {**env, "RAY_AUTH_MODE": "disabled"})}
    for entry in started.values():
        entry["launched"] = time.time()
    return started


def _await(services: dict, home: Path) -> None:
    """Wait until each service answers; stop them all and say where to look if one does not."""
    logs, t0 = home / "services", time.time()
    deadline = t0 + START_TIMEOUT_S
    for name, entry in services.items():
        while not (answers(name, entry) and _ready(name, logs)):
            if not _pid_alive(entry["pid"]) or time.time() > deadline:
                for other in services.values():
                    _stop(other)
                raise RaeError(f"{logs / name}.log: the local {name} did not start; see its "
                               "log, or set RAE_SERVICES_IDLE_S=0 to start one per process")
            time.sleep(0.2)
    log.info("rae: %s answered after %.1f s", " and ".join(services), time.time() - t0)


def _ready(name: str, logs: Path) -> bool:
    """Ray's GCS port opens before its raylet is up; `ray start` says when all of it is."""
    return name != "ray" or "Ray runtime started" in (logs / "ray.log").read_text()


def stop_all(home: Path) -> None:
    """Stop everything the project's services.json records (tests, benchmarks, clean-up)."""
    rec = read(home)
    for name in RECORDED:
        _stop(rec.get(name))


def _stop(entry: dict | None) -> None:
    """Stop a service's process group: SIGTERM, then SIGKILL for what is left after 10 s."""
    if not entry:
        return
    pid = entry["pid"]
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.time() + wait_s
        while _group_alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if not _group_alive(pid):
            return


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader where this process started it
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def ray_head_lost_line(address: str) -> str:
    return (f"rae: error: the Ray head at {address} stopped answering during the run; finished "
            "stages and checkpoints are kept: run the same command again to resume from them")


def watch_ray_head(on_lost: Callable[[str], None], poll_s: float = 2.0, misses: int = 3) -> None:
    """From a daemon thread: once this process has joined Ray, call `on_lost(address)` when its
    head stops accepting connections `misses` polls in a row. Ray's own client would end the
    process only after a minute, with its own message ("Failed to connect to GCS"). Once per
    process: a driver runs many commands on one Ray connection."""
    import threading

    global _watching_ray
    if _watching_ray:
        return
    _watching_ray = True

    def loop() -> None:
        while not ((ray := sys.modules.get("ray")) and ray.is_initialized()):
            time.sleep(poll_s)
        address = ray.get_runtime_context().gcs_address
        missed = 0
        while missed < misses:
            time.sleep(poll_s)
            missed = 0 if _accepts(address, timeout=poll_s) else missed + 1
        on_lost(address)

    threading.Thread(target=loop, name="ray-head-watch", daemon=True).start()


def watch(home: Path) -> None:
    """Stop the services once no user has run for the idle timeout, or the record is gone."""
    me, known = os.getpid(), {}
    while True:
        time.sleep(1.0)
        if known and not (home / RECORD).exists():  # the project was removed: none can join
            for name in ("driver", "prefect", "ray"):
                _stop(known.get(name))
            return
        with _locked(home):
            rec = read(home)
            if rec.get("watchdog", {}).get("pid") != me:
                return  # replaced by another watchdog, which minds the services now
            known = rec
            idle = rec.get("idle_s", idle_timeout())
            users = [p for p in rec.get("users", []) if _pid_alive(p)]
            if users:
                rec["users"], rec["touched"] = users, time.time()
                _write(home, rec)
            elif time.time() - rec.get("touched", 0) > idle:
                for name in ("driver", "prefect", "ray"):
                    _stop(rec.get(name))
                (home / RECORD).unlink(missing_ok=True)
                log.info("stopped the shared services after %.0f s idle", idle)
                return


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if sys.argv[1:2] != ["watch"] or len(sys.argv) != 3:
        sys.exit("usage: python -m flows.services watch HOME")
    watch(Path(sys.argv[2]))

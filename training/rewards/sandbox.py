"""A sandbox for model-written code: each program runs in its own process, limited and isolated.

What holds a hostile program (each has a test in tests/test_sandbox.py):

- wall time: the host kills the whole sandbox after `wall_s`; CPU time: RLIMIT_CPU;
- memory: RLIMIT_AS per process (so at most `nproc * memory_mb` in all);
- processes: RLIMIT_NPROC, which the kernel counts per real uid and ignores for root. Every run
  therefore drops to an unprivileged uid of its own (one per pool slot, never shared with another
  process's sandbox), so a fork bomb meets the limit and nothing else of the host is counted;
- files: RLIMIT_FSIZE per file; a throwaway work directory; the sandbox uid cannot write or delete
  anything the host owns, nor read a 0700 home;
- network: none (see isolation below);
- output: stdout and stderr are read up to `output_kb` each, then the run is killed;
- environment: scrubbed (PATH, HOME=work dir, LANG, PYTHON* basics only);
- the interpreter runs with `-I -S` (no site-packages, no user site, no PYTHON* variables).

Isolation modes (`Sandbox.isolation`, chosen once by probing, recorded in docs/decisions.md):

- "namespace" (root with CAP_SYS_ADMIN, as on this machine and in most CI containers run as root):
  fresh mount, network, PID, IPC and UTS namespaces. The network namespace has only a downed
  loopback, so every connect fails; the work directory and /tmp, /var/tmp, /dev/shm are private
  size-capped tmpfs that vanish with the run; /root and /home are hidden; the program is PID 1 of
  its namespace, so when it ends or is killed every process it started dies with it.
- "plain" (root without namespaces): the host makes and deletes the work directory, an audit hook
  installed before the program runs refuses every `socket.*` event (a program that reaches libc
  through ctypes or starts another binary gets past it: weaker, hence only the fallback), and
  after each run every process still owned by the slot's uid is killed.
- not root: no uid to drop to; the limits still apply, RLIMIT_NPROC to the user's own process
  count, so a fork bomb is contained but files are guarded only by the user's own permissions.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
SETUP_FAILED = 125
ISOLATIONS = ("auto", "namespace", "plain")
# Sandbox uids: 1e6 + 64 * host pid + slot. Unique among live processes, so two sandboxes (in two
# test processes, or Ray workers) never share a uid: they would share RLIMIT_NPROC and one's cleanup
# would kill the other's programs. pid_max is at most 2**22, so uids stay below 2**31.
_UID_BASE = 1_000_000
_SLOTS_PER_PROCESS = 64
_slot_lock = threading.Lock()
_uids_in_use: set[int] = set()
_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], str] = {}

# Plain mode only: refuse sockets from inside the interpreter, then run main.py as __main__.
_SOCKET_GUARD = (
    "import sys, runpy\n"
    "def _guard(event, args):\n"
    "    if event.startswith('socket.'):\n"
    "        raise PermissionError('network access is disabled in the sandbox')\n"
    "sys.addaudithook(_guard)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (no usable interpreter, isolation unavailable)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Defaults suit unit-test style tasks (HumanEval: ~50 ms each)."""

    wall_s: float = 10.0      # host-side kill of the whole sandbox
    cpu_s: int = 10           # RLIMIT_CPU of each process
    memory_mb: int = 512      # RLIMIT_AS of each process
    nproc: int = 8            # RLIMIT_NPROC of the sandbox uid (threads count too)
    file_mb: int = 16         # RLIMIT_FSIZE: largest file a program may write
    nofile: int = 64          # RLIMIT_NOFILE
    disk_mb: int = 64         # size of each private tmpfs (namespace mode)
    output_kb: int = 64       # stdout and stderr each; more kills the run

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "nproc", "file_mb", "nofile", "disk_mb", "output_kb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")

    def rlimits(self) -> dict[str, int]:
        mb = 1 << 20
        return {"RLIMIT_CPU": int(self.cpu_s), "RLIMIT_AS": self.memory_mb * mb, "RLIMIT_NPROC": self.nproc,
                "RLIMIT_FSIZE": self.file_mb * mb, "RLIMIT_NOFILE": self.nofile, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class ExecJob:
    """One program: its files (name -> text), the one to run, and what it reads on stdin."""

    files: Mapping[str, str]
    entry: str = "main.py"
    stdin: str | None = None
    limits: SandboxLimits | None = None


@dataclass
class ExecResult:
    """`status`: "ok" (exit 0), "error" (exit != 0), "signal" (killed by a signal: CPU limit, a
    file over RLIMIT_FSIZE, ...), "timeout" (wall time), "output_limit", "setup_error"."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reason(self) -> str:
        """One line for a reward's reason: the status and the last line of stderr."""
        tail = next((ln.strip() for ln in reversed(self.stderr.splitlines()) if ln.strip()), "")
        return f"{self.status}: {tail}"[:300] if tail else self.status


def _world_executable(path: Path) -> bool:
    """Whether an unprivileged uid can run `path`: o+x on the file and on every directory above."""
    path = path.resolve()
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def default_interpreter() -> str:
    """The Python programs run with: this interpreter when any uid may run it, else the system's."""
    candidates = [Path(sys.executable), Path(getattr(sys, "_base_executable", sys.executable)),
                  Path("/usr/bin/python3"), Path("/usr/local/bin/python3")]
    root = os.geteuid() == 0
    for c in candidates:
        if c.exists() and (not root or _world_executable(c)):
            return str(c.resolve())
    raise SandboxError("no Python interpreter that an unprivileged user may run: the current one sits "
                       "under a private directory (e.g. /root/.pyenv); install a system python3 or "
                       "pass Sandbox(python=...)")


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _acquire_uid() -> int:
    """A sandbox uid no other live slot of this process holds (released by `Sandbox.close`)."""
    base = _UID_BASE + _SLOTS_PER_PROCESS * os.getpid()
    with _slot_lock:
        for uid in range(base, base + _SLOTS_PER_PROCESS):
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise SandboxError(f"all {_SLOTS_PER_PROCESS} sandbox uids of this process are in use; close() the "
                       "sandboxes (or CodeVerifiers) you no longer need")


def _release_uid(uid: int) -> None:
    with _slot_lock:
        _uids_in_use.discard(uid)


def _settle(uid: int, wait_s: float = 2.0) -> int:
    """After an abnormal end: kill whatever still runs as `uid` (the launcher normally did) and wait
    for it to be gone, zombies included, since they count against RLIMIT_NPROC. A uid that does not
    clear in time is retired and the slot gets a fresh one."""
    deadline = time.monotonic() + wait_s
    while pids := _processes_of(uid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            log.warning("sandbox: %d processes of uid %d outlived their run; the slot moves to a new uid "
                        "(the old one stays reserved)", len(pids), uid)
            return _acquire_uid()
        time.sleep(0.01)
    return uid


class Sandbox:
    """Runs programs under `limits`, `workers` at a time (default: one per core).

    `run_python(source)` for one program, `run_many(jobs)` for a batch in parallel. Safe to share
    between threads; `close()` (or a `with` block) stops the pool.
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None,
                 isolation: str = "auto", python: str | None = None) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers or os.cpu_count() or 1)
        if self.workers > _SLOTS_PER_PROCESS:
            raise ValueError(f"at most {_SLOTS_PER_PROCESS} sandbox workers per process, got {self.workers}")
        self.python = python or default_interpreter()
        self.root = os.geteuid() == 0
        self._slots: queue.Queue[int | None] = queue.Queue()
        for _ in range(self.workers):
            self._slots.put(_acquire_uid() if self.root else None)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        try:
            self.isolation = self._resolve_isolation(isolation)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API
    def run_python(self, source: str, stdin: str | None = None, limits: SandboxLimits | None = None) -> ExecResult:
        return self.run(ExecJob({"main.py": source}, stdin=stdin, limits=limits))

    def run(self, job: ExecJob) -> ExecResult:
        uid = self._slots.get()
        try:
            result = self._execute(job, uid)
            if uid is not None and result.status in ("timeout", "output_limit", "signal"):
                uid = _settle(uid)
            return result
        finally:
            self._slots.put(uid)

    def run_many(self, jobs: Sequence[ExecJob]) -> list[ExecResult]:
        """Results in the order of `jobs`, `workers` programs at a time."""
        return list(self._pool.map(self.run, jobs))

    def close(self) -> None:
        """Wait for running programs, then free this sandbox's uids. Idempotent."""
        self._pool.shutdown(wait=True)
        while not self._slots.empty():
            uid = self._slots.get_nowait()
            if uid is not None:
                _release_uid(uid)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _resolve_isolation(self, wanted: str) -> str:
        if wanted != "auto":
            if wanted == "namespace" and not self._probe_namespace():
                raise SandboxError("namespace isolation is unavailable here (needs root with CAP_SYS_ADMIN); "
                                   "use isolation='plain' or 'auto'")
            return wanted
        return "namespace" if self._probe_namespace() else "plain"

    def _probe_namespace(self) -> bool:
        """One trivial run in namespace mode; the answer is cached per interpreter."""
        key = (self.python, str(self.root))
        with _probe_lock:
            if key not in _probed:
                res = self._execute(ExecJob({"main.py": "print('ok')"}, limits=replace(self.limits, wall_s=30)),
                                    self._slots.queue[0], mode="namespace")
                _probed[key] = "yes" if res.ok and res.stdout.strip() == "ok" else "no"
                if _probed[key] == "no":
                    log.warning("sandbox: namespaces unavailable (%s); falling back to plain isolation "
                                "(audit-hook socket guard)", res.reason())
        return _probed[key] == "yes"

    def _spec(self, job: ExecJob, uid: int | None, mode: str, workdir: str | None,
              limits: SandboxLimits) -> dict:
        if mode == "plain":
            argv = [self.python, "-I", "-S", "-c", _SOCKET_GUARD, job.entry]
        else:
            argv = [self.python, "-I", "-S", job.entry]
        rlimits = limits.rlimits()
        if uid is None:
            # Not root: RLIMIT_NPROC counts all of this user's processes, so allow for the ones running.
            rlimits["RLIMIT_NPROC"] += len(_processes_of(os.getuid()))
        home = "/tmp/work" if mode == "namespace" else workdir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "PYTHONHASHSEED": "0"}
        hide = sorted({"/root", "/home", str(Path.home())} - {"/"})
        return {"mode": mode, "workdir": workdir, "files": dict(job.files), "stdin": job.stdin, "argv": argv,
                "env": env, "uid": uid, "gid": uid, "limits": rlimits, "disk_mb": limits.disk_mb,
                "hide": [h for h in hide if not self.python.startswith(h + "/")], "host_pid": os.getpid()}

    def _execute(self, job: ExecJob, uid: int | None, mode: str | None = None) -> ExecResult:
        mode = mode or self.isolation
        limits = job.limits or self.limits
        for name in job.files:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        if job.entry not in job.files:
            raise ValueError(f"entry {job.entry!r} is not among the job's files {sorted(job.files)}")
        workdir = None
        if mode == "plain":
            workdir = tempfile.mkdtemp(prefix="refinery-sandbox-")
        try:
            spec = json.dumps(self._spec(job, uid, mode, workdir, limits)).encode()
            result = self._launch(spec, limits)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        result.isolation = mode
        return result

    def _launch(self, spec: bytes, limits: SandboxLimits) -> ExecResult:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True, env={})
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(spec)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        cap = limits.output_kb * 1024
        chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
        sizes = dict.fromkeys(chunks, 0)
        status = None
        with selectors.DefaultSelector() as sel:
            for stream in (proc.stdout, proc.stderr):
                sel.register(stream, selectors.EVENT_READ)
            open_streams = 2
            while open_streams:
                remaining = start + limits.wall_s - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                    break
                for key, _ in sel.select(timeout=remaining):
                    fd = key.fileobj.fileno()  # type: ignore[union-attr]
                    data = os.read(fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                        continue
                    if sizes[fd] < cap:
                        chunks[fd].append(data[: cap - sizes[fd]])
                    sizes[fd] += len(data)
                    if sizes[fd] > cap:
                        status = "output_limit"
                if status:
                    break
        if status:
            _stop(proc)
        returncode = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        wall = time.monotonic() - start
        out_fd, err_fd = list(chunks)
        stdout = b"".join(chunks[out_fd]).decode("utf-8", "replace")
        stderr = b"".join(chunks[err_fd]).decode("utf-8", "replace")
        if status is None:
            if returncode == 0:
                status = "ok"
            elif returncode == SETUP_FAILED and stderr.startswith("sandbox setup failed"):
                status = "setup_error"
            elif returncode > 128:
                status = "signal"
                stderr += f"\nkilled by signal {_signal_name(returncode - 128)}"
            else:
                status = "error"
        return ExecResult(status, returncode, stdout, stderr, wall)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM asks the launcher to kill the program and clean up; SIGKILL if it does not in time
    (its namespace then dies by the parent-death signal)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""The root-side half of the sandbox: run as `python -I -S sandbox_launcher.py`, spec as JSON on stdin.

Kept apart from sandbox.py because it runs in a fresh single-threaded process, where namespaces,
mounts and a fork are safe (a `preexec_fn` in the multi-threaded host is not), and it imports the
standard library only. Steps, in order:

1. namespace mode: unshare mount, network, PID, IPC and UTS namespaces; make every mount private;
   put size-capped tmpfs over /tmp, /var/tmp, /dev/shm and empty read-only tmpfs over /root and
   /home; the work directory is /tmp/work on the private tmpfs, gone with the namespace.
   plain mode: the host made the work directory.
2. write the program's files, owned by the sandbox uid.
3. fork. namespace mode: the child is PID 1 of the new PID namespace; it mounts a fresh /proc and
   forks the program, then stays root and reaps (a program that were PID 1 would ignore every
   signal it has no handler for, and its orphans would pile up unreaped). The program starts a
   session, sets the rlimits, drops every privilege to the sandbox uid/gid with no_new_privs and a
   parent-death SIGKILL, and execs the interpreter with a scrubbed environment.
4. the launcher waits and exits with the program's status (128 + signal when killed). When PID 1
   exits, or is killed (SIGTERM from the host makes the launcher kill it; a killed launcher kills it
   by the parent-death signal), the kernel kills every process left in the namespace. plain mode:
   the launcher is the subreaper of the program's orphans, kills everything of the sandbox uid
   (kill(-1) as that uid) and reaps it all before it exits.

Exit status 125 with a message on stderr means the sandbox itself could not be set up.
"""

import ctypes
import json
import os
import resource
import signal
import sys

SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() or None), f"mount {fstype} on {target}")


def _isolate(spec: dict) -> str:
    """Enter fresh namespaces; return the work directory on the private tmpfs."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    # Private propagation first, so none of the mounts below reach the host.
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "make / private")
    size = f"size={int(spec['disk_mb'])}m"
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
    for path in spec.get("hide", []):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    return workdir


def _write_files(workdir: str, files: dict, uid: int, gid: int) -> None:
    for name, text in files.items():
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chown(path, uid, gid)
    os.chown(workdir, uid, gid)


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        res = getattr(resource, name)
        # CPU: the soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(res, (value, hard))


def _exec_program(spec: dict, workdir: str) -> None:
    """Become the program: session, limits, unprivileged uid, scrubbed environment. Never returns."""
    try:
        os.setsid()
        _set_limits(spec["limits"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        os.chdir(workdir)
        stdin = os.open(spec["stdin_file"] or os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        if spec["stdin_file"]:
            os.unlink(spec["stdin_file"])  # readable once, through fd 0 only
        os.closerange(3, 1 << 16)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:  # noqa: BLE001 - any failure here is a setup failure, reported as such
        os.write(2, f"sandbox setup failed: {e}\n".encode())
    os._exit(SETUP_FAILED)


def _exit_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _namespace_init(spec: dict, workdir: str) -> None:
    """PID 1 of the new PID namespace: stays root (so the program cannot signal it), reaps orphans,
    and exits with the program's status, upon which the kernel kills whatever is left."""
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # a fork clears it
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        program = os.fork()
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox setup failed: {e}\n".encode())
        os._exit(SETUP_FAILED)
    if program == 0:
        _exec_program(spec, workdir)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            os._exit(_exit_code(status))


def _kill_all_of(uid: int) -> None:
    """kill(-1) as `uid` reaches every process of that uid (and nothing else), the caller excepted;
    repeated because a fork bomb forks between two sweeps."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main() -> None:
    # Die with the host: a killed or crashed host must not leave a sandbox running.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    spec = json.loads(sys.stdin.buffer.read())
    if os.getppid() != spec["host_pid"]:
        os._exit(SETUP_FAILED)
    namespace = spec["mode"] == "namespace"
    try:
        workdir = _isolate(spec) if namespace else spec["workdir"]
        uid = spec["uid"] if spec["uid"] is not None else os.getuid()
        gid = spec["gid"] if spec["gid"] is not None else os.getgid()
        _write_files(workdir, spec["files"], uid, gid)
        stdin_file = None
        if spec["stdin"] is not None:
            stdin_file = os.path.join(workdir, ".stdin")
            _write_files(workdir, {".stdin": spec["stdin"]}, uid, gid)
            os.chmod(stdin_file, 0o400)
        spec["stdin_file"] = stdin_file
        if not namespace:
            # Orphans of the program (daemons, fork-bomb children) become our children, so they are
            # reaped here instead of lingering as zombies that count against the uid's RLIMIT_NPROC.
            _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox setup failed: {e}\n".encode())
        os._exit(SETUP_FAILED)
    child = os.fork()
    if child == 0:
        if namespace:
            _namespace_init(spec, workdir)
        _exec_program(spec, workdir)
    # The host asks for an early end (wall time, output cap) with SIGTERM: kill the child and clean up.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    _, status = os.waitpid(child, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not namespace and spec["uid"] is not None:
        _kill_all_of(spec["uid"])
        _reap_all()
    os._exit(_exit_code(status))


if __name__ == "__main__":
    main()

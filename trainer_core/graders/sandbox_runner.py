"""The program that runs INSIDE the grader sandbox: one process scores a whole batch.

Standard library only, and never imported by Tuneyard: ``sandbox.py`` passes this file's text to
``python -I -S -c`` inside bubblewrap (or under rlimits in a fresh network namespace), so the sandbox
needs no view of the code tree. Protocol: one JSON request on stdin::

    {"mode": "grade" | "run", "source": str, "tasks": [...], "timeout": s, "memory_bytes": n,
     "cpu_seconds": n, "unshare_network": bool, "paths": [package folders for sys.path]}

``grade`` tasks are ``{"sample", "item"}`` for ``grade(sample, item)`` of ``source``; ``run`` tasks
are ``{"program"}`` whose stdout is captured. Answers, one JSON line each on the original stdout:
first ``{"ready": true}`` (or ``{"fatal": reason}``), then per task ``{"i", "score"}`` /
``{"i", "stdout"}`` / ``{"i", "error"}``. Before any untrusted code runs, the process limits its
memory, CPU time and file sizes, and installs a seccomp filter that refuses to create processes
(threads are allowed), so a fork bomb fails at its first fork.
"""

import ctypes
import io
import json
import math
import os
import resource
import signal
import struct
import sys
import traceback

_CLONE_THREAD = 0x00010000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
# (audit arch, {"clone", "fork", "vfork", "clone3"} syscall numbers) of the machines we run on.
_ARCHES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
_MAX_STDOUT = 1 << 20


class _Timeout(BaseException):
    """Raised in the task by SIGALRM (a BaseException, so a grader's ``except Exception`` can't keep it)."""


def _no_process_filter():
    """Returns the classic-BPF seccomp program that refuses fork/vfork/clone-without-CLONE_THREAD."""
    arch, numbers = _ARCHES[os.uname().machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
    # Header: a system call of another architecture is killed; then load the syscall number.
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    # Body: (code, true label, false label, k); labels become relative jumps below.
    body = []
    if "fork" in numbers:
        body.append((jge, "deny", None, 0x40000000))  # x32 system calls: not ours
    body.append((jeq, "nosys", None, numbers["clone3"]))  # glibc falls back to clone on ENOSYS
    for name in ("fork", "vfork"):
        if name in numbers:
            body.append((jeq, "deny", None, numbers[name]))
    body.append((jeq, None, "allow", numbers["clone"]))
    body.append((ld, None, None, 16))  # clone's first argument: its flags (low 32 bits)
    body.append((jset, "allow", "deny", _CLONE_THREAD))
    labels = {"allow": len(body), "deny": len(body) + 1, "nosys": len(body) + 2}
    body += [(ret, None, None, allow), (ret, None, None, eperm), (ret, None, None, enosys)]

    def jump(target, position):
        return 0 if target is None else labels[target] - position - 1

    packed = [struct.pack("HBBI", *instruction) for instruction in program]
    packed += [
        struct.pack("HBBI", code, jump(jt, i), jump(jf, i), k) for i, (code, jt, jf, k) in enumerate(body)
    ]
    return b"".join(packed), len(packed)


def _install_seccomp():
    code, count = _no_process_filter()
    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = SockFprog(count, code)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def _unshare_network():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0:
        return
    # Without CAP_SYS_ADMIN a new user namespace grants it for the new network namespace.
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed: the network cannot be isolated")


def _limit(request):
    memory = request["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = request["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _on_alarm(signum, frame):
    raise _Timeout()


def _run_task(fn, timeout):
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _grade_one(grade, task, timeout):
    value = _run_task(lambda: grade(task["sample"], task["item"]), timeout)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"grade() returned {type(value).__name__}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"grade() returned {value}")
    return {"score": value}


def _run_program(task, timeout):
    captured = io.StringIO()
    sys.stdout, sys.stdin = captured, io.StringIO("")
    try:
        code = compile(task["program"], "<program>", "exec")
        _run_task(lambda: exec(code, {"__name__": "__main__", "__builtins__": __builtins__}), timeout)
    except SystemExit:
        pass
    finally:
        sys.stdout, sys.stdin = sys.__stdout__, sys.__stdin__
    return {"stdout": captured.getvalue()[:_MAX_STDOUT]}


def _describe(exc):
    if isinstance(exc, _Timeout):
        return "timed out"
    if isinstance(exc, MemoryError):
        return "MemoryError: the memory limit was reached"
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip()[:500]


def main():
    request = json.loads(sys.stdin.buffer.read())
    sys.path += request["paths"]
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    # Anything the graded code prints must not reach the protocol stream.
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        if request["unshare_network"]:
            _unshare_network()
        _limit(request)
        _install_seccomp()
    except Exception as exc:  # the sandbox could not be set up: nothing untrusted has run yet
        answers.write(json.dumps({"fatal": _describe(exc)}) + "\n")
        return
    answers.write(json.dumps({"ready": True}) + "\n")
    signal.signal(signal.SIGALRM, _on_alarm)
    timeout = request["timeout"]
    grade = None
    setup_error = None
    if request["mode"] == "grade":
        namespace = {"__name__": "grader"}
        try:
            _run_task(lambda: exec(compile(request["source"], "<grader>", "exec"), namespace), timeout)
            grade = namespace["grade"]
        except BaseException as exc:
            setup_error = "the grader source failed to load: " + _describe(exc)
    for index, task in enumerate(request["tasks"]):
        try:
            if setup_error is not None:
                answer = {"error": setup_error}
            elif grade is not None:
                answer = _grade_one(grade, task, timeout)
            else:
                answer = _run_program(task, timeout)
        except BaseException as exc:
            answer = {"error": _describe(exc)}
        answers.write(json.dumps({"i": index, **answer}) + "\n")


main()

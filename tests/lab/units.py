"""A stand-in for systemd where it is not PID 1: run a unit's service lines as systemd would.

`Machine` is the host the units are installed on: network, mount and PID namespaces of
its own (loopback only; everything in it dies with it), with a scratch root's /etc (the
configuration and users `./install --root` made), /opt and /usr/local/bin laid over the
real ones, and fresh /run and /var/log.  `Machine.start(unit)` applies, in a mount
namespace of the service's own, what the unit's [Service] section asks: User=/Group=
(setpriv), the capability lines, NoNewPrivileges=, MemoryDenyWriteExecute=, LimitNOFILE=,
PrivateTmp=, ProtectHome=, ProtectSystem=strict (every mount read-only),
ProtectKernelTunables=, and writable RuntimeDirectory=/LogsDirectory=/ReadWritePaths=
owned by the user; it runs the ExecStartPre= lines, then ExecStart= with NOTIFY_SOCKET set
and waits for READY=1, the way Type=notify does.  `Machine.reload(service)` runs
ExecReload= with $MAINPID.

Settings it does not apply are listed in NOT_EMULATED (systemd's own restart and stop
policy, seccomp filters, device, module and cgroup protections); any other key stops the
run, so a unit that asks for something new cannot pass unnoticed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HONOURED = {
    "Type", "NotifyAccess", "ExecStartPre", "ExecStart", "ExecReload", "User", "Group", "AmbientCapabilities",
    "CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "ProtectKernelTunables", "RuntimeDirectory", "LogsDirectory", "ReadWritePaths", "LimitNOFILE",
    "MemoryDenyWriteExecute",
}
# Kept by systemd itself (restart and stop policy) or enforced by seccomp/devices/cgroups.
NOT_EMULATED = {
    "KillMode", "KillSignal", "TimeoutStopSec", "Restart", "RestartSec", "WatchdogSec", "PrivateDevices",
    "ProtectKernelModules", "ProtectControlGroups", "RestrictAddressFamilies", "RestrictNamespaces",
    "LockPersonality", "SystemCallArchitectures",
}
READY_TIMEOUT = 30.0
# MemoryDenyWriteExecute=: the kernel's own form of it (prctl PR_SET_MDWE, Linux >= 6.3; kept across fork
# and exec), set between setpriv and the command; on older kernels it is left out, with a note.
MDWE = ("import ctypes, os, sys\n"
        "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
        "    print('units.py: no PR_SET_MDWE here, MemoryDenyWriteExecute= not applied', file=sys.stderr)\n"
        "os.execvp(sys.argv[1], sys.argv[1:])")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of key=value lines; a key given again adds a value, an empty one resets (systemd.syntax)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        current[key] = current.get(key, []) + [value] if value else []
    return sections


@dataclass
class Service:
    """A unit's [Service] section, checked against what the stand-in applies."""

    name: str
    keys: dict[str, list[str]]
    mainpid: int = 0  # in the machine's PID namespace, for $MAINPID
    host_pid: int = 0  # the same process as the test sees it
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path) -> Service:
        keys = parse_unit(path.read_text())["Service"]
        unknown = set(keys) - HONOURED - NOT_EMULATED
        if unknown:
            raise ValueError(f"{path.name}: the stand-in does not know {sorted(unknown)}")
        if keys.get("ProtectSystem", ["strict"]) != ["strict"] or keys.get("Type", ["notify"]) != ["notify"]:
            raise ValueError(f"{path.name}: the stand-in knows ProtectSystem=strict and Type=notify only")
        return cls(path.name.removesuffix(".service"), keys)

    def one(self, key: str, default: str = "") -> str:
        return (self.keys.get(key) or [default])[-1]

    def words(self, key: str) -> list[str]:
        return [w for value in self.keys.get(key, []) for w in value.split()]

    def lines(self, key: str) -> list[list[str]]:
        """Exec lines as argv; systemd's "-" prefix (failure ignored) is the only one the units may use."""
        out = []
        for value in self.keys.get(key, []):
            if value[0] in "@:+!":
                raise ValueError(f"{self.name}: {key} prefix {value[0]!r} is not emulated")
            out.append(shlex.split(value))
        return out

    def directories(self) -> list[tuple[str, bool]]:
        """(path, owned by the user): what stays writable under ProtectSystem=strict."""
        dirs = [(f"/run/{d}", True) for d in self.words("RuntimeDirectory")]
        dirs += [(f"/var/log/{d}", True) for d in self.words("LogsDirectory")]
        dirs += [(p.lstrip("-"), False) for p in self.words("ReadWritePaths")]
        if self.one("PrivateTmp") == "yes":
            dirs += [("/tmp", False), ("/var/tmp", False)]
        return dirs

    def setpriv(self) -> list[str]:
        """User=, Group=, the capabilities and NoNewPrivileges= as a setpriv prefix."""
        user, group = self.one("User", "root"), self.one("Group")
        argv = ["setpriv", f"--reuid={user}", "--init-groups", "--reset-env"]
        if group:
            argv.insert(2, f"--regid={group}")
        caps = ",".join("+" + c.lower().removeprefix("cap_") for c in self.words("AmbientCapabilities"))
        if caps:
            argv += [f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}"]
        bounding = ",".join("+" + c.lower().removeprefix("cap_") for c in self.words("CapabilityBoundingSet"))
        if "CapabilityBoundingSet" in self.keys:
            argv.append(f"--bounding-set=-all{',' + bounding if bounding else ''}")
        if self.one("NoNewPrivileges") == "yes":
            argv.append("--no-new-privs")
        argv.append("--")
        if self.one("MemoryDenyWriteExecute") == "yes":
            argv += ["python3", "-c", MDWE]
        return argv

    def script(self, commands: list[list[str]], final: list[str] | None, env: dict[str, str]) -> str:
        """Shell run as root in the service's own mount namespace: the sandbox, then the commands as the user."""
        user, group = self.one("User", "root"), self.one("Group", "root")
        steps = ["set -e"]
        for path, owned in self.directories():
            if owned:
                steps.append(f"install -d -o {shlex.quote(user)} -g {shlex.quote(group)} -m 0755 {shlex.quote(path)}")
        if self.one("PrivateTmp") == "yes":
            steps += ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp"]
        if self.one("ProtectHome") == "yes":
            steps.append("for d in /home /root /run/user; do [ ! -d $d ] || mount -t tmpfs -o mode=0 tmpfs $d; done")
        if self.one("ProtectKernelTunables") == "yes":
            steps.append("mount --bind /proc/sys /proc/sys")
        # ProtectSystem=strict: every mount read-only (the API file systems under /proc and /dev aside) ...
        steps.append("awk '{print $5}' /proc/self/mountinfo | while read -r mp; do case $mp in "
                     "/proc|/proc/*|/dev|/dev/*|/sys|/sys/*) continue;; esac; "
                     "[ -e \"$mp\" ] || continue; "
                     "mount -o remount,bind,ro \"$mp\"; done")
        if self.one("ProtectKernelTunables") == "yes":
            steps.append("mount -o remount,bind,ro /proc/sys && mount -o remount,bind,ro /sys")
        # ... but the service's own directories.
        for path, _ in self.directories():
            q = shlex.quote(path)
            steps.append(f"mount --bind {q} {q} && mount -o remount,bind,rw {q}")
        limit = self.one("LimitNOFILE")
        if limit:
            # Capped at the hard limit where the test machine may not raise it (no CAP_SYS_RESOURCE).
            steps.append(f"ulimit -n {int(limit)} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"")
        prefix = self.setpriv()
        environment = ["env", *(f"{k}={v}" for k, v in env.items())]
        for argv in commands:
            ignore = argv[0].startswith("-")
            argv = [argv[0].lstrip("-"), *argv[1:]]
            steps.append(shlex.join([*prefix, *environment, *argv]) + (" || true" if ignore else ""))
        if final is not None:
            steps.append("exec " + shlex.join([*prefix, *environment, *final]))
        return "\n".join(steps)


class Machine:
    """Namespaces that play the host the units are installed on; see the module docstring."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.root = root
        self.scratch = scratch
        self.services: dict[str, Service] = {}
        self.holder: subprocess.Popen | None = None
        self.pid1 = 0

    def __enter__(self) -> Machine:
        notify = self.scratch / "notify"
        notify.mkdir(mode=0o755, parents=True)
        notify.chmod(0o755)
        overlays = []
        for place in ("etc", "opt", "usr/local/bin"):
            if (self.root / place).is_dir():
                overlays.append(f"mount -t overlay overlay -o lowerdir={self.root / place}:/{place} /{place}")
        setup = "\n".join([
            "set -e",
            "ip link set lo up",
            *overlays,
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mount -t tmpfs -o mode=0755 tmpfs /var/log",
            f"mkdir /run/systemd && mount --bind {shlex.quote(str(notify))} /run/systemd",
            "echo ready",
            "exec sleep 86400",
        ])
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
             "sh", "-c", setup], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.kill()
            raise RuntimeError("machine set-up failed: " + (self.holder.communicate(timeout=10)[1] or "")[-2000:])
        self.pid1 = psutil.Process(self.holder.pid).children()[0].pid
        return self

    def __exit__(self, *exc: object) -> None:
        # PID 1 of the machine's PID namespace: every process in it dies with it.
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.holder is not None:
            self.holder.wait(timeout=30)
        for service in self.services.values():
            if service.proc is not None:
                service.proc.wait(timeout=30)

    def run(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A command on the machine, as root outside any service's sandbox (an operator's shell)."""
        return subprocess.run(["nsenter", f"--target={self.pid1}", "--net", "--mount", "--pid", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def _notify_socket(self, name: str) -> socket.socket:
        path = self.scratch / "notify" / f"{name}.notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        path.chmod(0o777)
        return sock

    def _sandboxed(self, service: Service, commands: list[list[str]], final: list[str] | None,
                   env: dict[str, str], log: Path) -> subprocess.Popen:
        script = service.script(commands, final, env)
        with open(log, "ab") as out:
            return subprocess.Popen(["nsenter", f"--target={self.pid1}", "--net", "--mount", "--pid", "--",
                                     "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self, unit: Path, log: Path) -> Service:
        """ExecStartPre= then ExecStart= in the unit's sandbox; returns once the service sent READY=1."""
        service = Service.load(unit)
        notify = self._notify_socket(service.name)
        try:
            env = {"NOTIFY_SOCKET": f"/run/systemd/{service.name}.notify"}
            (start,) = service.lines("ExecStart")
            service.proc = self._sandboxed(service, service.lines("ExecStartPre"), start, env, log)
            self.services[service.name] = service
            deadline = time.monotonic() + READY_TIMEOUT
            notify.settimeout(1.0)
            while time.monotonic() < deadline:
                if service.proc.poll() is not None:
                    raise RuntimeError(f"{service.name} exited {service.proc.returncode}: {log.read_text()[-3000:]}")
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in message.split("\n"):
                    break
            else:
                raise RuntimeError(f"{service.name}: no READY=1 in {READY_TIMEOUT:.0f} s: {log.read_text()[-3000:]}")
        finally:
            notify.close()
        service.host_pid = psutil.Process(service.proc.pid).children()[0].pid
        service.mainpid = _pid_in_namespace(service.host_pid)
        return service

    def reload(self, service: Service, log: Path) -> int:
        """ExecReload= in the unit's sandbox with $MAINPID, as `systemctl reload` runs it."""
        commands = [[w.replace("${MAINPID}", str(service.mainpid)).replace("$MAINPID", str(service.mainpid))
                     for w in argv] for argv in service.lines("ExecReload")]
        proc = self._sandboxed(service, commands, None, {}, log)
        return proc.wait(timeout=60)


def _pid_in_namespace(host_pid: int) -> int:
    """The process's PID in its own (innermost) PID namespace."""
    status = Path(f"/proc/{host_pid}/status").read_text()
    return int(re.search(r"^NSpid:\s+(.*)$", status, re.M).group(1).split()[-1])

"""A throw-away OpenSSH server on loopback addresses, for tests that drive
real SSH (the Ansible collection's playbooks).

Everything lives in one temp dir: its own host key, one client key, the
config, the log. It listens on a free port of several loopback addresses
(127.0.0.2, 127.0.0.3, ... all reach this machine), so an inventory can name
them as different hosts, and lets root in with that key only. The test
starts it and stops it; nothing outside the temp dir changes except
sshd's privilege-separation directory, created if missing as its package's
service would.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; it refuses to start without it


@dataclass
class LoopbackSshd:
    addresses: tuple[str, ...]
    port: int
    client_key: Path
    known_hosts: Path
    log: Path
    proc: subprocess.Popen

    def ssh_args(self) -> str:
        """ssh options that trust exactly this server's host key."""
        return f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes"

    def close_masters(self, control_dir: Path) -> None:
        """End the ssh multiplexing masters (ControlPersist) left in ``control_dir``,
        and with them their sessions on this server."""
        for sock in control_dir.glob("*") if control_dir.is_dir() else ():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "any"],
                           capture_output=True, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def missing() -> str | None:
    """Why a loopback sshd cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"OpenSSH server not installed ({SSHD}; apt-get install openssh-server, as .ci/run does)"
    for tool in ("ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} not installed (openssh-client)"
    if os.geteuid() != 0:
        return "needs root: the test logs in as root over SSH to patch processes"
    return None


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ksplice_py-test", "-f", str(path)],
                   check=True, capture_output=True)


def start(workdir: Path, addresses: tuple[str, ...], ready_timeout: float = 15.0) -> LoopbackSshd:
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port = _free_port(addresses[0])
    config = workdir / "sshd_config"
    # StrictModes stays on: it refuses an AuthorizedKeysFile under /tmp (mode
    # 1777, as pytest's temp dirs are), so the key comes from a root-owned
    # command instead of a file path sshd would have to trust.
    config.write_text("\n".join([
        *(f"ListenAddress {a}:{port}" for a in addresses),
        f"HostKey {host_key}",
        "PidFile none",
        "AuthorizedKeysFile none",
        f"AuthorizedKeysCommand {shutil.which('cat')} {authorized}",
        "AuthorizedKeysCommandUser root",
        "AuthenticationMethods publickey",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ]))
    known_hosts = workdir / "known_hosts"
    key = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    known_hosts.write_text("".join(f"[{a}]:{port} {key}\n" for a in addresses))
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log = workdir / "sshd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LoopbackSshd(addresses, port, client_key, known_hosts, log, proc)
    deadline = time.monotonic() + ready_timeout
    pending = list(addresses)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((pending[0], port), timeout=1):
                pending.pop(0)
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd not listening on {pending[0]}:{port}: {log.read_text()[-2000:]}")
            time.sleep(0.05)
    return server

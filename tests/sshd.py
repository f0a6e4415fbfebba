"""A real sshd on 127.0.0.1 for the tests that reach a "board" over ssh (test_deploy, test_fleet):
a throwaway host key and client key in a tmp dir, the current user logging in to itself.

    from tests.sshd import Sshd, skip_reason

    reason = skip_reason()          # sshd / ssh / rsync missing -> pytest.skip(reason)
    sshd = Sshd(tmp_dir)            # started and answering, or pytest.skip() with sshd's log
    subprocess.run(["ssh", *sshd.ssh_args(), sshd.target, "true"])
    sshd.stop()
"""

from __future__ import annotations

import getpass
import grp
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_reason(*tools: str) -> str | None:
    """Why the sshd tests cannot run here (None when they can): sshd, ssh, ssh-keygen, rsync
    and any other `tools` must be installed."""
    if not os.path.exists(SSHD):
        return "sshd is not installed: run scripts/system_deps.sh"
    missing = [t for t in ("ssh", "ssh-keygen", "rsync", *tools) if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run scripts/system_deps.sh"
    return None


class Sshd:
    """sshd -D on 127.0.0.1:<free port>, accepting only a client key made here.

    Attributes for the callers: port, identity (the client's private key), ssh_config (a client
    config with StrictHostKeyChecking=no), user and group (this process's), target (USER@HOST),
    keys (the directory with all of it and sshd.log)."""

    host = "127.0.0.1"

    def __init__(self, tmp: Path):
        self.keys = keys = Path(tmp) / "ssh"
        keys.mkdir(parents=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(keys / name)], check=True)
        shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
        self.port = free_port()
        (keys / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress {self.host}\nHostKey {keys / 'host_key'}\n"
            f"PidFile {keys / 'sshd.pid'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\n"
            # sftp for the tools that copy files with it (ansible), built into sshd
            "Subsystem sftp internal-sftp\nUsePAM no\nLogLevel ERROR\n")
        self.ssh_config = keys / "ssh_config"
        self.ssh_config.write_text(
            "Host *\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            f"  UserKnownHostsFile {keys / 'known_hosts'}\n  LogLevel ERROR\n")
        self.identity = keys / "client_key"
        self.user = getpass.getuser()
        self.group = grp.getgrgid(os.getgid()).gr_name
        self.target = f"{self.user}@{self.host}"
        if os.getuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        self.log = open(keys / "sshd.log", "wb")  # noqa: SIM115 - closed in stop_sshd()
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(keys / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        why = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            r = subprocess.run(["ssh", *self.ssh_args(), self.target, "true"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                return
            why = r.stderr
            time.sleep(0.2)
        log = (keys / "sshd.log").read_text(errors="replace")
        self.stop_sshd()
        pytest.skip(f"sshd cannot run here: {log or why}")

    def ssh_args(self) -> list[str]:
        return ["-F", str(self.ssh_config), "-p", str(self.port), "-i", str(self.identity),
                "-o", "BatchMode=yes"]

    def stop_sshd(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        self.stop_sshd()

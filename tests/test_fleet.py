"""scripts/fleet (an Ansible playbook and role) end to end: real ansible-playbook, a real sshd on
127.0.0.1 (tests/sshd.py), three "boards" that are tmp directories reached through it, each with
its own root and socket, tiny random bundles, the real client through the sockets.

In order: release A goes to all three boards, one at a time, and each answers A. Then release B,
where the second board's inventory points at a B whose graph is garbage (its checksums are
right, so the board switches to it, the service dies before READY=1 and the board rolls itself
back): the play stops there with a non-zero exit, the first board serves B, the second serves
A again, the third was never touched (same release, same process, same history) and serves A.
Then the same rollout with the good B everywhere finishes it, and an ad-hoc `ansible` command
runs one board's own rollback (the README's way back). Every service is stopped at the end.
systemd is not PID 1 here, so the boards run the units' ExecStart themselves (`direct`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgert.bundle import Bundle
from edgert.client import Client
from edgert.tools.board import Layout
from edgert.tools.deploy import release_id
from tests.sshd import Sshd, skip_reason
from tests.tiny_bundles import broken_copy, make_bundle

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "scripts" / "fleet"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HOSTS = ("board1", "board2", "board3")


class Target:
    """One board of the fleet: a root directory and a socket under it."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root
        self.socket = root / "run" / "edgert.sock"

    def current(self) -> str | None:
        return Layout(self.root).current_id()

    def answers(self) -> str:
        """The served model's name, after a 3-token completion through the socket."""
        with Client(str(self.socket), timeout=60) as c:
            r = c.complete("w5 w6 w7", max_tokens=3, temperature=0, ignore_eos=True)
            assert r.completion_tokens == 3 and r.text.strip()
            return c.models()[0]

    def board(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgert", "board", *args, "--root",
                               str(self.root)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    def releases(self) -> dict[str, dict]:
        r = self.board("list", "--json")
        assert r.returncode == 0, r.stderr
        return {row["id"]: row for row in json.loads(r.stdout)}

    def snapshot(self) -> dict:
        """What a rollout would change on this board."""
        layout = Layout(self.root)
        return {"current": layout.current_id(), "pid": layout.pid_file.read_text(),
                "history": layout.history.read_text(),
                "tree": sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                               if "service.log" not in p.name and "__pycache__" not in p.parts)}


class Fleet:
    def __init__(self, tmp: Path, sshd: Sshd, wheel: Path):
        self.tmp = tmp
        self.sshd = sshd
        self.wheel = wheel
        self.targets = {name: Target(name, tmp / name) for name in HOSTS}
        self.runs = 0
        (tmp / "ansible.cfg").write_text(
            "[defaults]\n"
            f"local_tmp = {tmp / 'ansible-local'}\nremote_tmp = {tmp / 'ansible-remote'}\n"
            f"interpreter_python = {sys.executable}\nretry_files_enabled = False\n"
            "[ssh_connection]\npipelining = True\n"
            # one ssh connection per board for the whole play (a handshake costs ~0.25 s and a
            # rollout makes ~15 connections per board); close_connections() ends them
            "ssh_args = -o ControlMaster=auto -o ControlPersist=120s\n"
            f"control_path_dir = {tmp / 'ansible-cp'}\n")

    def inventory(self, bundle: Path, per_host: dict[str, dict] | None = None) -> Path:
        common_args = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                       "-o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR")
        hosts = {}
        for name, t in self.targets.items():
            hosts[name] = {
                "ansible_host": self.sshd.host, "ansible_port": self.sshd.port,
                "ansible_user": self.sshd.user,
                "ansible_ssh_private_key_file": str(self.sshd.identity),
                "ansible_ssh_common_args": common_args,
                "edgert_root": str(t.root), "edgert_socket": str(t.socket),
                **(per_host or {}).get(name, {})}
        inv = {"edgert": {"hosts": hosts, "vars": {
            "ansible_python_interpreter": sys.executable,
            "edgert_python": sys.executable, "edgert_mode": "direct",
            "edgert_bundle": str(bundle), "edgert_wheel": str(self.wheel),
            "edgert_user": self.sshd.user, "edgert_group": self.sshd.group,
            "edgert_kv_memory": "8MiB", "edgert_pip_args": "--no-compile",  # one bare flag
            "edgert_serve_args": "--max-num-seqs 2 --max-num-batched-tokens 32",
            "edgert_timeout": 120}}}
        self.runs += 1
        path = self.tmp / f"inventory-{self.runs}.yml"
        path.write_text(json.dumps(inv, indent=1))  # JSON is YAML
        return path

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "ANSIBLE_CONFIG": str(self.tmp / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.tmp / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"}
        t = time.monotonic()
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        print(f"$ {' '.join(argv)} -> {r.returncode} in {time.monotonic() - t:.0f} s\n"
              f"{r.stdout}\n{r.stderr}")
        return r

    def rollout(self, bundle: Path, per_host: dict[str, dict] | None = None,
                serial: int = 1) -> subprocess.CompletedProcess:
        return self.run([str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory(bundle, per_host)),
                         str(FLEET / "rollout.yml"), "-e", f"edgert_serial={serial}"])

    def close_connections(self) -> None:
        """End the ssh masters the plays left behind, so nothing of the test keeps running."""
        for sock in (self.tmp / "ansible-cp").glob("*"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "board"],
                           capture_output=True, timeout=30)

    def ansible(self, pattern: str, *args: str) -> subprocess.CompletedProcess:
        """An ad-hoc `ansible` command on the last inventory."""
        return self.run([str(ANSIBLE_PLAYBOOK.with_name("ansible")), "-i",
                         str(self.tmp / f"inventory-{self.runs}.yml"), pattern, *args])


def _rid(bundle: Path) -> str:
    return release_id(Bundle.load(bundle, verify=False))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:

    root = tmp_path_factory.mktemp("fleet-bundles")
    a = make_bundle(root, "tiny-a", seed=1)
    b = make_bundle(root, "tiny-b", seed=2)
    broken = broken_copy(b, root / "tiny-b-broken")
    for x in (a, b, broken):
        Bundle.load(x)
    return {"A": a, "B": b, "broken": broken}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"ansible-core is not installed in {sys.prefix} (pip install -e '.[dev]')")
    r = subprocess.run([sys.executable, str(FLEET / "build_wheel.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = Path(r.stdout.strip().splitlines()[-1])
    assert wheel.is_file() and wheel.name.startswith("edgert-") and "wheel:" in r.stderr
    tmp = tmp_path_factory.mktemp("fleet")
    sshd = Sshd(tmp)
    f = Fleet(tmp, sshd, wheel)
    try:
        yield f
    finally:
        for t in f.targets.values():
            if t.root.exists():
                r = t.board("stop", "--mode", "direct")
                print(r.stdout, r.stderr)
        f.close_connections()
        sshd.stop()
    for t in f.targets.values():
        assert not Layout(t.root).pid_file.exists(), t.name  # every service was stopped


# ---- the rollouts, in order -------------------------------------------------------------------

def test_release_a_rolls_out_to_all_three(fleet, bundles):
    r = fleet.rollout(bundles["A"])
    assert r.returncode == 0, r.stdout + r.stderr
    rid = _rid(bundles["A"])  # the role names releases as `edgert deploy` does
    for name, t in fleet.targets.items():
        assert t.current() == rid, name
        assert t.answers() == "tiny-a", name
        assert f"{name} serves {rid}" in r.stdout
        assert t.releases()[rid]["status"] == "current"
    # serial 1: the boards were activated one after another, in inventory order
    order = [r.stdout.index(f"{name} serves {rid}") for name in HOSTS]
    assert order == sorted(order)
    assert r.stdout.count("PLAY [Roll an edgert release out]") == 3  # one batch per board
    assert "failed=0" in r.stdout and "failed=1" not in r.stdout


def test_failed_health_check_stops_the_rollout(fleet, bundles):
    a, b, broken = (_rid(bundles[k]) for k in ("A", "B", "broken"))
    t1, t2, t3 = (fleet.targets[n] for n in HOSTS)
    before3 = t3.snapshot()

    r = fleet.rollout(bundles["B"], per_host={"board2": {"edgert_bundle": str(bundles["broken"])}})
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"release {broken} on board2: failed its start or health check and was rolled " \
           "back (exit 3)" in r.stdout
    assert "before READY=1" in r.stdout and f"rolled back to {a}, which answers" in r.stdout

    # board 1 went first and serves B
    assert t1.current() == b and t1.answers() == "tiny-b"
    # board 2 tried the broken B, rolled itself back and serves A again
    assert t2.current() == a and t2.answers() == "tiny-a"
    rel2 = t2.releases()
    assert rel2[a]["status"] == "current" and rel2[broken]["status"] == "failed"
    assert "before READY=1" in rel2[broken]["reason"]
    # board 3 was never reached: the same release, process, history and files as before
    assert "board3" not in r.stdout.split("PLAY RECAP")[0]
    assert t3.snapshot() == before3
    assert set(t3.releases()) == {a} and t3.current() == a
    assert t3.answers() == "tiny-a"


def test_rerun_after_the_fix_finishes_the_rollout(fleet, bundles):
    a, b = _rid(bundles["A"]), _rid(bundles["B"])
    r = fleet.rollout(bundles["B"])  # board2 gets the good B now
    assert r.returncode == 0, r.stdout + r.stderr
    for name, t in fleet.targets.items():
        assert t.current() == b and t.answers() == "tiny-b", name
    assert "board1 serves " + b + " on " in r.stdout and f"(was {b})" in r.stdout  # re-activated
    assert f"board3 serves {b} on {fleet.targets['board3'].socket} (was {a})" in r.stdout


def test_ad_hoc_rollback_of_one_board(fleet, bundles):
    # the README's way back for the boards that got a release: the board's own rollback
    t1 = fleet.targets["board1"]
    r = fleet.ansible("board1", "-m", "ansible.builtin.command", "-a",
                      f"{t1.root}/bin/edgert board rollback --root {t1.root} --mode direct "
                      "--timeout 120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert t1.current() == _rid(bundles["A"]) and t1.answers() == "tiny-a"
    assert fleet.targets["board2"].answers() == "tiny-b"

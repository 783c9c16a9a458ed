"""The Ansible collection (ansible/ansible_collections/ksplice_py/hotpatch),
driven for real: ansible-playbook over SSH to three "hosts" (loopback
addresses served by a throw-away sshd this test starts), each running its
own service processes (its own copy of tests/targets/service.c, so every
host's module call is narrowed with ``exe`` to that host's processes only).

The truth is read from the targets themselves (their code, maps, editions
and the results their workers compute), not only from Ansible's report.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import loopback_sshd
from conftest import HOTPATCH, Target, maps_lines, run_hotpatch

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "ksplice_py" / "hotpatch"
HOSTS = {"h2": "127.0.0.2", "h3": "127.0.0.3", "h4": "127.0.0.4"}
PROCS_PER_HOST = 2
WORKERS = 2
BEFORE, AFTER = 14, 21  # compute(7): x * 2, patched x * 3


def _ansible_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


ANSIBLE_PLAYBOOK = _ansible_tool("ansible-playbook")
ANSIBLE = _ansible_tool("ansible")

pytestmark = pytest.mark.skipif(ANSIBLE_PLAYBOOK is None,
                                reason="ansible-core not installed (pip install -e '.[test]')")

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)", re.M)


@dataclass
class Run:
    cp: subprocess.CompletedProcess
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.cp.stdout + self.cp.stderr

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]

    def failed(self, host: str) -> int:
        return self.recap[host]["failed"]


@dataclass
class Host:
    name: str
    address: str
    exe: Path
    patch: Path  # where the playbook puts the patch on this host
    targets: list[Target]
    code: dict[int, bytes] = field(default_factory=dict)  # compute's first bytes before anything
    maps: dict[int, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = loopback_sshd.missing()
    if why:
        pytest.skip(why)
    server = loopback_sshd.start(tmp_path_factory.mktemp("sshd"), tuple(HOSTS.values()))
    yield server
    server.close_masters(server.client_key.parent / "cp")  # Ansible's ControlPersist connections
    server.stop()


@pytest.fixture
def fleet(build, spawn, sshd, tmp_path):
    """fleet(busy=()) -> {name: Host}: every host's own service processes,
    started from its own copy of the binary; a host in ``busy`` has one
    process parked inside the patched function."""
    service = build.target("service")

    def _fleet(busy: tuple[str, ...] = ()) -> dict[str, Host]:
        hosts = {}
        for name, address in HOSTS.items():
            home = tmp_path / "hosts" / name
            home.mkdir(parents=True)
            exe = home / "service"
            shutil.copy2(service, exe)
            targets = [spawn(exe, WORKERS, *(["busy"] if name in busy and i == 0 else []))
                       for i in range(PROCS_PER_HOST)]
            host = Host(name, address, exe, home / "fix.so", targets)
            for t in targets:
                host.code[t.pid], host.maps[t.pid] = t.code(), t.maps()
            hosts[name] = host
        return hosts

    return _fleet


@pytest.fixture
def fix(build) -> Path:
    return build.patch("compute_mul", MUL=3)


@pytest.fixture
def playbook(sshd, tmp_path, fix):
    """playbook(name, hosts, *ansible-playbook args, **extra vars) -> Run."""

    def _run(name: str, hosts: dict[str, Host], *args: str, copy: bool = True, **extra) -> Run:
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(json.dumps(_inventory(sshd, hosts, fix if copy else None)))  # JSON is YAML
        cmd = [ANSIBLE_PLAYBOOK, "-i", str(inventory), f"ksplice_py.hotpatch.{name}", *args]
        if extra:
            cmd += ["-e", json.dumps(extra)]
        cp = subprocess.run(cmd, capture_output=True, text=True, env=_ansible_env(sshd, tmp_path),
                            cwd=tmp_path, timeout=300)
        if os.environ.get("KSPLICE_PY_ANSIBLE_TRANSCRIPTS"):  # keep what a run printed (README's sample)
            keep = Path(os.environ["KSPLICE_PY_ANSIBLE_TRANSCRIPTS"])
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{len(list(keep.iterdir())):02d}-{name}.txt").write_text(f"$ {shlex.join(cmd[1:])}\n{cp.stdout}")
        run = Run(cp)
        for m in RECAP.finditer(cp.stdout):
            run.recap[m.group(1)] = dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued"),
                                             map(int, m.groups()[1:])))
        assert set(run.recap) == set(hosts), f"no recap for every host:\n{run.output}"
        assert not any(r["unreachable"] for r in run.recap.values()), run.output
        return run

    return _run


def _inventory(sshd, hosts: dict[str, Host], fix: Path | None) -> dict:
    """Every host's own processes (hotpatch_exe) and patch path; the playbook
    copies ``fix`` there (hotpatch_src) unless it is None."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    env = {"KSPLICE_PY_CACHE": os.environ["KSPLICE_PY_CACHE"]} if "KSPLICE_PY_CACHE" in os.environ else {}
    return {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_port": sshd.port,
            "ansible_ssh_private_key_file": str(sshd.client_key),
            "ansible_ssh_common_args": sshd.ssh_args(),
            "ansible_python_interpreter": python,  # the host's Python: the module needs no ksplice_py
            "hotpatch_executable": HOTPATCH,
            "hotpatch_environment": env,
            "hotpatch_timeout": 1,
            **({"hotpatch_src": str(fix)} if fix else {}),
        },
        "hosts": {h.name: {"ansible_host": h.address, "hotpatch_exe": [str(h.exe)],
                           "hotpatch_patch": str(h.patch), "target_pid": h.targets[0].pid}
                  for h in hosts.values()},
    }}


def _ansible_env(sshd, tmp_path: Path) -> dict:
    home = sshd.client_key.parent  # short: ssh control sockets have a path limit
    return {**os.environ,
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
            "ANSIBLE_PIPELINING": "true",
            "ANSIBLE_NOCOLOR": "true",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            # One host at a time: the three "hosts" share one kernel here, and two
            # `hotpatch ... --all` runs at once on one machine (different --exe)
            # were seen to fail a process with EPERM from PTRACE_SEIZE under heavy
            # load (notes/issue-13); real hosts each have their own.
            "ANSIBLE_FORKS": "1"}


# -- the truth, from the targets ---------------------------------------------------

def editions(t: Target) -> list[dict]:
    cp = run_hotpatch("list", t.pid, "--json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def assert_patched(t: Target, sha: str) -> None:
    t.assert_alive()
    eds = editions(t)
    assert [(e["state"], e["sha256"]) for e in eds] == [("applied", sha)], eds
    t.wait_all_return(AFTER, timeout=5)
    t.assert_healthy()


def assert_untouched(host: Host, t: Target) -> None:
    """Running exactly as before: same code, same mappings, no edition,
    the old results."""
    t.assert_running()
    assert editions(t) == [], f"pid {t.pid} on {host.name} carries editions"
    assert t.code() == host.code[t.pid], f"pid {t.pid} on {host.name}: code changed"
    assert maps_lines(t.pid) == host.maps[t.pid], f"pid {t.pid} on {host.name}: mappings changed"
    t.wait_all_return(BEFORE, timeout=5)
    t.assert_healthy()


def place_patch(hosts: dict[str, Host], fix: Path) -> None:
    for h in hosts.values():
        shutil.copy2(fix, h.patch)
        h.patch.chmod(0o600)


def sha256_of(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the collection itself ------------------------------------------------------------

def _ansible_test_root() -> Path:
    import ansible_test
    return Path(ansible_test.__file__).parent


def test_module_docs_and_argument_specs_validate():
    """ansible-test's validate-modules (documentation schema, the argument
    spec against the docs, return docs), run directly: ``ansible-test
    sanity`` wants to bootstrap pip from the network into fresh venvs."""
    pytest.importorskip("voluptuous", reason="validate-modules needs voluptuous (test extra)")
    pytest.importorskip("antsibull_docs_parser", reason="validate-modules needs antsibull-docs-parser (test extra)")
    validate = _ansible_test_root() / "_util/controller/sanity/validate-modules/validate.py"
    version = re.search(r"^version: (\S+)", (COLLECTION / "galaxy.yml").read_text(), re.M).group(1)
    modules = sorted(str(p.relative_to(COLLECTION)) for p in (COLLECTION / "plugins/modules").glob("*.py"))
    cp = subprocess.run([sys.executable, str(validate), "--format", "json", "--arg-spec",
                         "--collection", "ansible_collections/ksplice_py/hotpatch", "--collection-version", version,
                         *modules], cwd=COLLECTION, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(COLLECTIONS), "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS)})
    assert cp.returncode in (0, 3) and not cp.stderr.strip(), cp.stderr
    report = json.loads(cp.stdout)
    assert set(report) == set(modules), report
    # The project is MIT-licensed; the GPLv3 header is Ansible's own modules' convention
    # (waived in tests/sanity/ignore-*.txt for ansible-test).
    problems = {path: [e for e in r["errors"] if e["code"] != "missing-gplv3-license"] + r["warnings"]
                for path, r in report.items()}
    assert not any(problems.values()), json.dumps(problems, indent=1)


def test_collection_builds_and_its_files_are_clean(tmp_path):
    """ansible-galaxy builds it; the playbooks parse; YAML and Python pass
    ansible-test's yamllint and pep8 settings."""
    galaxy = _ansible_tool("ansible-galaxy")
    cp = subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    import tarfile
    (tarball,) = tmp_path.glob("ksplice_py-hotpatch-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"README.md", "plugins/modules/patch.py", "plugins/modules/status.py",
            "plugins/module_utils/hotpatch.py", "playbooks/fleet_cutover.yml", "playbooks/apply.yml",
            "roles/install/tasks/main.yml"} <= names, names
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_HOME": str(tmp_path / "home")}
    install = tmp_path / "install.yml"  # the role, as the collection README uses it
    install.write_text("- hosts: all\n  roles:\n    - role: ksplice_py.hotpatch.install\n")
    for book in ("ksplice_py.hotpatch.fleet_cutover", "ksplice_py.hotpatch.apply", str(install)):
        cp = subprocess.run([ANSIBLE_PLAYBOOK, "--syntax-check", "-i", "localhost,", book],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    yamllint = _ansible_tool("yamllint")
    if yamllint:
        config = _ansible_test_root() / "_util/controller/sanity/yamllint/config/default.yml"
        cp = subprocess.run([yamllint, "-s", "-c", str(config), "."], cwd=COLLECTION, capture_output=True, text=True)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    pycodestyle = pytest.importorskip("pycodestyle", reason="pep8 check needs pycodestyle (test extra)")
    style = pycodestyle.StyleGuide(max_line_length=160, ignore=["E402", "W503", "W504", "E741"], quiet=True)
    report = style.check_files([str(p) for p in (COLLECTION / "plugins").rglob("*.py")])
    assert report.total_errors == 0, report.get_statistics()


# -- the tests -----------------------------------------------------------------------

def test_one_pid_per_host_idempotent_check_mode_and_busy(fleet, sshd, tmp_path, fix):
    """The module with ``pid`` (today's single-process commands), ad hoc on
    three hosts: applied where it can be, the busy host fails with the tool's
    reason and is untouched, a second run changes nothing, check mode
    changes nothing, and a revert leaves every target as it was."""
    hosts = fleet(busy=("h3",))
    place_patch(hosts, fix)
    sha = sha256_of(fix)
    args = {"patch": "{{ hotpatch_patch }}", "pid": "{{ target_pid }}",
            "executable": "{{ hotpatch_executable }}", "timeout": 1}

    def adhoc(*extra: str, **changes) -> dict[str, dict]:
        tree = tmp_path / f"tree{len(list(tmp_path.glob('tree*')))}"
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(json.dumps(_inventory(sshd, hosts, fix)))
        cp = subprocess.run([ANSIBLE, "-i", str(inventory), "all", "-m", "ksplice_py.hotpatch.patch",
                             "-a", json.dumps({**args, **changes}), "--tree", str(tree), *extra],
                            capture_output=True, text=True, env=_ansible_env(sshd, tmp_path), cwd=tmp_path,
                            timeout=300)
        results = {f.name: json.loads(f.read_text()) for f in tree.iterdir()}
        assert set(results) == set(hosts), f"{cp.stdout}\n{cp.stderr}"
        return results

    first = adhoc()
    for name in ("h2", "h4"):
        r = first[name]
        assert r["changed"] and r["rc"] == 0, r
        (proc,) = r["processes"]
        assert proc["pid"] == hosts[name].targets[0].pid and proc["result"] == "applied", proc
        assert proc["edition"] == 1 and proc["pause_us"] > 0 and proc["exit_code"] == 0, proc
        assert_patched(hosts[name].targets[0], sha)
    busy = first["h3"]
    assert busy["rc"] == 3 and not busy["changed"], busy  # (--tree leaves out "failed")
    assert busy["msg"].startswith("hotpatch: no safe moment"), busy["msg"]
    assert busy["rc"] == 3 and busy["processes"][0]["exit_code"] == 3, busy
    assert_untouched(hosts["h3"], hosts["h3"].targets[0])

    again = adhoc()
    for name in ("h2", "h4"):
        assert not again[name]["changed"], again[name]
        assert again[name]["processes"][0]["reason"] == "already applied as edition 1", again[name]

    probe = adhoc("--check")  # h3: the patch fits, no moment is safe now: a warning, not a failure
    for name in HOSTS:
        assert probe[name]["rc"] == 0, probe[name]
    assert not probe["h2"]["changed"] and probe["h3"]["changed"], probe
    assert_untouched(hosts["h3"], hosts["h3"].targets[0])

    undone = adhoc(state="reverted")
    assert undone["h2"]["changed"] and undone["h4"]["changed"] and not undone["h3"]["changed"], undone
    for h in hosts.values():
        for t in h.targets:
            assert_untouched(h, t)


def test_cutover_playbook_check_mode_then_every_host_then_nothing_changed(fleet, playbook, fix):
    """The example playbook on three healthy hosts: a dry run touches
    nothing; the real run patches every process of every host, batch by
    batch; a second run and a dry run then report nothing to change."""
    hosts = fleet()
    sha = sha256_of(fix)
    place_patch(hosts, fix)  # a dry run copies nothing
    dry = playbook("fleet_cutover", hosts, "--check", copy=False)
    assert dry.cp.returncode == 0, dry.output
    for h in hosts.values():
        assert dry.changed(h.name) == 1, dry.output  # would prepare
        for t in h.targets:
            assert_untouched(h, t)

    run = playbook("fleet_cutover", hosts, hotpatch_serial=2)  # two batches
    assert run.cp.returncode == 0, run.output
    for h in hosts.values():
        assert run.failed(h.name) == 0 and run.changed(h.name) == 2, run.output  # prepare, cutover
        for t in h.targets:
            assert_patched(t, sha)
    assert run.output.count("2 processes run the patch") == len(hosts), run.output

    again = playbook("fleet_cutover", hosts, hotpatch_serial=len(hosts))
    assert again.cp.returncode == 0, again.output
    assert all(again.changed(h) == 0 and again.failed(h) == 0 for h in hosts), again.output
    for h in hosts.values():
        for t in h.targets:
            assert_patched(t, sha)


def test_busy_host_abort_path_then_apply_where_possible(fleet, playbook, fix):
    """h3 has a process parked inside the patched function. The cutover
    playbook in batches of two hosts: h2 is switched, h3 finds no safe
    moment; the rescue aborts the prepared editions everywhere and reverts
    what was switched (rollback); h4's batch still runs (a failure budget of
    100%: Ansible would stop at a batch that failed whole) but switches
    nothing: every target is as it was. Then the apply playbook: h3 fails
    with the tool's reason, the others are patched."""
    hosts = fleet(busy=("h3",))
    sha = sha256_of(fix)
    run = playbook("fleet_cutover", hosts, hotpatch_serial=2, hotpatch_rollback=True,
                   hotpatch_max_fail_percentage=100)
    assert run.cp.returncode == 2, run.output  # ansible-playbook: a host failed
    assert run.failed("h3") == 1 and run.failed("h2") == run.failed("h4") == 0, run.output
    assert "no safe moment" in run.output, run.output
    assert re.search(r"TASK \[Switch the prepared editions\] \**\nskipping: \[h4\]", run.output), run.output
    assert "aborted on every host and the switched ones reverted" in run.output, run.output
    for h in hosts.values():
        for t in h.targets:
            assert_untouched(h, t)

    run = playbook("apply", hosts)
    assert run.cp.returncode == 2, run.output
    for name in ("h2", "h4"):
        assert run.failed(name) == 0 and run.changed(name) == 1, run.output  # the copy was done above
        for t in hosts[name].targets:
            assert_patched(t, sha)
    assert run.failed("h3") == 1, run.output
    busy, other = hosts["h3"].targets
    assert re.search(rf"\[h3\].*hotpatch: process {busy.pid} \(service\): no safe moment to switch",
                     run.output), run.output
    assert_untouched(hosts["h3"], busy)
    assert_patched(other, sha)  # a process failing never stops or harms the others

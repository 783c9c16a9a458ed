#!/usr/bin/python
# Copyright: ksplice_py contributors
# MIT License (see the repository's pyproject.toml)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: patch
short_description: Hot-patch running processes with ksplice_py's hotpatch
version_added: "0.1.0"
description:
  - Applies, stages (prepares), switches (cuts over), discards (aborts) or reverts a
    ksplice_py patch in running processes on the managed host, without restarting them,
    by running the C(hotpatch) command installed there.
  - Editions are recognised by the sha256 of the patch file's content, so the module is
    idempotent. It reports C(changed=false) when every process is already in the requested
    state (already applied, nothing prepared to abort, nothing to revert).
  - With O(pid), one process is handled with the single-process commands
    (C(hotpatch apply PID PATCH) and friends). With O(all=true), every process on the host that
    the patch fits is handled by one machine-wide command (C(hotpatch apply --all PATCH)),
    narrowed by O(pids), O(exe) and O(user).
  - The host fails, with the tool's one-line error as the message, when any process failed.
    The processes are never left stopped or half-patched; a process that failed is running
    exactly as before.
  - Needs root (ptrace) on the managed host; use C(become) or connect as root.
  - C(hotpatch) must be installed on the managed host (see the P(ksplice_py.hotpatch.install#role)
    role); the module searches E(PATH), C(/opt/ksplice_py/bin) and C(/usr/local/bin).
author:
  - ksplice_py contributors (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ksplice_py.hotpatch.hotpatch
options:
  patch:
    description:
      - Path of the patch shared object on the managed host (copy it there first, for example
        with M(ansible.builtin.copy)).
      - As root, C(hotpatch) refuses a patch file owned by another user or writable by group
        or others, and one in a directory that is.
    type: path
    required: true
  pid:
    description:
      - The process to patch. Mutually exclusive with O(all).
    type: int
  all:
    description:
      - Handle every process on the host that the patch fits (it maps every object the patch
        targets and matches its build-id pins). Other processes are not touched.
      - Narrow it with O(pids), O(exe) or O(user). On a machine shared with other work, always
        narrow it, or use a patch whose objects only your processes map.
      - Needs a C(hotpatch) with the machine-wide commands (C(hotpatch apply --all)).
    type: bool
    default: false
  pids:
    description:
      - With O(all=true), only these processes are candidates.
    type: list
    elements: int
  exe:
    description:
      - With O(all=true), only processes running one of these executables are candidates.
    type: list
    elements: path
  user:
    description:
      - With O(all=true), only processes of this user are candidates.
    type: str
  state:
    description:
      - V(applied) runs the whole patch cycle. Nothing to do where it is already applied; a
        process where it is only prepared is skipped (cut it over or abort it).
      - V(prepared) stages the patch (mapped, linked and recorded; the process still runs the
        old code) for a later V(cutover). Nothing to do where it is already prepared or applied.
      - V(cutover) switches the prepared edition of this patch. Nothing to do where it is already
        applied; processes that carry no edition of it are not concerned.
      - V(aborted) discards the prepared edition of this patch; its memory leaves the process.
        Nothing to do where none is prepared.
      - V(reverted) undoes the applied editions of this patch. Nothing to do where none is applied.
      - These are the rules of C(hotpatch VERB --all); with O(pid) the module applies the same
        rules to one process.
    type: str
    choices: [applied, prepared, cutover, aborted, reverted]
    default: applied
  timeout:
    description:
      - Seconds to wait for a safe moment to switch (V(applied), V(cutover), V(reverted)), per
        process. A process where no thread-safe moment came fails with exit code 3 and is left
        untouched. The tool's default is 5 seconds.
    type: float
  sha256:
    description:
      - Refuse the patch unless its content has this sha256 (hex). Checked by the module before
        anything runs, and passed to C(hotpatch --sha256) for the commands that load the patch.
    type: str
  jobs:
    description:
      - With O(all=true), how many processes are worked on in parallel (the tool's default is the
        number of CPUs).
    type: int
  probe:
    description:
      - In check mode, for V(applied) and V(prepared), run C(hotpatch check) to learn which
        processes the patch fits and whether a moment would be safe right now. C(hotpatch check)
        prepares, probes and aborts - the process is left running exactly as it was, but it
        is attached to and stopped for microseconds, and keeps the tool's 8 KiB injector page
        if it never had it.
      - With V(false), check mode only reads the editions recorded in the processes
        (C(hotpatch list)); with O(all=true) it then cannot tell which processes the patch
        would newly reach, warns, and reports a change.
      - The other states never need it - the editions recorded in the processes decide.
    type: bool
    default: true
  log_file:
    description:
      - Also append the audit record of each change to this file on the managed host (it
        always goes to syslog).
    type: path
notes:
  - Check mode is supported. It reports what would change without changing any process (see
    O(probe)).
  - The per-process results have the fields of C(hotpatch ... --json), whatever the mode.
  - Exit codes of the tool, returned in RV(rc) and per process in C(exit_code) - 0 done,
    2 bad input, 3 no safe moment within the timeout (process untouched), 4 the patch does
    not fit, 1 anything else.
seealso:
  - module: ksplice_py.hotpatch.status
"""

EXAMPLES = r"""
- name: Apply a fix to one process
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    pid: "{{ server_pid }}"

- name: Apply it to every nginx worker on the host, pinned to its content
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    all: true
    exe: [/usr/sbin/nginx]
    sha256: "{{ fix_sha256 }}"
    timeout: 10

- name: EBS-style cycle, step 1 - stage it everywhere while everything runs
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    all: true
    exe: [/usr/sbin/nginx]
    state: prepared

- name: Step 2 - the short, planned switch
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    all: true
    exe: [/usr/sbin/nginx]
    state: cutover

- name: Or discard what was staged
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    all: true
    exe: [/usr/sbin/nginx]
    state: aborted

- name: Undo it
  ksplice_py.hotpatch.patch:
    patch: /var/lib/hotpatch/fix.so
    all: true
    exe: [/usr/sbin/nginx]
    state: reverted
"""

RETURN = r"""
processes:
  description:
    - One entry per process considered, with the fields of C(hotpatch ... --json).
    - In check mode, the result each process would have; C(edition) and C(pause_us) are then null.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: Process id.
      type: int
      sample: 4121
    name:
      description: Command name of the process.
      type: str
      sample: nginx
    result:
      description:
        - V(applied) - the requested change was made (or would be, in check mode).
        - V(skipped) - nothing to do, or not a candidate; C(reason) says why.
        - V(failed) - the change failed; the process is untouched; C(reason) is the tool's error.
      type: str
      sample: applied
    edition:
      description: Id of the edition in the process (null when none was created or found).
      type: int
      sample: 1
    pause_us:
      description: How long the process was stopped for the switch, in microseconds.
      type: float
      sample: 212.0
    reason:
      description: Why it was skipped or failed; empty when applied.
      type: str
      sample: already applied (edition 1)
    exit_code:
      description: The tool's exit code for this process.
      type: int
      sample: 0
summary:
  description:
    - How many processes were V(applied), V(skipped) and V(failed), as the tool's summary
      line counts them. (Not top-level keys - Ansible reserves C(skipped) and C(failed).)
  returned: always
  type: dict
  sample: {applied: 3, skipped: 0, failed: 0}
rc:
  description: Exit code of the C(hotpatch) command that failed; 0 when the module succeeded.
  returned: always
  type: int
  sample: 0
cmd:
  description: The C(hotpatch) commands run, in order.
  returned: always
  type: list
  elements: list
sha256:
  description: sha256 of the patch file; the identity of its editions.
  returned: always
  type: str
  sample: 9f2c...
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ksplice_py.hotpatch.plugins.module_utils.hotpatch import (
    APPLIED, FAILED, SKIPPED, file_sha256, find_hotpatch, is_usage_error, process_result, run, selection,
    summary)

# state -> the hotpatch command that reaches it
VERB = {"applied": "apply", "prepared": "prepare", "cutover": "cutover",
        "aborted": "abort", "reverted": "revert"}
TIMED = ("apply", "cutover", "revert")  # the commands that take --timeout
LOADING = ("apply", "prepare", "check")  # ... and those that load the patch


def argument_spec():
    return dict(
        patch=dict(type="path", required=True),
        pid=dict(type="int"),
        all=dict(type="bool", default=False),
        pids=dict(type="list", elements="int"),
        exe=dict(type="list", elements="path"),
        user=dict(type="str"),
        state=dict(type="str", default="applied", choices=list(VERB)),
        timeout=dict(type="float"),
        sha256=dict(type="str"),
        jobs=dict(type="int"),
        probe=dict(type="bool", default=True),
        log_file=dict(type="path"),
        executable=dict(type="path"),
    )


class Run(object):
    """What this invocation did: commands, per-process results, last exit code."""

    def __init__(self, module, hotpatch, sha):
        self.module = module
        self.hotpatch = hotpatch
        self.sha = sha
        self.cmds = []
        self.processes = []
        self.rc = 0
        self.assume_changed = False  # check mode without probe: cannot tell

    def hotpatch_run(self, args):
        outcome = run(self.module, self.hotpatch, args)
        self.cmds.append(outcome.cmd)
        self.rc = outcome.rc
        return outcome

    def options(self, verb):
        """The options of ``verb`` that the module's parameters ask for."""
        p = self.module.params
        args = []
        if p["timeout"] is not None and verb in TIMED:
            args += ["--timeout", p["timeout"]]
        if p["sha256"] and (verb in LOADING or p["all"]):
            args += ["--sha256", p["sha256"]]
        if p["log_file"] and verb != "check":
            args += ["--log-file", p["log_file"]]
        return args

    def finish(self, failure=None):
        counts = summary(self.processes)
        # Ansible fails a result whose rc is not 0: rc is the failing command's.
        result = dict(changed=counts[APPLIED] > 0 or self.assume_changed, processes=self.processes, summary=counts,
                      rc=(self.rc or 1) if failure else 0, cmd=self.cmds, sha256=self.sha)
        if failure:
            self.module.fail_json(msg=failure, **result)
        self.module.exit_json(**result)


# -- what one process needs ------------------------------------------------------

class Skip(object):
    """Nothing to do in a process: why (None: it carries nothing this state
    acts on), and the edition of this patch it carries, if any."""

    def __init__(self, reason, edition=None):
        self.reason = reason
        self.edition = edition


def plan(state, editions):
    """[(verb, edition id)] that bring one process to ``state``, or a Skip,
    given this patch's editions in it: the rules of ``hotpatch VERB --all``."""
    applied = [e["id"] for e in editions if e.get("state") == "applied"]
    prepared = [e["id"] for e in editions if e.get("state") == "prepared"]
    if state == "applied":
        if applied:
            return Skip("already applied as edition %d" % applied[0], applied[0])
        if prepared:
            return Skip("prepared as edition %d; cut it over or abort it" % prepared[0], prepared[0])
        return [("apply", None)]
    if state == "prepared":
        if applied or prepared:
            kind, eid = ("applied", applied[0]) if applied else ("prepared", prepared[0])
            return Skip("already %s as edition %d" % (kind, eid), eid)
        return [("prepare", None)]
    if state == "cutover":
        if prepared:
            return [("cutover", prepared[0])]
        return Skip("already applied as edition %d" % applied[0], applied[0]) if applied else Skip(None)
    if state == "aborted":
        if prepared:
            return [("abort", prepared[0])]
        return (Skip("applied as edition %d, not prepared; revert it instead" % applied[0], applied[0])
                if applied else Skip(None))
    if applied:
        return [("revert", eid) for eid in applied]  # newest first
    return Skip("only prepared as edition %d; abort it instead" % prepared[0], prepared[0]) if prepared else Skip(None)


def of_patch(editions, sha):
    return [e for e in editions or [] if e.get("sha256") == sha]


def skipped(pid, skip):
    return process_result(pid, SKIPPED, edition=skip.edition,
                          reason=skip.reason or "carries no edition of this patch")


def would(pid, steps, note=""):
    """A check-mode result: what a real run would do."""
    verbs = ", ".join(verb for verb, _ in steps)
    return process_result(pid, APPLIED, edition=steps[0][1], reason="check mode: would %s%s" % (verbs, note))


# -- one process (hotpatch VERB PID) ----------------------------------------------

def one_process(r):
    p = r.module.params
    pid = p["pid"]
    listed = r.hotpatch_run(["list", pid])
    if listed.rc != 0:
        r.processes.append(process_result(pid, FAILED, reason=listed.reason, exit_code=listed.rc))
        return r.finish(listed.error)
    steps = plan(p["state"], of_patch(listed.data, r.sha))
    if isinstance(steps, Skip):
        r.processes.append(skipped(pid, steps))
        return r.finish()
    if r.module.check_mode:
        return check_one(r, pid, steps)
    for verb, edition in steps:
        args = [verb, pid] + ([p["patch"]] if verb in LOADING else [edition]) + r.options(verb)
        done = r.hotpatch_run(args)
        if done.rc != 0:
            r.processes.append(process_result(pid, FAILED, edition=edition, reason=done.reason,
                                              exit_code=done.rc))
            return r.finish(done.error)
        data = done.data or {}
        r.processes.append(process_result(pid, APPLIED, edition=data.get("id", edition),
                                          pause_us=data.get("pause_us")))
    return r.finish()


def check_one(r, pid, steps):
    """Check mode: the steps a real run would take; with ``probe``, ``hotpatch
    check`` says first whether the patch fits (it leaves the process as it was)."""
    p = r.module.params
    note = ""
    if p["probe"] and steps[0][0] in LOADING:
        probed = r.hotpatch_run(["check", pid, p["patch"]] + r.options("check"))
        if probed.rc == 3:
            note = "; no safe moment right now"
            r.module.warn("process %d: the patch fits, but no moment was safe to switch it right now" % pid)
        elif probed.rc != 0:
            r.processes.append(process_result(pid, FAILED, reason=probed.reason, exit_code=probed.rc))
            return r.finish(probed.error)
        else:
            note = "; it fits and could be switched now"
    r.processes.append(would(pid, steps, note))
    return r.finish()


# -- every matching process (hotpatch VERB --all) -----------------------------------

def all_processes(r):
    p = r.module.params
    if r.module.check_mode:
        return check_all(r)
    verb = VERB[p["state"]]
    jobs = ["--jobs", p["jobs"]] if p["jobs"] else []
    done = r.hotpatch_run([verb, "--all", p["patch"]] + selection(p) + jobs + r.options(verb))
    if is_usage_error(done):
        return r.finish(NO_FLEET % done.reason)
    r.processes = list(done.data.get("processes", [])) if isinstance(done.data, dict) else []
    failed = [x for x in r.processes if x.get("result") == FAILED]
    if failed:
        return r.finish(first_failure(failed))
    return r.finish(done.error if done.rc else None)


NO_FLEET = "the hotpatch on this host has no machine-wide commands (%s); upgrade it, or use pid"


def first_failure(failed):
    """The host's one-line error: the tool's, for the first process that failed."""
    first = failed[0]
    more = " (and %d more processes failed)" % (len(failed) - 1) if len(failed) > 1 else ""
    reason = first.get("reason") or "failed"
    return "hotpatch: process %s (%s): %s%s" % (first["pid"], first.get("name", "?"), reason, more)


def check_all(r):
    """Check mode: the editions the processes carry decide (``hotpatch list --all``,
    read-only); for the states that load the patch, ``hotpatch check --all``
    (with ``probe``) finds the processes it would newly reach."""
    p = r.module.params
    listed = r.hotpatch_run(["list", "--all"] + selection(p))
    if is_usage_error(listed):
        return r.finish(NO_FLEET % listed.reason)
    if listed.rc != 0:
        return r.finish(listed.error)
    decided = set()
    for proc in (listed.data or {}).get("processes", []):
        steps = plan(p["state"], of_patch(proc.get("editions"), r.sha))
        if isinstance(steps, Skip) and steps.reason is None:
            continue
        decided.add(proc["pid"])
        r.processes.append(skipped(proc["pid"], steps) if isinstance(steps, Skip) else would(proc["pid"], steps))
    if VERB[p["state"]] not in LOADING:
        return r.finish()
    if not p["probe"]:
        r.module.warn("probe=false: the processes the patch would newly reach are not known; "
                      "reporting a change")
        r.assume_changed = True
        return r.finish()
    probed = r.hotpatch_run(["check", "--all", p["patch"]] + selection(p) + r.options("check"))
    if is_usage_error(probed):
        return r.finish(NO_FLEET % probed.reason)
    results = probed.data.get("processes", []) if isinstance(probed.data, dict) else []
    steps = [(VERB[p["state"]], None)]
    failed = []
    for res in results:
        if res["pid"] in decided:
            continue
        if res["result"] == FAILED and res.get("exit_code") == 3:  # fits, not safe this instant
            r.module.warn("process %s: %s" % (res["pid"], res.get("reason")))
            res = would(res["pid"], steps, "; no safe moment right now")
        elif res["result"] == APPLIED:
            res = would(res["pid"], steps, "; it fits and could be switched now")
        elif res["result"] == FAILED:
            failed.append(res)
        r.processes.append(res)
    if failed:
        return r.finish(first_failure(failed))
    if probed.rc not in (0, 3):
        return r.finish(probed.error)
    return r.finish()


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=[("pid", "all")],
        required_one_of=[("pid", "all")],
        supports_check_mode=True,
    )
    p = module.params
    if p["pid"] is not None and (p["pids"] or p["exe"] or p["user"] or p["jobs"]):
        module.fail_json(msg="pids, exe, user and jobs narrow all=true; with pid, one process is handled")
    if p["all"] is False and p["pid"] is None:
        module.fail_json(msg="one of pid or all=true is required")
    sha = file_sha256(module, p["patch"])
    if p["sha256"] and p["sha256"].lower() != sha:
        module.fail_json(msg="patch %s has sha256 %s, not the pinned %s" % (p["patch"], sha, p["sha256"]))
    r = Run(module, find_hotpatch(module), sha)
    if p["all"]:
        all_processes(r)
    else:
        one_process(r)


if __name__ == "__main__":
    main()

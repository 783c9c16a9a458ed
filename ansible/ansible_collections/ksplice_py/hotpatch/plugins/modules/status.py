#!/usr/bin/python
# Copyright: ksplice_py contributors
# MIT License (see the repository's pyproject.toml)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: status
short_description: What is hot-patched on a host (ksplice_py editions)
version_added: "0.1.0"
description:
  - Reports the editions (applied or prepared patches) that running processes on the managed
    host carry, read from the processes themselves by C(hotpatch list). Nothing is changed.
  - With O(all=true) (the default), every process that carries an edition (C(hotpatch list --all));
    with O(pid), one process.
  - Optionally narrowed to the editions of one patch file (O(patch), matched by content) and
    to some processes (O(pids), O(exe)).
author:
  - ksplice_py contributors (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ksplice_py.hotpatch.hotpatch
options:
  pid:
    description:
      - Report this one process (C(hotpatch list PID)). Mutually exclusive with O(all).
    type: int
  all:
    description:
      - Report every process on the host that carries an edition (C(hotpatch list --all)).
        Used when O(pid) is not given.
    type: bool
    default: true
  patch:
    description:
      - Only report the editions of this patch file (same sha256), and list in RV(missing) the
        processes of O(pids) that do not carry it applied.
    type: path
  pids:
    description:
      - With O(all), only report these processes.
    type: list
    elements: int
  exe:
    description:
      - With O(all), only report processes running one of these executables.
    type: list
    elements: path
notes:
  - Needs root (it reads the editions from the processes' memory).
  - C(hotpatch list --all) needs a C(hotpatch) with the machine-wide commands.
seealso:
  - module: ksplice_py.hotpatch.patch
"""

EXAMPLES = r"""
- name: What is patched here
  ksplice_py.hotpatch.status:
  register: hotpatch_status

- name: Every nginx process carries the fix, applied
  ksplice_py.hotpatch.status:
    patch: /var/lib/hotpatch/fix.so
    exe: [/usr/sbin/nginx]
  register: fix
  failed_when: fix.processes | rejectattr('applied') | list | length > 0
"""

RETURN = r"""
processes:
  description: Processes that carry editions (of O(patch), when given), with their editions.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: Process id.
      type: int
    name:
      description: Command name.
      type: str
    exe:
      description: The executable the process runs (empty when it cannot be read).
      type: str
    editions:
      description: Its editions, newest first, as C(hotpatch list --json) reports them
        (C(id), C(state), C(patch), C(sha256), C(pause_us), C(functions), ...).
      type: list
      elements: dict
    applied:
      description: Ids of its applied editions (of O(patch), when given).
      type: list
      elements: int
    prepared:
      description: Ids of its prepared editions (of O(patch), when given).
      type: list
      elements: int
  sample:
    - pid: 4121
      name: nginx
      exe: /usr/sbin/nginx
      applied: [1]
      prepared: []
      editions: [{id: 1, state: applied, patch: fix.so, sha256: "9f2c...", pause_us: 212.0}]
missing:
  description: With O(patch) and O(pids), the pids that do not carry an applied edition of it.
  returned: always
  type: list
  elements: int
sha256:
  description: sha256 of O(patch), when given.
  returned: when O(patch) is given
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ksplice_py.hotpatch.plugins.module_utils.hotpatch import (
    file_sha256, find_hotpatch, is_usage_error, process_name, run, selection)


def exe_of(pid):
    try:
        return os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return ""


def listed(module, hotpatch):
    """[(pid, exe, editions)] from ``hotpatch list``: one process, or every
    process the narrowing options allow (the tool applies them)."""
    p = module.params
    if p["pid"] is not None:
        out = run(module, hotpatch, ["list", p["pid"]])
        if out.rc != 0:
            module.fail_json(msg=out.error, rc=out.rc)
        return [(p["pid"], exe_of(p["pid"]), out.data or [])]
    out = run(module, hotpatch, ["list", "--all"] + selection(p))
    if is_usage_error(out):
        module.fail_json(msg="the hotpatch on this host has no machine-wide commands (%s); use pid"
                             % out.reason, rc=out.rc)
    if out.rc != 0:
        module.fail_json(msg=out.error, rc=out.rc)
    data = out.data if isinstance(out.data, dict) else {}
    return [(x["pid"], x.get("exe", ""), x.get("editions", [])) for x in data.get("processes", [])]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pid=dict(type="int"),
            all=dict(type="bool", default=True),
            patch=dict(type="path"),
            pids=dict(type="list", elements="int"),
            exe=dict(type="list", elements="path"),
            executable=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    sha = file_sha256(module, p["patch"]) if p["patch"] else None
    processes = []
    for pid, exe, editions in listed(module, find_hotpatch(module)):
        if sha:
            editions = [e for e in editions if e.get("sha256") == sha]
        if not editions:
            continue
        processes.append(dict(
            pid=pid, name=process_name(pid), exe=exe, editions=editions,
            applied=[e["id"] for e in editions if e.get("state") == "applied"],
            prepared=[e["id"] for e in editions if e.get("state") == "prepared"]))
    applied = set(x["pid"] for x in processes if x["applied"])
    missing = [pid for pid in p["pids"] or [] if pid not in applied] if sha else []
    result = dict(changed=False, processes=processes, missing=missing)
    if sha:
        result["sha256"] = sha
    module.exit_json(**result)


if __name__ == "__main__":
    main()

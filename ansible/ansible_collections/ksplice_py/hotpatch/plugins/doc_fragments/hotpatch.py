# Copyright: ksplice_py contributors
# MIT License (see the repository's pyproject.toml)
from __future__ import annotations


class ModuleDocFragment(object):
    """What every module of the collection shares: finding ``hotpatch`` on the
    managed host, and the attributes (both modules support check mode)."""

    DOCUMENTATION = r"""
options:
  executable:
    description:
      - Path of the C(hotpatch) command on the managed host, when it is not found on E(PATH),
        in C(/opt/ksplice_py/bin) or in C(/usr/local/bin).
    type: path
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
"""

"""Which source lines a unified diff touches, per file, in the numbering of
the tree before it (lines removed) and after it (lines added)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class FileChange:
    path: str  # as in the tree, after stripping the -pN prefix
    old_lines: set[int] = field(default_factory=set)  # removed, old numbering
    new_lines: set[int] = field(default_factory=set)  # added, new numbering


def _strip(name: str, strip: int) -> str:
    name = name.split("\t")[0].strip()
    return "/".join(name.split("/")[strip:]) if name != "/dev/null" else name


def parse(diff: Path, strip: int) -> dict[str, FileChange]:
    files: dict[str, FileChange] = {}
    current: FileChange | None = None
    old_name = ""
    old = new = left_old = left_new = 0
    for line in diff.read_text(errors="replace").splitlines():
        if left_old > 0 or left_new > 0:  # inside a hunk: content, whatever it looks like
            tag = line[:1] or " "
            if tag == "-":
                current.old_lines.add(old)
                current.new_lines.add(new)  # where something went away
                old, left_old = old + 1, left_old - 1
            elif tag == "+":
                current.new_lines.add(new)
                current.old_lines.add(old)
                new, left_new = new + 1, left_new - 1
            elif tag == " ":
                old, new, left_old, left_new = old + 1, new + 1, left_old - 1, left_new - 1
            continue
        if line.startswith("--- "):
            old_name = _strip(line[4:], strip)
        elif line.startswith("+++ "):
            name = _strip(line[4:], strip)
            name = old_name if name == "/dev/null" else name
            current = files.setdefault(name, FileChange(name))
        elif (m := _HUNK.match(line)) and current is not None:
            old, new = int(m.group(1)), int(m.group(3))
            left_old = int(m.group(2)) if m.group(2) is not None else 1
            left_new = int(m.group(4)) if m.group(4) is not None else 1
    return files

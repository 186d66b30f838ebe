"""Fail if `nbdev_clean` or `nbdev_export` changes a tracked file or creates an untracked one.

Compares the working tree before and after (so it also works with uncommitted edits) and prints
exactly which paths changed, so a forgotten `nbdev_export`/`nbdev_clean` is easy to fix.
"""

import hashlib
import subprocess
import sys
from pathlib import Path


def snapshot():
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, check=True
    ).stdout
    return {
        p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in out.splitlines() if Path(p).is_file()
    }


def main():
    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode != 0:
        print("check_nbdev_clean: not a git work tree; nothing to compare against", file=sys.stderr)
        return 1
    before = snapshot()
    # experiments/ holds papermill notebooks (not exported); cleaning them too undoes what JupyterLab writes on save
    # (kernelspec display name, language_info, execution counts), so a notebook saved from JupyterLab fails this check
    for cmd in (["nbdev_clean"], ["nbdev_clean", "--fname", "experiments"], ["nbdev_export"]):
        r = subprocess.run(cmd)
        if r.returncode:
            print(f"{cmd[0]} failed with exit code {r.returncode}", file=sys.stderr)
            return r.returncode
    after = snapshot()
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    created = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    if changed or created or removed:
        for label, paths in (("changed", changed), ("created", created), ("removed", removed)):
            for p in paths:
                print(f"nbdev_clean/nbdev_export {label}: {p}", file=sys.stderr)
        print(
            "Run `nbdev_export && nbdev_clean && nbdev_clean --fname experiments` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print(f"nbdev_clean and nbdev_export leave all {len(after)} files unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write ``requirements-lock.txt``: the exact versions of rlkd's dependencies in this environment.

The README's and docs' figures are measured in one environment; a fresh ``pip install -e .`` takes the
newest versions, and the embedded default's figures move with them (transformers' initialisation and
kernels change the tiny teacher a new user trains). This lists every package rlkd (with the ``test``
extra) needs, transitively, at the version installed here, so that

    pip install -r requirements-lock.txt && pip install --no-deps -e .

rebuilds the environment the figures came from. Run it from the repository root after measuring:

    python bench/lock.py [--extras test] [--out requirements-lock.txt]
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement


def closure(root: str, extras: list[str]) -> dict[str, str]:
    """name -> installed version for every distribution ``root[extras]`` needs here (``root`` excluded)."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo = [(root, tuple(extras))]
    while todo:
        name, want = todo.pop()
        dist = metadata.distribution(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *want)):
                continue
            key = canonical(req.name)
            try:
                installed = metadata.distribution(req.name).version
            except metadata.PackageNotFoundError:
                continue  # an optional dependency this platform does not install
            if key not in seen:
                seen[key] = installed.split("+")[0]  # torch's "+cpu": the pin matches the build pip finds
                todo.append((req.name, tuple(req.extras)))
    seen.pop(canonical(root), None)
    return seen


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", nargs="*", default=["test"])
    ap.add_argument("--out", default="requirements-lock.txt")
    args = ap.parse_args()
    pins = closure("rlkd", args.extras)
    header = (f"# The environment rlkd's figures were measured in (python bench/lock.py): Python "
              f"{platform.python_version()}, {platform.machine()}, {sys.platform}.\n"
              f"# Install: pip install -r requirements-lock.txt && pip install --no-deps -e .\n"
              f"# torch is the CPU build (on a GPU machine install its CUDA build of the same version first).\n")
    Path(args.out).write_text(header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"wrote {args.out}: {len(pins)} packages")


if __name__ == "__main__":
    main()

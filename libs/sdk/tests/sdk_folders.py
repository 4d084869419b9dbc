"""Folders for the SDK tests, and how to compare them."""

from __future__ import annotations

import os
from pathlib import Path


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under root, by relative path."""
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[Path(dirpath, name).relative_to(root).as_posix()] = None
        for name in filenames:
            path = Path(dirpath, name)
            tree[path.relative_to(root).as_posix()] = path.read_bytes()
    return tree


def make_folder(root: Path, seed: int = 0, big_bytes: int = 3 * 1024 * 1024 + 17) -> Path:
    """A model-like folder: nested files, an empty directory, an executable
    script, a binary file larger than a few transfer chunks."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(f'{{"seed": {seed}}}\n')
    (root / "weights").mkdir()
    (root / "weights" / "model.bin").write_bytes(
        (bytes(range(256)) * (big_bytes // 256 + 1))[: big_bytes - 1] + bytes([seed % 256])
    )
    (root / "weights" / "small.npy").write_bytes(b"\x93NUMPY" + bytes(100))
    (root / "empty-dir").mkdir()
    (root / "tokenizer" / "nested").mkdir(parents=True)
    (root / "tokenizer" / "nested" / "vocab.txt").write_text("a\nb\nc\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return root

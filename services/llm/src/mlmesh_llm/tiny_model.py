"""A small local LLM: a Llama-architecture model with random weights and a
byte-level BPE tokenizer trained with `tokenizers` on text generated here.

Nothing is downloaded. The same seed gives the same weights and tokenizer.

    python -m mlmesh_llm.tiny_model --out DIR [--seed 0]
        [--register HOST:PORT --model tiny-llama --alias champion]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path

import torch

WORDS = (
    "the",
    "a",
    "model",
    "serves",
    "tokens",
    "fast",
    "mesh",
    "gateway",
    "registry",
    "version",
    "alias",
    "stream",
    "batch",
    "feature",
    "vector",
    "query",
    "answer",
    "question",
    "river",
    "mountain",
    "light",
    "shadow",
    "engine",
    "signal",
    "quiet",
    "green",
    "seven",
    "ninety",
    "compute",
    "memory",
    "cache",
    "latency",
    "throughput",
    "request",
    "reply",
    "north",
    "south",
    "east",
    "west",
    "morning",
    "evening",
    "data",
    "learn",
    "predict",
    "rank",
    "embed",
    "search",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        text.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    text += ["".join(chr(c) for c in range(32, 127)), "ünïcödé façade naïve 東京 ✓"]
    return text


def _tokenizer(seed: int, vocab_size: int, extra_special: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """A byte-level BPE trained on the corpus, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(
    out: Path,
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 1024,
) -> Path:
    """Writes the model directory (config, safetensors weights, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(seed, vocab_size)
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random weights, but scaled so the output distribution is not flat: the
    # sampled text then depends visibly on seeds and temperatures.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    (out / "mlmesh-build.json").write_text(
        json.dumps({"seed": seed, "hidden": hidden, "layers": layers, "context": context})
    )
    return out


# Idefics3's prompt tokens around and between images.
IDEFICS3_SPECIAL = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)


def build_vlm(out: Path, *, seed: int = 0, image_size: int = 56, context: int = 512) -> Path:
    """A tiny vision-language model: Idefics3 (a SigLIP-style vision encoder,
    a pixel-shuffle connector, a Llama decoder), random weights, its Pillow
    image processor (no torchvision). Each image is one ``<image>`` in the
    prompt, which the processor expands to (image_size/14)^2/4 image tokens
    between its wrapper tokens (4 and 3 with the defaults).

    Why Idefics3: vLLM 0.32's CLIP- and SigLIP-tower models (LLaVA,
    PaliGemma, Qwen2-VL, ...) import torchvision, which cannot be installed
    beside the CPU torch; Idefics3 imports it nowhere."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3 import Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(seed, 2048, IDEFICS3_SPECIAL)
    patch, scale = 14, 2
    image_tokens = (image_size // patch) ** 2 // scale**2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
        ),
        tokenizer=tokenizer,
        image_seq_len=image_tokens,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=scale,
        image_token_id=processor.image_token_id,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id  # the class default is Llama 3's
    Idefics3ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mlmesh-build.json").write_text(
        json.dumps({"seed": seed, "kind": "idefics3", "image_tokens": image_tokens})
    )
    return out


async def register(target: str, folder: Path, model: str, alias: str, seed: int) -> int:
    """Uploads the folder as a new version unless model@alias exists."""
    from mlmesh_sdk.registry import RegistryClient

    async with RegistryClient(target) as client:
        version = await client.ensure_registered(
            model,
            folder,
            alias=alias,
            reason="local bootstrap",
            description="tiny random-weight Llama for local runs",
            format="hf-causal-lm",
            run_metadata={"builder": "mlmesh_llm.tiny_model", "seed": seed},
            tags={"kind": "llm"},
        )
    return int(version.version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--register", default="", help="registry address to upload to")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--alias", default="champion")
    args = parser.parse_args()
    if not (args.out / "mlmesh-build.json").exists():
        build(args.out, seed=args.seed)
        print(f"built {args.out}")
    if args.register:
        version = asyncio.run(register(args.register, args.out, args.model, args.alias, args.seed))
        print(f"{args.model}@{args.alias} -> version {version}")


if __name__ == "__main__":
    main()

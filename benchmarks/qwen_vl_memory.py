#!/usr/bin/env python
"""Peak resident memory of ONE forward/backward of a 1-image prompt on CPU, at the published
architecture of Qwen2.5-VL-3B-Instruct (or Qwen3-VL-2B-Instruct) with random bf16 weights.

The model is built from the released config values (:mod:`vlm_grpo_ma.models.published`; no
download), the prompt is the real chat template with one 448x448 image and a short question plus
an SFT-like target, tokenised with the real vocabulary; the loss is the mean token cross-entropy.
Reported: parameters, the peak RSS of the process (``ru_maxrss``), RSS after building the model,
tokens, and seconds.  Gradients of all parameters are kept (full fine-tuning).

WARNING: at full size (the default) this peaks at about 19 GiB of RAM for Qwen2.5-VL-3B.  On a
shared or small machine run it with reduced depth, e.g. ``--text_layers 2 --vision_layers 2``
(same widths; the JSON records the depths used).

What it implies for GPU memory (ZeRO-3, bf16 mixed precision, AdamW), per GPU, N GPUs:
``16 B x params / N`` for the model states (bf16 weights 2 + bf16 grads 2 + fp32 master weights 4
+ Adam moments 8), plus the activations of one micro-batch, which this benchmark's peak minus
2x the bf16 weights approximates on CPU (docs/BENCHMARKS.md has the worked numbers).

Usage:
    python benchmarks/qwen_vl_memory.py --text_layers 2 --vision_layers 2   # reduced depth
    python benchmarks/qwen_vl_memory.py                                      # full size (~19 GiB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2.5-vl-3b", choices=["qwen2.5-vl-3b", "qwen3-vl-2b"])
    p.add_argument("--text_layers", type=int, default=None, help="fewer text layers (default: published)")
    p.add_argument("--vision_layers", type=int, default=None, help="fewer vision layers (default: published)")
    p.add_argument("--image", type=int, default=448, help="side of the square image in pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    import torch
    import transformers
    from PIL import Image

    from vlm_grpo_ma.data.collate import build_sft_batch
    from vlm_grpo_ma.models.loading import MODEL_CLASSES
    from vlm_grpo_ma.models.processor import image_only_processor_class
    from vlm_grpo_ma.models.published import PUBLISHED, published_config
    from vlm_grpo_ma.models.real_vocab import load_real_tokenizer

    torch.set_num_threads(args.threads)
    model_type, _, _, ip_kwargs = PUBLISHED[args.arch]
    tokenizer = load_real_tokenizer(model_type)
    ip_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    processor = image_only_processor_class(model_type)(image_processor=ip_cls(**ip_kwargs), tokenizer=tokenizer,
                                                       chat_template=tokenizer.chat_template)
    rss_start = rss_gib()
    t0 = time.perf_counter()
    config = published_config(args.arch, args.text_layers, args.vision_layers)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = getattr(transformers, MODEL_CLASSES[model_type])(config)
    finally:
        torch.set_default_dtype(prev)
    model.train()
    n_params = sum(t.numel() for t in model.parameters())
    rss_model = rss_gib()
    t_build = time.perf_counter() - t0

    image = Image.new("RGB", (args.image, args.image), (120, 60, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Where is the purple square? Answer with a box."}]}]
    target = "<think>The square fills the image.</think><answer>[0, 0, 448, 448]</answer>"
    batch = build_sft_batch(processor, [messages], [target], max_length=100_000)
    inputs = batch.model_inputs(with_labels=True)
    t1 = time.perf_counter()
    out = model(**inputs)
    out.loss.backward()
    t_step = time.perf_counter() - t1
    result = {
        "benchmark": "qwen_vl_memory",
        "arch": args.arch,
        "text_layers": config.text_config.num_hidden_layers,
        "vision_layers": config.vision_config.depth,
        "full_size": args.text_layers is None and args.vision_layers is None,
        "parameters": n_params,
        "dtype": "bfloat16",
        "image": [args.image, args.image],
        "tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()),
        "loss": float(out.loss.detach()),
        "rss_before_model_gib": round(rss_start, 3),
        "rss_after_model_gib": round(rss_model, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "seconds_build": round(t_build, 1),
        "seconds_forward_backward": round(t_step, 1),
        "zero3_model_states_gib_per_gpu": {str(n): round(16 * n_params / n / 2**30, 2) for n in (1, 2, 8)},
        "threads": args.threads,
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if result["full_size"] else f"_t{result['text_layers']}v{result['vision_layers']}"
    path = args.out / f"qwen_vl_memory_{args.arch}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

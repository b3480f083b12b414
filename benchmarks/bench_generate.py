"""Generation benchmark: `hfbatch generate` (local) against the loops a user would write.

No causal LM ships offline, so the model is a GPT-2 built from a config (6 layers, 384 wide,
random weights, greedy) with a BPE tokenizer trained on the sample reviews. Random weights rarely
emit EOS, so nearly every prompt runs its full --max-new-tokens in every contender: the figures
compare the machinery (batching, padding, caching), not the model's luck. Ratios are measured in
one run against `model.generate` called once per prompt (the hand-written loop), and against a
batched loop (left padding, batches of 8 in arrival order).

    python benchmarks/bench_generate.py [--prompts 240] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "generate"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


def build_model(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (ROOT / "sample_data" / "reviews.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(target)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=384, n_layer=6, n_head=6,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(target)


def prompts(count: int, seed: int = 5) -> list[str]:
    base = [json.loads(line)["text"] for line in (ROOT / "sample_data" / "reviews.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    return [f"#{i} " + " ".join(rng.sample(base, rng.choice([1, 1, 2, 3]))) for i in range(count)]


def raw_loops(model_dir: Path, texts: list[str], max_new: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = {}
    with torch.inference_mode():
        model.generate(**tok(texts[:2], return_tensors="pt", padding=True), **kw)  # warm-up
        started = time.perf_counter()
        for text in texts:
            model.generate(**tok(text, return_tensors="pt"), **kw)
        out["one_by_one_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(0, len(texts), 8):
            model.generate(**tok(texts[i:i + 8], return_tensors="pt", padding=True), **kw)
        out["batched_s"] = time.perf_counter() - started
    return out


def hfbatch_run(model_dir: Path, src: Path, name: str, max_new: int, **kw) -> dict:
    from hfbatch.backends.generation import GenerationParams
    from hfbatch.jobs.generate import GenerateOptions, run_generate

    started = time.perf_counter()
    result = run_generate(GenerateOptions(input=src, output=WORK / name, model=str(model_dir), device="cpu",
                                          cache_dir=WORK / "cache", params=GenerationParams(max_new_tokens=max_new), **kw))
    m = result.document["metrics"]
    import pyarrow.parquet as pq

    return {"s": time.perf_counter() - started - m["model_load_seconds"], "tokens": m["tokens_generated"],
            "computed": m["prompts_computed"], "rows": m["rows_total"],
            "texts": pq.read_table(result.output, columns=["generated_text"]).column(0).to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model_dir = WORK / "model"
    build_model(model_dir)
    texts = prompts(args.prompts)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    src = WORK / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), src)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {len(texts)} prompts, "
          f"max_new_tokens {args.max_new_tokens}, GPT-2 6x384 random weights, greedy")
    raw = raw_loops(model_dir, texts, args.max_new_tokens)
    cold = hfbatch_run(model_dir, src, "cold.parquet", args.max_new_tokens, batch_size=8)
    warm = hfbatch_run(model_dir, src, "warm.parquet", args.max_new_tokens, batch_size=8)
    bf16 = hfbatch_run(model_dir, src, "bf16.parquet", args.max_new_tokens, batch_size=8, precision="bf16")
    one = raw["one_by_one_s"]
    print(f"raw model.generate per prompt: {one:.2f} s; raw batched (8, arrival order): {raw['batched_s']:.2f} s "
          f"({one / raw['batched_s']:.2f}x)")
    print(f"hfbatch generate cold, fp32, batch 8 (files read and written): {cold['s']:.2f} s: "
          f"{one / cold['s']:.2f}x the per-prompt loop, {raw['batched_s'] / cold['s']:.2f}x the batched loop; "
          f"{cold['tokens'] / cold['s']:.0f} tokens/s")
    print(f"hfbatch generate --precision bf16: {bf16['s']:.2f} s: {one / bf16['s']:.2f}x the per-prompt loop, "
          f"{cold['s'] / bf16['s']:.2f}x hfbatch fp32; same text as fp32 for "
          f"{sum(a == b for a, b in zip(bf16['texts'], cold['texts'])) / len(texts):.0%} of prompts")
    print(f"hfbatch warm rerun (greedy answers cached): {warm['s']:.2f} s, {warm['rows'] / warm['s']:,.0f} rows/s, "
          f"computed {warm['computed']}")


if __name__ == "__main__":
    main()

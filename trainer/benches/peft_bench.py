#!/usr/bin/env python3
"""PyTorch + PEFT side of the presets `../../shared/bench/peft_lora_bench.py` does not cover.

  --task classify --model-dir DIR --batch 32 --seq 32
      BertForSequenceClassification with LoRA on query/key/value/dense (the head trains too),
      random ids and labels: the MiniLM preset.
  --task matmul
      GFLOP/s of a 1024³ matmul in float32 and bfloat16: the machine's limits.
  --task generate --model-dir DIR --prompt-len P --new-tokens N
      LlamaForCausalLM with an (unmerged) LoRA on all seven projections, greedy `generate` of
      exactly N tokens after a P-token prompt with transformers' KV cache: time to the first
      token and tokens/s after it (generate_bench.rs's peer).
  --task sft --model-dir DIR --rows ROWS.json
      LlamaForCausalLM with LoRA on all seven projections, on the variable-length batches in
      ROWS.json ({"warmup": n, "batches": [[{"ids": [...], "completion_start": k}, ...], ...]}),
      each padded to its longest row, loss on completion tokens only (labels -100 elsewhere),
      as a Trainer with DataCollatorForSeq2Seq would run them: the realistic preset.

Prints one JSON line in the shared script's fields; tokens_per_s counts real (non-padding)
tokens over the timed steps' total time. Needs: torch, transformers, peft.
"""
import argparse, json, os, resource, statistics, time


def matmul_gflops(torch, dtype, n=1024, reps=8):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True, choices=["classify", "sft", "matmul", "generate"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model-dir")
    ap.add_argument("--rows")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--labels", type=int, default=77)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.task == "matmul":
        print(json.dumps({f"{name}_gflops": round(matmul_gflops(torch, getattr(torch, t)), 1)
                          for name, t in [("f32", "float32"), ("bf16", "bfloat16")]}))
        return

    if args.task == "generate":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=dtype)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        model.eval()
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g)

        def run(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            return time.perf_counter() - t0

        run(4)
        first = statistics.median(run(1) for _ in range(3))
        total = run(args.new_tokens)
        print(json.dumps({"first_token_seconds": first,
                          "tokens_per_second": (args.new_tokens - 1) / (total - first),
                          "new_tokens": args.new_tokens,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    if args.task == "classify":
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(
            args.model_dir, num_labels=args.labels, torch_dtype=dtype)
        targets, task = ["query", "key", "value", "intermediate.dense", "output.dense"], "SEQ_CLS"
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)

        def batches():
            for _ in range(args.warmup + args.steps):
                ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
                labels = torch.randint(0, args.labels, (args.batch,), generator=g)
                yield dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels), ids.numel()
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=dtype)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        task = "CAUSAL_LM"
        spec = json.load(open(args.rows))
        args.warmup = spec["warmup"]
        args.steps = len(spec["batches"]) - args.warmup

        def batches():
            for rows in spec["batches"]:
                s = max(len(r["ids"]) for r in rows)
                ids = torch.zeros((len(rows), s), dtype=torch.long)
                mask = torch.zeros_like(ids)
                labels = torch.full_like(ids, -100)
                for i, r in enumerate(rows):
                    n, c = len(r["ids"]), r["completion_start"]
                    ids[i, :n] = torch.tensor(r["ids"])
                    mask[i, :n] = 1
                    labels[i, c:n] = ids[i, c:n]
                yield dict(input_ids=ids, attention_mask=mask, labels=labels), int(mask.sum())

    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets, task_type=task))
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    times, losses, tokens = [], [], 0
    for step, (inputs, n) in enumerate(batches()):
        t0 = time.perf_counter()
        out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            losses.append(out.loss.item())
            tokens += n
    med = statistics.median(times)
    print(json.dumps({
        "engine": f"pytorch {torch.__version__} + peft",
        "task": args.task, "dtype": args.dtype, "rank": args.rank, "threads": args.threads,
        "params_total": total, "params_trainable": trainable,
        "step_ms_median": round(med * 1000, 2), "step_ms_min": round(min(times) * 1000, 2),
        "tokens_per_s": round(tokens / sum(times), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": round(losses[-1], 4),
    }))


if __name__ == "__main__":
    main()

"""The PyTorch side of `make bench-torch`: one measurement per process, so
the driver (compare.py) reads each one's own peak RSS. Prints one JSON line.

  train  --hidden H --layers L --heads N --kv KV --inter I --seq S --batch B --vocab V --steps K
  sft    --gguf FILE --seq S --batch B --steps K
  dpo    --gguf FILE --seq S --batch B --steps K
  generate --gguf FILE --prompts FILE.json --max-new-tokens N

Training is PyTorch 2 eager with transformers' LlamaForCausalLM in f32,
AdamW and gradient clipping at 1.0, on 2 intra-op threads, as posttrain
trains (its defaults: lr 1e-3 / 2e-5, weight decay 0, betas 0.9/0.999).
DPO is posttrain's algorithm: the reference's sequence log-probs computed
once before training (TRL's precompute_ref_log_probs), then each step a
policy forward and backward over chosen and rejected.
"""

import argparse
import json
import statistics
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)

WARMUP = 2


def timed_steps(step, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[WARMUP:] if len(times) > WARMUP else times)


def optimizer(model, lr):
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )


def lm_step(model, opt, ids):
    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.inter,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv,
        max_position_embeddings=a.seq,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).float().train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    opt = optimizer(model, 1e-3)
    secs = timed_steps(lm_step(model, opt, ids), a.steps)
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": a.batch * a.seq / secs, "step_s": secs, "params": params}


def load_gguf(path):
    import os

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="eager",
    )
    return model


def sft(a):
    model = load_gguf(a.gguf).train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    opt = optimizer(model, 2e-5)
    secs = timed_steps(lm_step(model, opt, ids), a.steps)
    return {"tokens_per_s": a.batch * a.seq / secs, "step_s": secs}


def sequence_logprobs(model, ids, mask):
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (tok * mask[:, 1:]).sum(-1)


def dpo(a):
    model = load_gguf(a.gguf).train()
    vocab = model.config.vocab_size
    chosen = torch.randint(0, vocab, (a.batch, a.seq))
    rejected = torch.randint(0, vocab, (a.batch, a.seq))
    mask = torch.zeros(a.batch, a.seq)
    mask[:, a.seq // 4 :] = 1.0  # the response: the last three quarters
    with torch.no_grad():
        ref_c = sequence_logprobs(model, chosen, mask)
        ref_r = sequence_logprobs(model, rejected, mask)
    opt = optimizer(model, 5e-6)
    beta = 0.1

    def step():
        both = torch.cat([chosen, rejected])
        lp = sequence_logprobs(model, both, torch.cat([mask, mask]))
        pc, pr = lp[: a.batch], lp[a.batch :]
        margin = beta * ((pc - ref_c) - (pr - ref_r))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed_steps(step, a.steps)
    return {"tokens_per_s": 2 * a.batch * a.seq / secs, "step_s": secs}


def generate(a):
    from transformers import AutoTokenizer

    import os

    model = load_gguf(a.gguf).eval()
    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf)
    )
    tok.padding_side = "left"
    prompts = json.load(open(a.prompts))
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        # Warm-up on the first prompt, then the timed batch.
        model.generate(
            input_ids=enc.input_ids[:1],
            attention_mask=enc.attention_mask[:1],
            max_new_tokens=4,
            do_sample=False,
        )
        t = time.perf_counter()
        out = model.generate(
            **enc,
            max_new_tokens=a.max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            use_cache=True,
        )
        secs = time.perf_counter() - t
    new = out[:, enc.input_ids.shape[1] :]
    # Tokens each row generated, its end-of-turn token included (as posttrain counts).
    generated = 0
    for row in new.tolist():
        n = 0
        for t_ in row:
            n += 1
            if t_ == eos:
                break
        generated += n
    return {"tokens_per_s": generated / secs, "secs": secs, "tokens": generated}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "sft", "dpo", "generate"])
    for name in ["hidden", "layers", "heads", "kv", "inter", "seq", "batch", "steps"]:
        p.add_argument(f"--{name}", type=int, default=0)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--gguf")
    p.add_argument("--prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()
    out = {"train": train, "sft": sft, "dpo": dpo, "generate": generate}[a.mode](a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

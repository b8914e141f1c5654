"""bench_memory: activation memory per tensor-parallel rank of a real megatron-core GPTModel, with
and without sequence parallelism and activation recompute (selective, full), for the frozen base,
HD-PiSSA, LoRA and full fine-tuning.

What is measured: the peak, over one forward and backward, of the bytes of distinct tensor
storages that autograd holds for backward (`torch.autograd.graph.saved_tensors_hooks`: a storage
counts from the first time it is saved until autograd releases the last reference; weights and
other parameters are excluded). On CPU the process RSS moves by tens of percent with the
allocator's caching; this count is exact and the same on every run. It is the activation memory
SP and recompute act on; it leaves out parameters, gradients, optimizer state and short-lived
temporaries (the adapter's tokens x r products in backward). "base" is the frozen floor: no
adapter, the embedding output made to require grad so the input-gradient backward runs
(megatron-core's frozen linears then save no input); HD-PiSSA and LoRA save each adapted layer's
input for the factor gradients, as full fine-tuning does for the weight gradients.

    .venv/bin/python benchmarks/bench_memory.py                       # LLaMA-shaped, TP=2
    .venv/bin/python benchmarks/bench_memory.py --shape smollm2 --tp 3 --seq 384 1536 --methods base hd-pissa
    # attention memory against s: SDPA core attention vs megatron-core's DotProductAttention (s x s scores)
    .venv/bin/python benchmarks/bench_memory.py --shape smollm2 --layers 2 --tp 1 --seq 512 1024 2048 \
        --methods hd-pissa --sp off --recompute none --attention-backends sdpa local

The "KiB / token" column is the peak over the sequence length: flat in s where attention keeps
O(s) per layer (SDPA's fused kernel saves q, k, v, the output and a log-sum-exp), growing with s
where it keeps the s x s probabilities (`local`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {
    # LLaMA-style block at a CPU-sized width (GQA 16 heads / 8 groups, SwiGLU)
    "llama": dict(model_type="llama", num_layers=4, hidden_size=1024, ffn_hidden_size=2816,
                  num_attention_heads=16, num_query_groups=8, kv_channels=64, vocab_size=8192),
    # SmolLM2-135M's architecture (30 layers, 9 heads / 3 groups, tied embeddings), random weights
    "smollm2": dict(model_type="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                    num_attention_heads=9, num_query_groups=3, kv_channels=64, vocab_size=49152,
                    tie_word_embeddings=True, rope_theta=100000.0),
}
METHODS = ("base", "hd-pissa", "lora", "full")
RECOMPUTE = {
    "none": {},
    # megatron-core's default selective recompute: the core attention (its s x s scores)
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


class SavedTensorMeter:
    """Live bytes of distinct storages saved for backward, and their peak."""

    def __init__(self, exclude_ptrs: set):
        self.exclude, self.refs, self.sizes = exclude_ptrs, {}, {}
        self.live = self.peak = 0

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return _Held(t, None, self)
        if ptr not in self.refs:
            self.refs[ptr], self.sizes[ptr] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        return _Held(t, ptr, self)

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.sizes.pop(ptr)
            del self.refs[ptr]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)


class _Held:
    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor, ptr, meter):
        self.tensor, self.ptr, self.meter = tensor, ptr, meter

    def __del__(self):
        if self.ptr is not None:
            self.meter._release(self.ptr)


def _model_config(shape: str, seq: int):
    from megatron_hdpissa.models.config import ModelConfig

    fields = dict(SHAPES[shape], max_position_embeddings=max(seq, 4096), norm_epsilon=1e-5)
    fields.setdefault("tie_word_embeddings", False)
    fields.setdefault("rope_theta", 10000.0)
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def measure(shape: str, method: str, seq: int, sp: bool, recompute: str, rank: int, backend: str = "sdpa",
            layers: int | None = None) -> dict:
    from megatron_hdpissa import HDPiSSAConfig, apply_hd_pissa
    from megatron_hdpissa.models.gpt import build_gpt_model

    config = _model_config(shape, seq)
    if layers:
        config.num_layers = layers
    overrides = {"sequence_parallel": sp, **RECOMPUTE[recompute]}
    model = build_gpt_model(config, seed=1234, attention_backend=backend, **overrides)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    cfg = HDPiSSAConfig(rank=16, svd_method="randomized")
    if method == "hd-pissa":
        apply_hd_pissa(model, cfg, progress=False)
    elif method == "lora":
        from megatron_hdpissa import LowRankConfig, apply_lowrank

        apply_lowrank(model, LowRankConfig("lora", rank=cfg.rank, svd_method=cfg.svd_method), progress=False)
    # the frozen floor and HD-PiSSA alike: gradients flow from the first block's input on
    model.embedding.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, seq + 1), generator=gen)
    pos = torch.arange(seq).unsqueeze(0)
    meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in model.parameters()})
    with meter.hooks():  # backward too: full recompute saves each block's activations there
        loss = model(input_ids=tokens[:, :-1], position_ids=pos, attention_mask=None,
                     labels=tokens[:, 1:]).mean()
        after_forward = meter.live
        loss.backward()
        del loss
    return {"shape": shape, "method": method, "seq": seq, "sp": sp, "recompute": recompute, "backend": backend,
            "peak_mib": meter.peak / 2 ** 20, "after_forward_mib": after_forward / 2 ** 20}


def _worker(rank, world, tp, port, shape, seqs, methods, out_dir, backends=("sdpa",), sps=(False, True),
            recomputes=tuple(RECOMPUTE), layers=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_hdpissa.distributed import groups as distributed

    distributed.initialize(tensor_model_parallel_size=tp)
    rows = []
    for seq in seqs:
        for method in methods:
            for backend in backends:
                for sp in sps:
                    for recompute in recomputes:
                        rows.append(measure(shape, method, seq, sp, recompute, rank, backend, layers))
                        if rank == 0:
                            print(f"  seq {seq:5d} {method:9s} {backend:5s} SP {'on ' if sp else 'off'} recompute "
                                  f"{recompute:9s}: peak {rows[-1]['peak_mib']:8.1f} MiB", flush=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    distributed.shutdown()


def table(rows_by_rank: list, tp: int) -> str:
    rank0 = rows_by_rank[0]
    lines = ["| seq | method | attention | SP | recompute | peak MiB / rank | KiB / token | x (base, no SP, no recompute) |",
             "|---:|---|---|---|---|---:|---:|---:|"]
    for r in rank0:
        backend = r.get("backend", "sdpa")
        refs = [x for x in rank0 if x["seq"] == r["seq"] and x["method"] == "base" and x.get("backend", "sdpa") == backend
                and not x["sp"] and x["recompute"] == "none"]
        worst = max(rr[rank0.index(r)]["peak_mib"] for rr in rows_by_rank)  # the busiest TP rank
        ratio = f"{worst / refs[0]['peak_mib']:.2f}" if refs else "-"
        lines.append(f"| {r['seq']} | {r['method']} | {backend} | {'on' if r['sp'] else 'off'} | "
                     f"{r['recompute']} | {worst:.1f} | {worst * 1024 / r['seq']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--attention-backends", nargs="+", default=["sdpa"], choices=["sdpa", "local"],
                   help="core attention: SDPA (the default) and / or megatron-core's DotProductAttention")
    p.add_argument("--sp", nargs="+", default=["off", "on"], choices=["off", "on"], help="sequence parallelism")
    p.add_argument("--recompute", nargs="+", default=list(RECOMPUTE), choices=list(RECOMPUTE))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a quick run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from megatron_hdpissa.distributed.groups import free_port

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, TP={args.tp} ({'gloo' if not torch.cuda.is_available() else 'nccl'})")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(args.tp, args.tp, free_port(), args.shape, args.seq, args.methods, out,
                                          args.attention_backends, [x == "on" for x in args.sp], args.recompute,
                                          args.layers), nprocs=args.tp, start_method="spawn")
        rows = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.tp)]
    print(table(rows, args.tp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Bucketed weight broadcast against one collective per tensor and against one flat buffer.

    python benchmarks/weight_sync.py [--width-divisor 16] [--receivers 2] [--bucket-mb 8] [--repeats 25]

The tensors are those of Qwen2.5-VL-7B-Instruct (729: 28 decoder layers, 32 vision
blocks, untied embeddings), built on the meta device from its config with every
width and the vocabulary divided by ``--width-divisor``, then filled with random
bf16 values: 65 MB at the default /16. The default 8 MB buckets split that into 9,
about as many per model as the config's 256 MB buckets give the full 16.6 GB 7B
(65), so packing overlaps the wire in both. One sender and ``--receivers`` receiver
processes share this machine over gloo (loopback TCP), each on one thread. Three
ways to deliver the weights:

- bucketed (ours): ``WeightSender.send`` / ``WeightReceiver.receive``: pack into
  buckets, broadcast, and copy every tensor into the receiver's own parameters;
- per-tensor: one broadcast per parameter, straight into the receiver's parameter
  (as OpenRLHF does, minus the Ray call per tensor that it also makes, so this
  baseline is a lower bound on that approach);
- flat: one broadcast of a single preallocated buffer of the same total size, with
  no packing or unpacking: the floor that any packing scheme can at best reach.

Each is timed from a barrier before to a barrier after all processes finish
(median of ``--repeats``, the methods taking turns, after one warm-up), then checked: every receiver's
parameters must hash to the sender's. Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import torch
import torch.multiprocessing as mp

from mapo_ray.sync import SyncGroup, TensorSpec, WeightReceiver, WeightSender, tensor_spec

METHODS = ("bucketed", "per-tensor", "flat")


def qwen25_vl_7b_specs(divisor: int) -> list[TensorSpec]:
    """Names and shapes of Qwen2.5-VL-7B's parameters with widths and vocabulary divided by ``divisor``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden, heads = 3584 // divisor, 28
    if hidden % heads:
        raise SystemExit(f"--width-divisor {divisor}: hidden size {hidden} does not split into {heads} heads")
    text = dict(
        hidden_size=hidden,
        intermediate_size=18944 // divisor,
        num_hidden_layers=28,
        num_attention_heads=heads,
        num_key_value_heads=4,
        vocab_size=152064 // divisor,
        # Rotary settings shape no parameter; the model is never run.
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = dict(
        depth=32,
        hidden_size=1280 // divisor,
        intermediate_size=3420 // divisor,
        num_heads=16,
        out_hidden_size=hidden,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return [TensorSpec(n, tuple(p.shape), "bfloat16") for n, p in model.named_parameters()]


def make_params(specs: list[TensorSpec], seed: int | None) -> dict[str, torch.Tensor]:
    """Random bf16 parameters (``seed``), or zeros to receive into (``None``), never stale bytes."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    params = {}
    for spec in specs:
        t = torch.zeros(spec.shape, dtype=torch.bfloat16)
        params[spec.name] = t.normal_(generator=g) if g is not None else t
    return params


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b()
    for t in params.values():
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def receiver_main(rank: int, ours, raw, specs, plans, barrier, results) -> None:
    torch.set_num_threads(1)
    receiver = WeightReceiver.join(ours, rank)
    group = SyncGroup.join(raw, rank)
    params = make_params(specs, None)

    def load_weights(weights):
        for name, tensor in weights:
            params[name].copy_(tensor)

    while (job := plans.get()) is not None:
        method, plan, total = job
        flat = torch.empty(total, dtype=torch.uint8) if method == "flat" else None
        barrier.wait()
        if method == "bucketed":
            receiver.receive(plan, load_weights)
        elif method == "per-tensor":
            for t in params.values():
                group.wait(group.broadcast(t), "per-tensor broadcast")
        else:
            group.wait(group.broadcast(flat), "flat broadcast")
        barrier.wait()
        if method != "flat":
            results.put((rank, method, digest(params)))
        params = make_params(specs, None)  # the next run must deliver everything again
    receiver.close()
    group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-divisor", type=int, default=16)
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)

    specs = qwen25_vl_7b_specs(args.width_divisor)
    params = make_params(specs, seed=0)
    total_bytes = sum(t.numel() * t.element_size() for t in params.values())
    want = digest(params)
    world = 1 + args.receivers
    sender = WeightSender(world, int(args.bucket_mb * 2**20), timeout_s=120)
    raw = SyncGroup.host(world, "gloo", 120)

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(world)
    results = ctx.Queue()
    plans = [ctx.Queue() for _ in range(args.receivers)]
    procs = [
        ctx.Process(target=receiver_main, args=(r, sender.address, raw.address, specs, plans[r - 1], barrier, results))
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    sender.connect()
    raw.connect({})
    flat = torch.empty(total_bytes, dtype=torch.uint8)
    plan = sender.plan(tensor_spec(n, t) for n, t in params.items())
    print(
        f"{len(specs)} tensors, {total_bytes / 1e6:.1f} MB bf16 (Qwen2.5-VL-7B / {args.width_divisor}), "
        f"{len(plan.buckets)} buckets of <= {args.bucket_mb:g} MB, {args.receivers} receivers, gloo, "
        f"torch {torch.__version__}",
        flush=True,
    )

    def run(method: str) -> float:
        for q in plans:
            q.put((method, plan, total_bytes))
        barrier.wait()
        start = time.perf_counter()
        if method == "bucketed":
            sender.send(plan, params.items())
        elif method == "per-tensor":
            for t in params.values():
                raw.wait(raw.broadcast(t), "per-tensor broadcast")
        else:
            raw.wait(raw.broadcast(flat), "flat broadcast")
        barrier.wait()
        return time.perf_counter() - start

    for method in METHODS:  # warm-up: first-touch allocations, connections
        run(method)
    # Round-robin, so that load from elsewhere on the machine hits every method alike.
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            samples[method].append(run(method))
    times = {m: statistics.median(v) for m, v in samples.items()}
    for q in plans:
        q.put(None)
    for p in procs:
        p.join()
    sender.close()
    raw.close()
    delivered = [results.get() for _ in range(args.receivers * (1 + args.repeats) * 2)]
    wrong = sorted({(rank, method) for rank, method, got in delivered if got != want})
    if wrong:
        raise SystemExit(f"received parameters differ from the sender's: {wrong}")

    print()
    print(f"{'method':<12} {'time (ms)':>10} {'GB/s':>7} {'vs bucketed':>12}")
    for method in METHODS:
        t = times[method]
        print(f"{method:<12} {t * 1e3:>10.1f} {total_bytes / t / 1e9:>7.2f} {t / times['bucketed']:>11.2f}x")
    print("GB/s: parameter bytes delivered to each receiver per second. All receivers matched the sender bit for bit.")
    ours, base = times["bucketed"], times["per-tensor"]
    print(json.dumps({"benchmark": "weight_sync", "ours_s": ours, "baseline_s": base, "speedup": base / ours}))


if __name__ == "__main__":
    main()

"""Batched MAPO advantages against the per-sample dict loop of the paper's released code.

    python benchmarks/advantage.py [--repeats 5] [--device cpu|cuda]

Times ``compute_advantages("mapo")`` and the reference loop at the paper's scale
(512 prompts x G=12) and at 8192 x 16, then the token-level expansion at 2048 and
4096 response tokens against a device-to-device copy of the same output size (the
memory-bandwidth floor). Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from mapo_ray.algo import compute_advantages, expand_to_tokens


def reference_mapo(scores: torch.Tensor, uids: list[str], eps: float = 1e-6) -> torch.Tensor:
    """The released code's shape: uid-keyed dicts filled and read one sample at a time.

    Written here with the pairing done by uid (the released code paired lambda
    with samples by position after reordering the batch: a defect).
    """
    id2score: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i in range(len(uids)):
        id2score[uids[i]].append(scores[i])
    id2mean, id2std, id2lam = {}, {}, {}
    for uid, group in id2score.items():
        values = torch.stack(group)
        id2mean[uid] = values.mean()
        id2std[uid] = values.std(unbiased=False)
        p = (values >= 1.0).float().mean()
        id2lam[uid] = 1 - 4 * p * (1 - p)
    out = torch.zeros_like(scores)
    for i in range(len(uids)):
        uid = uids[i]
        if len(id2score[uid]) == 1 or id2std[uid] == 0:
            continue
        z = (scores[i] - id2mean[uid]) / (id2std[uid] + eps)
        apd = (scores[i] - id2mean[uid]) / (id2mean[uid].abs() + eps)
        out[i] = (1 - id2lam[uid]) * z + id2lam[uid] * apd
    return out


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(prompts: int, group: int, device: torch.device, seed: int = 0):
    """Rewards in {0, .1, ..., 1} for ``prompts`` groups of ``group``, shuffled over the batch."""
    g = torch.Generator().manual_seed(seed)
    n = prompts * group
    scores = torch.randint(0, 11, (n,), generator=g).float() / 10
    perm = torch.randperm(n, generator=g)
    group_ids = (torch.arange(n) // group)[perm]
    return scores.to(device), group_ids.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")

    rows = []
    headline = None
    for prompts, group in ((512, 12), (8192, 16)):
        scores, group_ids = make_batch(prompts, group, device)
        uids = [f"uid-{g}" for g in group_ids.tolist()]
        cpu_scores = scores.cpu()
        ours = compute_advantages(scores, group_ids, "mapo")
        torch.testing.assert_close(ours.cpu(), reference_mapo(cpu_scores, uids), rtol=1e-4, atol=1e-4)
        t_ours = timeit(lambda: compute_advantages(scores, group_ids, "mapo"), args.repeats, device)
        t_ref = timeit(lambda: reference_mapo(cpu_scores, uids), max(1, args.repeats // 2), torch.device("cpu"))
        rows.append((f"mapo advantages {prompts} x {group}", t_ours, "dict loop", t_ref))
        if (prompts, group) == (512, 12):
            headline = (t_ours, t_ref)
        print(f"  done: {rows[-1][0]}", flush=True)

    scores, group_ids = make_batch(512, 12, device)
    adv = compute_advantages(scores, group_ids, "mapo")
    for length in (2048, 4096):
        lengths = torch.randint(1, length + 1, (adv.numel(),), device=device)
        mask = torch.arange(length, device=device).unsqueeze(0) < lengths.unsqueeze(1)
        like = torch.empty(mask.shape, dtype=torch.float32, device=device)
        src = torch.rand(mask.shape, device=device)
        t_expand = timeit(lambda: expand_to_tokens(adv, mask), args.repeats, device)
        t_copy = timeit(lambda: like.copy_(src), args.repeats, device)
        # Bytes that must move: expansion reads the bool mask and writes float32;
        # the copy reads and writes float32.
        gbps_expand = mask.numel() * 5 / t_expand / 1e9
        gbps_copy = mask.numel() * 8 / t_copy / 1e9
        rows.append(
            (f"expand_to_tokens {adv.numel()} x {length} ({gbps_expand:.0f} GB/s)", t_expand,
             f"copy ({gbps_copy:.0f} GB/s)", t_copy)
        )
        print(f"  done: expand {length}", flush=True)

    print()
    print(f"{'operation':<44} {'ours (ms)':>10} {'baseline':<20} {'base (ms)':>10} {'ratio':>8}")
    for name, t_ours, base_name, t_base in rows:
        print(f"{name:<44} {t_ours * 1e3:>10.3f} {base_name:<20} {t_base * 1e3:>10.3f} {t_base / t_ours:>7.1f}x")
    t_ours, t_ref = headline
    print(json.dumps({"benchmark": "advantage", "ours_s": t_ours, "baseline_s": t_ref, "speedup": t_ref / t_ours}))


if __name__ == "__main__":
    main()

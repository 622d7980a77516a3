"""Run inside the CPU vLLM venv by ``test_vllm_engine.py``; writes what it saw as JSON.

    python tests/integration/vllm_check.py --model DIR --update FILE --prompts FILE --out FILE

One vLLM start (~40 s) serves every step:

1. ``VLLMEngine`` loads ``--model`` and answers ``--prompts`` greedily (version 0), and
   twice more by sampling with one seed (to show seeded sampling repeats itself);
2. a sender process, standing in for learner rank 0, hosts a gloo weight-sync group with
   ``WeightSender``; the engine's worker joins it (``join_weight_sync``) and receives the
   tensors of ``--update`` (safetensors) in several buckets (``receive_weights``);
3. the engine answers the prompts greedily again (version 1).

The test compares step 3 with ``HFEngine`` on the same updated weights. vLLM's CPU
build spawns processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp

SYNC_TIMEOUT_S = 120.0
# Small buckets, so the update travels in several of them as a large model's would.
BUCKET_BYTES = 64 * 1024


def send_update(update_path: str, receivers: int, addresses: mp.Queue, plans: mp.Queue) -> None:
    """Learner rank 0: host the group, then send ``update_path``'s tensors once."""
    from safetensors.torch import load_file

    from mapo_ray.sync import WeightSender, tensor_spec

    weights = load_file(update_path)
    sender = WeightSender(1 + receivers, BUCKET_BYTES, backend="gloo", timeout_s=SYNC_TIMEOUT_S)
    try:
        addresses.put(sender.address)
        sender.connect({r: f"vLLM worker {r - 1}" for r in range(1, 1 + receivers)})
        plan = sender.plan(tensor_spec(name, tensor) for name, tensor in weights.items())
        plans.put(plan)
        sender.send(plan, weights.items())
    finally:
        sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--update", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of chat-templated prompt strings")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from mapo_ray.rollout import VLLMEngine
    from mapo_ray.types import Prompt, SamplingParams

    with open(args.prompts) as f:
        prompts = [Prompt(uid=f"p{i}", text=text) for i, text in enumerate(json.load(f))]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    sampled = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)

    engine = VLLMEngine(args.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    result = {"sync_ranks": engine.sync_ranks, "version_before": engine.weight_version}
    result["before"] = [g.samples[0].response_ids for g in engine.generate(prompts, greedy)]
    result["sampled"] = [
        [[s.response_ids for s in g.samples] for g in engine.generate(prompts, sampled)] for _ in range(2)
    ]

    context = mp.get_context("spawn")
    addresses, plans = context.Queue(), context.Queue()
    sender = context.Process(target=send_update, args=(args.update, engine.sync_ranks, addresses, plans))
    sender.start()
    try:
        engine.join_weight_sync(addresses.get(timeout=SYNC_TIMEOUT_S), first_rank=1)
        plan = plans.get(timeout=SYNC_TIMEOUT_S)
        result["buckets"] = len(plan.buckets)
        result["received_version"] = engine.receive_weights(plan)
    finally:
        sender.join(timeout=SYNC_TIMEOUT_S)
        if sender.is_alive():
            sender.kill()
    result["sender_exitcode"] = sender.exitcode
    result["version_after"] = engine.weight_version
    after = engine.generate(prompts, greedy)
    result["after"] = [
        {
            "prompt_ids": g.samples[0].prompt_ids,
            "response_ids": g.samples[0].response_ids,
            "response_logprobs": g.samples[0].response_logprobs,
            "finish_reason": g.samples[0].finish_reason,
            "weight_version": g.samples[0].weight_version,
        }
        for g in after
    ]
    # The recorded log-prob's definition: tokens drawn from a top-p 0.5 nucleus at
    # temperature 1 carry the untruncated softmax (vLLM's "raw_logprobs").
    nucleus = SamplingParams(n=2, temperature=1.0, top_p=0.5, max_new_tokens=12, seed=11)
    result["nucleus"] = [
        {"prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "response_logprobs": s.response_logprobs}
        for g in engine.generate(prompts, nucleus)
        for s in g.samples
    ]
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

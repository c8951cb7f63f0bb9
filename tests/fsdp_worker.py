"""Run by `tests/test_distributed.py` under `torchrun --nproc_per_node 2` (gloo, CPU) on a model sharded with FSDP2
(`fully_shard` on each decoder layer and on the whole model), beside the same model unsharded:

1. ICA scoring of the sharded model against the unsharded one;
2. training after scoring, as the ICA trainers do: scores before the first step, then at each step its rows are
   scored online with the current parameters, weighted by min-max over the step and trained with the weighted
   token loss through the root module's forward, for three optimizer steps. The unsharded model runs the same steps
   on one process; the scores, weights and final parameters are written for both.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from distributed_worker import sft_data  # noqa: E402
from testing_utils import tiny_llama, tiny_tokenizer  # noqa: E402

from trl_ica import score_ica  # noqa: E402
from trl_ica.scoring.ica import prepare_ica, score_with  # noqa: E402
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.weighting import compute_weights  # noqa: E402


def train_steps(model, tokenizer, train, holdout, distributed):
    """Score every row, then three steps of 4 rows, each scored online and trained with min-max weights; the same
    rows on every process (FSDP2 averages the processes' gradients, so the update is the one-process update)."""
    builder = prepare_ica(model, tokenizer, train, holdout, ICAScoringOptions(num_demos=2), show_progress=False)
    first = score_with(model, builder, batch_size=2, show_progress=False, distributed=distributed).scores
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step_scores, weights = [], []
    for step in range(3):
        rows = [(step * 4 + j) % len(train) for j in range(4)]
        scores = score_with(model, builder, rows, batch_size=2, show_progress=False, distributed=distributed).scores
        w = compute_weights(scores, "batch_minmax")
        step_scores.append(scores.tolist())
        weights.append(w.tolist())
        chats = [train[i]["prompt"] + train[i]["completion"] for i in rows]
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
        loss = (torch.tensor(w, dtype=nll.dtype) * nll.sum(1)).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return first.tolist(), step_scores, weights


def full_parameters(model) -> list[list[float]]:
    out = []
    for p in model.parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(value.detach().reshape(-1).tolist())
    return out


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = tiny_tokenizer()

    def build():
        return tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)

    plain, sharded = build(), build()
    initial = full_parameters(plain)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    local_shapes = [tuple(p.to_local().shape) for p in sharded.parameters()]
    train, holdout = sft_data()
    options = ICAScoringOptions(num_demos=2, form="difference", reduction="sum")  # kNN: embeddings run sharded too
    run = dict(batch_size=1, show_progress=False)
    ours = score_ica(sharded, tokenizer, train, holdout, options, **run)  # rows split between the two processes
    reference = score_ica(plain, tokenizer, train, holdout, options, distributed="local", **run)
    trained = train_steps(sharded, tokenizer, train, holdout, distributed=None)
    alone = train_steps(plain, tokenizer, train, holdout, distributed="local")
    with open(os.path.join(sys.argv[1], f"fsdp-{rank}.json"), "w") as f:
        json.dump(
            {
                "scores": ours.scores.tolist(),
                "reference": reference.scores.tolist(),
                "demos_equal": bool((ours.demo_indices == reference.demo_indices).all()),
                "local_shapes": local_shapes,
                "full_shapes": [tuple(p.shape) for p in plain.parameters()],
                "trained": {
                    "first": trained[0],
                    "step_scores": trained[1],
                    "weights": trained[2],
                    "parameters": full_parameters(sharded),
                },
                "alone": {
                    "first": alone[0],
                    "step_scores": alone[1],
                    "weights": alone[2],
                    "parameters": full_parameters(plain),
                },
                "initial": initial,
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

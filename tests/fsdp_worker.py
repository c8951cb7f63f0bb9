"""Run by `tests/test_distributed.py` under `torchrun --nproc_per_node 2` (gloo, CPU): ICA scoring of a model sharded
with FSDP2 (`fully_shard` on each decoder layer and on the whole model) against the same model unsharded."""

import json
import os
import sys

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from distributed_worker import sft_data  # noqa: E402

from trl_ica import score_ica  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = tiny_tokenizer()
    plain = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    sharded = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    local_shapes = [tuple(p.to_local().shape) for p in sharded.parameters()]
    train, holdout = sft_data()
    options = dict(num_demos=2, batch_size=1, show_progress=False)  # kNN demos: embeddings run sharded too
    ours = score_ica(sharded, tokenizer, train, holdout, **options)  # rows split between the two processes
    reference = score_ica(plain, tokenizer, train, holdout, distributed="local", **options)
    with open(os.path.join(sys.argv[1], f"fsdp-{rank}.json"), "w") as f:
        json.dump(
            {
                "scores": ours.scores.tolist(),
                "reference": reference.scores.tolist(),
                "demos_equal": bool((ours.demo_indices == reference.demo_indices).all()),
                "local_shapes": local_shapes,
                "full_shapes": [tuple(p.shape) for p in plain.parameters()],
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

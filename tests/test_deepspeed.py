"""DeepSpeed ZeRO-3: a model partitioned when it is loaded (`zero3_init_flag`) is run by the trainer's constructor
(kNN embeddings) before any DeepSpeed engine exists. Runs where DeepSpeed is installed (`scripts/test.sh` installs it
into the newest-releases environment); one process, gloo, in a subprocess of its own."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, torch.distributed as dist
from testing_utils import tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from trl_ica.scoring.demonstrations import model_embeddings

dist.init_process_group("gloo")
tokenizer = tiny_tokenizer()
plain = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
plain.save_pretrained(sys.argv[2])
config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1,
                            "train_micro_batch_size_per_gpu": 1})
partitioned = AutoModelForCausalLM.from_pretrained(sys.argv[2])
texts = ["What is 1 plus 2?", "hello there", "a longer sentence about numbers"]
numel_before = sum(p.numel() for p in partitioned.parameters())
reference = model_embeddings(plain, tokenizer, texts)
print(json.dumps({
    "numel_before": numel_before,
    "diff": float(np.abs(reference - model_embeddings(partitioned, tokenizer, texts)).max()),
    "numel_after": sum(p.numel() for p in partitioned.parameters()),
}))
"""


@pytest.mark.multiprocess
def test_knn_embeddings_of_a_zero3_partitioned_model_equal_the_plain_model(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", WORKER, os.path.dirname(__file__), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["numel_before"] == 0  # really partitioned: no parameter holds its data on this process
    assert result["diff"] < 1e-6  # the same float32 computation on the same weights, gathered
    assert result["numel_after"] == 0  # partitioned again afterwards

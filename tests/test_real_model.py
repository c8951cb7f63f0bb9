"""Real-model checks on SmolLM2-135M-Instruct (the embedded default, converted once from its GGUF)."""

import numpy as np
import pytest
import torch
from reference import naive_log_prob

from trl_ica import score_ica
from trl_ica.scoring import prepare_ica

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_ica.assets import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def gsm8k():
    from trl_ica.scenarios import noisy_gsm8k

    train, holdout, _ = noisy_gsm8k(n_train=6, n_holdout=5, n_test=1, noise=0.5, seed=1)
    return train.remove_columns("corruption"), holdout


@pytest.mark.parametrize("selection", ["knn", "fixed"])
def test_real_model_scores_equal_naive(smollm, gsm8k, selection):
    model, tokenizer = smollm
    train, holdout = gsm8k
    result = score_ica(model, tokenizer, train, holdout, demo_selection=selection, show_progress=False)
    builder = prepare_ica(model, tokenizer, train, holdout, demo_selection=selection, show_progress=False)
    cond = np.array([naive_log_prob(model, builder.conditioned(i)) for i in range(len(train))])
    plain = np.array([naive_log_prob(model, builder.unconditioned(i)) for i in range(len(train))])
    np.testing.assert_allclose(result.scores, cond - plain, atol=1e-4)
    # A real instruct model finds real solutions likely: sanity of the numbers themselves
    assert (result.logp_unconditioned / result.num_tokens > -3).all()


def test_real_tokenizer_unconditioned_requests_match_trl_tokenisation(smollm, gsm8k, tmp_path):
    from trl_ica import ICASFTConfig, ICASFTTrainer

    model, tokenizer = smollm
    train, holdout = gsm8k
    args = ICASFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        ica_refresh="online",
        ica_demo_selection="fixed",
        max_steps=1,
    )
    trainer = ICASFTTrainer(model, args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout)
    assert trainer.ica.reuse_unconditioned.all()

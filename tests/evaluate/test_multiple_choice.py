"""Multiple-choice scoring: metrics on known log-likelihoods, the packed engine against plain rows."""

import math

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.evaluate.multiple_choice import (Item, Question, _groups, _layout, accuracy, choice_metrics, encode_items,
                                             encode_pair, evaluate_items, score_questions)
from llmlab.models import load_model

SHOTS = "The following are sums.\n\n" + "".join(f"{i} + {i} =\nAnswer: {2 * i}\n\n" for i in range(6))
ITEMS = ([Item(SHOTS + f"{i} * 3 =\nAnswer:", ["A", "B", "twelve", "a much longer answer"], i % 4, "sums")
          for i in range(7)]
         + [Item(f"Question: short {i}?\nAnswer:", ["x y", "zz", "w", "zz"], 1, "short") for i in range(3)]
         + [Item("", ["empty context", "b"], 0, "none"), Item("Ends in a space: ", ["one", "two"], 1, "space")])


def test_acc_and_acc_norm_differ_on_known_log_likelihoods():
    # "a" is likelier in total, "bbbbbbbb" per character: acc picks the first, acc_norm the second
    m = choice_metrics([-2.0, -8.0], ["a", "bbbbbbbb"], gold=1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (0, 1, 0.0, 1.0)
    # lm-eval's acc_norm divides by characters, acc_bytes by UTF-8 bytes: they part on Chinese text
    m = choice_metrics([-3.0, -4.0], ["短", "ab"], gold=0)  # per char: -3, -2; per byte: -1, -2
    assert (m["pred"], m["pred_norm"], m["acc_norm"], m["acc_bytes"]) == (0, 1, 0.0, 1.0)
    assert choice_metrics([-1.0, -1.0, -1.0], ["x", "y", "z"], gold=0)["pred"] == 0  # ties: the first, as argmax
    records = [{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0, "acc_norm": 0.0}]
    assert accuracy(records) == {"acc": 0.5, "acc_norm": 0.0, "n": 2}


def test_uniform_model_gives_known_log_likelihoods_and_acc_norm_flips():
    """A model with a zero output layer predicts every one of V tokens with 1/V: ll = -tokens * log V."""
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    V = model.config.vocab_size
    records = evaluate_items(model, tok, [Item("Pick one:", ["a", "bbbbbbbb"], gold=1)], progress=False)
    # byte tokens: " a" is 2 tokens, " bbbbbbbb" is 9
    assert records[0]["lls"] == pytest.approx([-2 * math.log(V), -9 * math.log(V)], abs=1e-4)
    assert (records[0]["acc"], records[0]["acc_norm"]) == (0.0, 1.0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-opt", "tiny-gpt-neox", "tiny-mistral"])
def test_packed_scoring_with_prefix_cache_equals_plain_rows(name):
    model, tok = load_model(name)
    questions = encode_items(tok, ITEMS)
    prefixes = [p for p, _ in _groups(questions, "packed")]
    assert max(prefixes) > 100  # the few-shot questions share a cached prefix
    full = score_questions(model, questions, batch_size=5, strategy="full", progress=False)
    for batch_size in (1, 4):
        packed = score_questions(model, questions, batch_size=batch_size, strategy="packed", progress=False)
        for a, b in zip(packed, full):
            assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
            assert [x[1] for x in a] == [x[1] for x in b]


def test_short_questions_share_a_row(tiny_llama):
    model, _ = tiny_llama
    qs = [Question([40 + i for i in range(12)], [[7, 8], [9]]), Question([60, 61, 62, 63], [[7], [5, 6, 4]]),
          Question([70, 71, 72], [[9], [8]])]
    ids, question, part, pos, _ = _layout(qs, 0)
    # rows of 13 tokens: [q0], [4 pads, q1 (4 context + 2 of its second choice), q2 (3 context)]
    assert len(ids) == 2 and question[1] == [-1] * 4 + [1] * 6 + [2] * 3
    assert part[1] == [-1] * 4 + [0, 0, 0, 0, 2, 2] + [0, 0, 0] and pos[1][4:] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    packed = score_questions(model, qs, strategy="packed", progress=False)
    full = score_questions(model, qs, strategy="full", progress=False)
    assert [x[0] for q in packed for x in q] == pytest.approx([x[0] for q in full for x in q], abs=1e-4)


def test_scores_one_question_alone_as_in_a_batch(tiny_llama):
    model, tok = tiny_llama
    questions = encode_items(tok, ITEMS)
    together = score_questions(model, questions, batch_size=16, progress=False)
    for q, expected in zip(questions[:3] + questions[-2:], together[:3] + together[-2:]):
        alone = score_questions(model, [q], progress=False)[0]
        assert [x[0] for x in alone] == pytest.approx([x[0] for x in expected], abs=1e-4)


def test_greedy_flag_marks_the_models_own_continuation(tiny_llama):
    model, tok = tiny_llama
    context = tok("The sky is").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    best, other = int(logits.argmax()), int(logits.argmin())
    (mine, theirs), = score_questions(model, [Question(context, [[best], [other]])], progress=False)
    assert mine[1] is True and theirs[1] is False
    assert mine[0] == pytest.approx(float(torch.log_softmax(logits, -1)[best]), abs=1e-5)


def test_encode_pair_follows_lm_eval():
    _, tok = load_model("tiny-llama")
    ctx, cont = encode_pair(tok, "Answer: ", "yes")  # the trailing space moves to the continuation
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = encode_pair(tok, "", "abc")  # an empty context becomes BOS
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "abc"


def test_long_contexts_are_cut_from_the_left(tiny_llama):
    model, tok = tiny_llama  # 512 positions
    long = Question([3 + i % 250 for i in range(700)], [[5, 6], [7]])
    cut = Question(long.context[-(512 + 1 - 2):], long.continuations)
    assert score_questions(model, [long], progress=False) == score_questions(model, [cut], progress=False)
    with pytest.raises(LlmlabError, match="longer than the model's context"):
        score_questions(model, [Question([1], [[5] * 600])], progress=False)


def test_models_with_input_hooks_are_scored_row_by_row(tiny_llama):
    from llmlab.peft import PromptConfig, apply_prompt

    model, tok = load_model("tiny-llama")
    apply_prompt(model, PromptConfig(virtual_tokens=3))
    questions = encode_items(tok, ITEMS[:4])
    packed = score_questions(model, questions, strategy="packed", progress=False)
    assert packed == score_questions(model, questions, strategy="full", progress=False)
    q = questions[0]
    with torch.no_grad():  # by hand: the prompt adapter sees the whole row, the output is the row's own positions
        logits = model(input_ids=torch.tensor([q.context + q.continuations[2][:-1]])).logits[0]
    logp = torch.log_softmax(logits[len(q.context) - 1:], dim=-1)
    by_hand = sum(float(logp[t, tok]) for t, tok in enumerate(q.continuations[2]))
    assert packed[0][2][0] == pytest.approx(by_hand, abs=1e-4)
    plain = score_questions(tiny_llama[0], questions, progress=False)
    assert packed[0][2][0] != pytest.approx(plain[0][2][0], abs=1e-3)  # the prompt was used


def test_bad_requests_are_clear_errors(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(LlmlabError, match="unknown scoring strategy 'fast'"):
        score_questions(model, [], strategy="fast")
    with pytest.raises(LlmlabError, match="empty choice"):
        evaluate_items(model, tok, [Item("Q:", ["a", ""], 0, "s")], progress=False)
    with pytest.raises(LlmlabError, match="at least one token"):
        score_questions(model, [Question([1, 2], [[]])], progress=False)

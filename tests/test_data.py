"""The retrieval samples of the training mix (data.py): facts where the sample says, answers scored where
the loss looks, filler from the training text alone, one sample per seed."""
import random

import pytest

import data
import eval as evaluation
from tokenizer import Tokenizer

TRAIN = ("The mill stood by the river, and every morning the miller opened the sluice to turn the great wheel. "
         "Farmers brought their grain in carts, waited in the yard and talked about the weather and the prices. ")


@pytest.fixture(scope="module")
def tok(smollm2_checkpoint):
    return Tokenizer(smollm2_checkpoint)


@pytest.fixture(scope="module")
def prose(tok):
    return tok.encode(TRAIN * 60, add_special_tokens=False)


@pytest.mark.parametrize("seed", range(6))
def test_facts_sit_where_the_sample_says_and_the_answers_are_scored(tok, prose, seed):
    s = data.retrieval_sample(tok, prose, 1024, random.Random(seed))
    assert len(s.ids) == len(s.answer_mask) == 1024
    assert 1 <= len(s.asked) <= len(s.facts) <= 10 and len(set(s.asked)) == len(s.asked)
    facts = [tok.decode(s.ids[a:b]) for a, b in s.facts]
    assert all(a < b <= c for (a, b), (c, _) in zip(s.facts, s.facts[1:]))           # in order, never overlapping
    for i, answer in zip(s.asked, s.answers):
        assert answer in facts[i]                                                    # the fact asked holds its answer
    # The masked positions predict exactly the answers' tokens, in the assistant's reply, in the order asked.
    scored = [t + 1 for t, m in enumerate(s.answer_mask) if m]
    reply = tok.decode(s.ids[scored[0]:], skip_special_tokens=False)
    assert tok.decode([s.ids[t] for t in scored]) == " " + " ".join(s.answers)
    assert reply.startswith(" " + s.answers[0]) and reply.endswith("<|im_end|>\n") and scored[0] > s.facts[-1][1]
    assert "assistant" in tok.decode(s.ids[s.facts[-1][1]:scored[0]], skip_special_tokens=False)


def test_filler_is_consecutive_training_prose_and_nothing_of_eval(tok, prose):
    ids, _ = data.make_retrieval_samples(tok, [prose], 1024, 8, seed=3)
    for row in ids.tolist():
        s = tok.decode(row, skip_special_tokens=False)
        assert all(w.instruction not in s for w in (evaluation.PASSKEY, evaluation.MULTIKEY)) and "pass key" not in s.lower()
        assert TRAIN.split(".")[0].split(",")[0] in s
    # With prose of distinct ids, the filler between the facts is one run of consecutive prose tokens.
    counting = list(range(40000, 48000))
    s = data.retrieval_sample(tok, counting, 1024, random.Random(5))
    between = [t for (_, b), (c, _) in zip(s.facts, s.facts[1:]) for t in s.ids[b:c]]
    assert len(s.facts) >= 2 and len(between) > 100 and between == list(range(between[0], between[0] + len(between)))


def test_samples_are_a_function_of_the_seed(tok, prose):
    a = data.make_retrieval_samples(tok, [prose], 512, 4, seed=1)
    b = data.make_retrieval_samples(tok, [prose], 512, 4, seed=1)
    c = data.make_retrieval_samples(tok, [prose], 512, 4, seed=2)
    assert all(x.equal(y) for x, y in zip(a, b)) and not a[0].equal(c[0])
    assert a[0].shape == a[1].shape == (4, 512) and a[1].any(dim=1).all()


def test_every_form_of_fact_comes_up_in_varied_wording():
    rng = random.Random(0)
    facts = [data.make_fact(rng) for _ in range(600)]
    forms = {f for *_, f in facts}
    assert forms == {"number", "word", "name", "code", "key-value", "sentence"}
    for form in forms:
        openings = {s.split()[0] for s, _, _, f in facts if f == form}
        assert len(openings) >= 2, form
    assert all(answer in statement for statement, _, answer, _ in facts)


def test_too_short_a_sample_or_too_little_prose_is_one_clear_error(tok, prose):
    with pytest.raises(data.DataError, match="longer --seq-len"):
        data.retrieval_sample(tok, prose, 64, random.Random(0))
    with pytest.raises(data.DataError, match="training text holds"):
        data.retrieval_sample(tok, prose[:100], 1024, random.Random(0))

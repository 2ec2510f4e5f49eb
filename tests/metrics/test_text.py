"""The text metrics of generated eval answers (metrics/text.py), and how a tokenized eval row splits into the
prompt the model answers and the answer it is scored against (train/evaluation.py)."""

import pytest

from sft_dist.metrics.text import exact_match, rouge_l, scores, token_f1, words
from sft_dist.train.evaluation import prompt_and_answer


def test_words_are_lower_case_without_punctuation_in_any_language():
    assert words("A capital de Moçambique é Maputo.") == ["a", "capital", "de", "moçambique", "é", "maputo"]
    assert words("¿Qué? «Sí» — 0 + 42 = 42.") == ["qué", "sí", "0", "+", "42", "=", "42"]  # + and = are symbols
    assert words("  \n") == []


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert exact_match("Lisboa.", "lisboa") == 1.0
    assert exact_match("The capital is  Lisboa", "the capital is lisboa!") == 1.0
    assert exact_match("Lisboa é a capital", "A capital é Lisboa") == 0.0


@pytest.mark.parametrize("prediction, reference, f1, rl", [
    ("the cat sat", "the cat sat on the mat", 2 * 1 * 0.5 / 1.5, 2 * 1 * 0.5 / 1.5),  # P 3/3, R 3/6
    ("a b c d", "a c b d", 1.0, 0.75),  # the same words (F1 1) in another order: LCS 3 of 4
    ("d c b a", "a b c d", 1.0, 0.25),
    ("x y", "a b", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("", "a", 0.0, 0.0),
    ("a a a", "a", 2 * (1 / 3) * 1 / (1 / 3 + 1), 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # repeats count once each side
])
def test_token_f1_is_a_bag_and_rouge_l_keeps_the_order(prediction, reference, f1, rl):
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert rouge_l(prediction, reference) == pytest.approx(rl)
    assert scores(prediction, reference) == {"exact_match": exact_match(prediction, reference),
                                             "token_f1": pytest.approx(f1), "rouge_l": pytest.approx(rl)}


def test_a_row_splits_into_its_prompt_and_its_first_answer():
    ids = [1, 10, 11, 12, 20, 21, 2, 30, 31, 40, 2]
    labels = [-100, -100, -100, -100, 20, 21, 2, -100, -100, 40, 2]  # a chat row: two assistant turns
    assert prompt_and_answer(ids, labels) == ([1, 10, 11, 12], [20, 21, 2])
    assert prompt_and_answer([1, 5, 6], [1, 5, 6]) is None  # every token carries loss (data.format text)
    assert prompt_and_answer([1, 5, 6], [-100, -100, -100]) is None  # no answer


def test_eval_rows_without_prompts_stop_the_run_before_training():
    from datasets import Dataset
    from transformers import AutoTokenizer

    from sft_dist.config.load import builtin_path
    from sft_dist.errors import SftDistError
    from sft_dist.train.evaluation import EvalGenerations

    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    gen = EvalGenerations(rows=4, tokenizer=tok, num_beams=1, path=None, sync=False)
    text_only = Dataset.from_dict({"input_ids": [[1, 5, 6], [1, 7]], "labels": [[1, 5, 6], [1, 7]]})
    with pytest.raises(SftDistError, match="^metrics.generate_eval_rows: none of the eval rows has a prompt"):
        gen.items(text_only)
    mixed = Dataset.from_dict({"input_ids": [[1, 5, 6], [1, 7, 8, 2], [1, 9, 3, 2]],
                               "labels": [[1, 5, 6], [-100, -100, 8, 2], [-100, -100, 3, 2]]})
    assert gen.items(mixed) == [(1, [1, 7], [8, 2]), (2, [1, 9], [3, 2])]  # the rows with a prompt, in order
    # data.truncation=split: a window that goes on from the row before has only context for a prompt
    windows = EvalGenerations(rows=4, tokenizer=tok, num_beams=1, path=None, sync=False,
                              continued={"eval": frozenset({2})})
    assert windows.items(mixed) == [(1, [1, 7], [8, 2])]

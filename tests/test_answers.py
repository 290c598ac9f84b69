"""The two answer conventions of common.answers, on the cases where they differ (and where they must not)."""

from __future__ import annotations

from common.answers import exact_match, has_answer, retrieval_normalize, squad_normalize, token_f1


def test_a_number_with_a_thousands_comma_is_one_answer_to_em_and_two_tokens_to_retrieval():
    assert squad_normalize("1,858") == "1858"
    assert exact_match("1858", "1,858") == 1.0
    assert retrieval_normalize("1,858") == "1 858"
    assert has_answer("The hall seats 1,858 people.", ["1,858"])  # the passage and the answer split alike


def test_retrieval_splits_on_dashes_so_a_year_in_a_range_is_a_token():
    text = "Frédéric Chopin (1810–1849) was a composer."
    assert has_answer(text, ["1849"])
    assert squad_normalize("(1810–1849)") == "1810–1849"  # the SQuAD script keeps non-ASCII dashes


def test_retrieval_matches_whole_tokens_only():
    assert not has_answer("Mary appeared in 1858.", ["1"])
    assert has_answer("It cost $1 in 1858.", ["1"])


def test_nfkc_makes_full_width_digits_and_ligatures_match_in_retrieval_only():
    assert has_answer("founded in １９１１ by ﬁve monks", ["1911"])
    assert has_answer("founded in １９１１ by ﬁve monks", ["five monks"])
    assert exact_match("１９１１", "1911") == 0.0  # the official EM script does not normalise Unicode


def test_articles_case_and_whitespace_agree_in_both():
    for normalize in (squad_normalize, retrieval_normalize):
        assert normalize("  The  Eiffel Tower ") == "eiffel tower"
    assert abs(token_f1("the Eiffel Tower in Paris", "Eiffel Tower") - 2 / 3) < 1e-9  # P 2/4, R 2/2

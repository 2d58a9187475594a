"""The mutation tool (tests/mutation.py) plants the bugs it says it plants, and samples evenly."""

from __future__ import annotations

from tests.mutation import evenly, mutants_of

SOURCE = '''
def f(x, n=2):
    """Docstrings are not mutated."""
    if x < 0 and n:
        raise ValueError(f"x={x} is negative")
    return -x * n + 0.5
'''


def test_each_site_is_mutated_once_and_the_rest_is_left_alone() -> None:
    mutants = mutants_of(SOURCE)
    found = {(m.line, m.description) for m, _ in mutants}
    assert found == {(2, "2 -> 3"), (4, "Lt -> LtE"), (4, "0 -> 1"), (4, "And -> Or"), (6, "Add -> Sub"),
                     (6, "Mult -> Div"), (6, "drop USub"), (6, "0.5 -> 1.0")}
    namespace: dict = {}
    exec(dict((m.description, s) for m, s in mutants)["drop USub"], namespace)
    assert namespace["f"](3.0) == 3.0 * 2 + 0.5  # the mutant really computes x * n + 0.5
    assert all("Docstrings are not mutated." in s and "is negative" in s for _, s in mutants)


def test_evenly_spreads_a_sample_over_the_whole_list() -> None:
    assert evenly(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly(list(range(10)), None) == evenly(list(range(10)), 20) == list(range(10))

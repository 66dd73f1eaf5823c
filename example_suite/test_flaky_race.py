"""A deliberately timing-dependent test: two writers race with random delays.

Whether it passes depends on the guest's entropy, which comes from the run's seed: it
passes with the default seed and fails for some others, each time the same way. Try
``pytest example_suite/test_flaky_race.py --umtt-seed=N`` with a few values of N.
"""

from pytest_umtt import Machine


def test_first_writer_wins(uml: Machine) -> None:
    race = ("delay() { echo 0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 13 )); }; "
            "(sleep $(delay); echo first >> /tmp/order) & "
            "(sleep $(delay); echo second >> /tmp/order) & wait; cat /tmp/order")
    assert uml.run(race).output.split() == ["first", "second"]

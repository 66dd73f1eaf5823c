"""KUnit suites built into the kernel run at boot and report in KTAP on the console.

Two ways: parse the console yourself (below), or let pytest-umtt turn every case into a
test item: ``pytest --umtt-kunit='list-kunit-test'``.
"""

from pytest_umtt import MachineFactory
from pytest_umtt.ktap import parse_ktap


def test_list_suite_passes(umtt_machine_factory: MachineFactory) -> None:
    machine = umtt_machine_factory("kunit", cmdline=["kunit.enable=1",
                                                     "kunit.filter_glob=list-kunit-test"])
    assert machine.console is not None
    cases = parse_ktap(machine.console.text)
    assert len(cases) > 30
    failed = [case for case in cases if not case.ok]
    assert not failed, "\n".join(f"{c.name}: {' '.join(c.diagnostics)}" for c in failed)

"""KUnit suites built into the kernel run at boot and report in KTAP on the console."""

import re

from pytest_umtt import MachineFactory


def test_list_suite_passes(uml_factory: MachineFactory) -> None:
    machine = uml_factory("kunit", cmdline=["kunit.enable=1", "kunit.filter_glob=list-kunit-test"])
    assert machine.console is not None
    text = machine.console.text
    summary = re.search(r"# list-kunit-test: pass:(\d+) fail:(\d+)", text)
    assert summary, text[-2000:]
    assert int(summary.group(1)) > 10 and summary.group(2) == "0"
    assert not re.search(r"^\s*not ok", text, re.M)

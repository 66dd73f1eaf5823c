"""A user's kernel config over pytest-umtt's fragment: order, what time travel needs,
what did not take, and the spec string the plugin reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_umtt.errors import KernelError
from pytest_umtt.kconfig import (
    DEFAULT_CONFIG,
    KernelConfig,
    did_not_take,
    fragment_options,
    fragment_text,
    merge,
    parse_spec,
)


def selftests(tree: Path, target: str, text: str) -> None:
    folder = tree / "tools" / "testing" / "selftests" / target
    folder.mkdir(parents=True)
    (folder / "config").write_text(text)


def test_nothing_asked_is_the_default_kernel(tmp_path: Path) -> None:
    merged = merge(DEFAULT_CONFIG, tmp_path)
    assert merged.text == fragment_text() and merged.requested == {}
    assert DEFAULT_CONFIG.describe() == "default"


def test_parts_merge_in_order_and_later_wins(tmp_path: Path) -> None:
    fragment = tmp_path / "driver.config"
    fragment.write_text("CONFIG_GPIO_SIM=y\nCONFIG_DUMMY=m\n")
    kunit = tmp_path / ".kunitconfig"
    kunit.write_text("CONFIG_KUNIT=y\nCONFIG_GPIO_SIM=m\n")
    selftests(tmp_path, "gpio", "CONFIG_GPIO_MOCKUP=m\n")
    config = KernelConfig((fragment,), (kunit,), ("gpio",),
                          ("CONFIG_DUMMY=n", "# CONFIG_LKDTM is not set"))
    merged = merge(config, tmp_path)
    assert merged.requested == {"CONFIG_GPIO_SIM": "m", "CONFIG_DUMMY": "n",
                                "CONFIG_KUNIT": "y", "CONFIG_GPIO_MOCKUP": "m",
                                "CONFIG_LKDTM": "n"}
    final = fragment_options(merged.text)
    assert final["CONFIG_GPIO_SIM"] == "m" and final["CONFIG_LKDTM"] == "n"
    assert final["CONFIG_UML_TIME_TRAVEL_SUPPORT"] == "y" and final["CONFIG_SMP"] == "n"
    assert config.describe() == ("default + driver.config + kunit:.kunitconfig + "
                                 "kselftest:gpio + CONFIG_DUMMY=n + # CONFIG_LKDTM is not set")
    assert merged.digest != merge(DEFAULT_CONFIG, tmp_path).digest


@pytest.mark.parametrize(("option", "why"), [
    ("CONFIG_SMP=y", "uniprocessor"),
    ("# CONFIG_UML_TIME_TRAVEL_SUPPORT is not set", "time-travel=ext needs it"),
    ("CONFIG_UML_RANDOM=y", "host entropy"),
])
def test_what_time_travel_needs_wins_by_name(tmp_path: Path, option: str, why: str) -> None:
    with pytest.raises(KernelError, match=f"from --kconfig-add.* contradicts .*{why}"):
        merge(KernelConfig(options=(option,)), tmp_path)


def test_a_contradiction_in_a_file_names_the_file(tmp_path: Path) -> None:
    fragment = tmp_path / "smp.config"
    fragment.write_text("CONFIG_SMP=y\n")
    with pytest.raises(KernelError, match=f"CONFIG_SMP=y \\(from {fragment}\\) contradicts"):
        merge(KernelConfig(fragments=(fragment,)), tmp_path)


def test_bad_requests_are_named(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="--kconfig-add 'GPIO_SIM=m': expected CONFIG_NAME"):
        merge(KernelConfig(options=("GPIO_SIM=m",)), tmp_path)
    with pytest.raises(KernelError, match=r"--kselftest-config nosuch: no .*selftests/nosuch "):
        merge(KernelConfig(kselftest_targets=("nosuch",)), tmp_path)
    with pytest.raises(KernelError, match=r"--kselftest-config \.\./\.\./etc"):
        merge(KernelConfig(kselftest_targets=("../../etc",)), tmp_path)
    with pytest.raises(KernelError, match=r"--kconfig .*missing\.config: No such file"):
        merge(KernelConfig(fragments=(tmp_path / "missing.config",)), tmp_path)


def test_options_that_did_not_take_are_listed_by_name(tmp_path: Path) -> None:
    merged = merge(KernelConfig(options=("CONFIG_GPIO_SIM=m", "CONFIG_PCI=y")), tmp_path)
    after_olddefconfig = "CONFIG_GPIO_SIM=m\n# CONFIG_PCI is not set\n"
    assert did_not_take(after_olddefconfig, merged) == ["CONFIG_PCI=y (got n)"]


def test_the_spec_string_round_trips(tmp_path: Path) -> None:
    spec = f"{tmp_path}/a.config kunit:{tmp_path}/.kunitconfig kselftest:gpio CONFIG_GPIO_SIM=m"
    config = parse_spec(spec, "--umtt-kconfig")
    assert config == KernelConfig((tmp_path / "a.config",), (tmp_path / ".kunitconfig",),
                                  ("gpio",), ("CONFIG_GPIO_SIM=m",))
    assert parse_spec(config.to_spec(), "again") == config
    with pytest.raises(KernelError, match="--umtt-kconfig: No closing quotation"):
        parse_spec("'open", "--umtt-kconfig")


def test_a_target_without_a_config_adds_nothing(tmp_path: Path) -> None:
    (tmp_path / "tools" / "testing" / "selftests" / "rtc").mkdir(parents=True)
    merged = merge(KernelConfig(kselftest_targets=("rtc",)), tmp_path)
    assert merged.requested == {} and merged.text == fragment_text()


def test_uml_additions_follow_a_targets_own_config(tmp_path: Path) -> None:
    # The bonding selftests' config names qdiscs and classifiers; UML's defconfig has no
    # packet scheduler for them to hang from, which pytest-umtt's additions bring.
    selftests(tmp_path, "drivers/net/bonding", "CONFIG_BONDING=y\nCONFIG_NET_SCH_INGRESS=y\n")
    merged = merge(KernelConfig(kselftest_targets=("drivers/net/bonding",)), tmp_path)
    assert merged.requested == {"CONFIG_BONDING": "y", "CONFIG_NET_SCH_INGRESS": "y",
                                "CONFIG_NET_SCHED": "y", "CONFIG_NET_CLS_ACT": "y"}
    assert merged.text.index("# --- from kselftest drivers/net/bonding") < merged.text.index(
        "# --- from pytest-umtt for kselftest drivers/net/bonding under UML")


def test_the_debug_and_coverage_kernels_are_fragments_of_our_own(tmp_path: Path) -> None:
    debug = KernelConfig(debug=True)
    merged = merge(debug, tmp_path)
    assert not debug.empty and debug.describe() == "default + debug"
    assert "\n# --- from --debug\n" in merged.text
    for option in ("CONFIG_KASAN", "CONFIG_UBSAN", "CONFIG_PROVE_LOCKING",
                   "CONFIG_DEBUG_OBJECTS", "CONFIG_KASAN_VMALLOC"):
        assert merged.requested[option] == "y"
    assert merged.requested["CONFIG_UBSAN_ALIGNMENT"] == "n"  # UML would report itself
    assert "CONFIG_KFENCE" not in merged.requested  # arch/um has no HAVE_ARCH_KFENCE
    coverage = merge(KernelConfig(coverage=True), tmp_path)
    assert coverage.requested["CONFIG_GCOV"] == "y"
    assert coverage.requested["CONFIG_MODULES"] == "n"  # UML's GCOV depends on !MODULES
    # Each its own kernel, named by what it asks (the path of the package never counts).
    digests = {merge(config, tmp_path).digest for config in
               (DEFAULT_CONFIG, debug, KernelConfig(coverage=True))}
    assert len(digests) == 3


def test_a_users_fragment_goes_over_the_debug_kernel(tmp_path: Path) -> None:
    fragment = tmp_path / "no-vmalloc.config"
    fragment.write_text("# CONFIG_KASAN_VMALLOC is not set\n")
    merged = merge(KernelConfig(fragments=(fragment,), debug=True), tmp_path)
    assert fragment_options(merged.text)["CONFIG_KASAN_VMALLOC"] == "n"
    assert merged.requested["CONFIG_KASAN_VMALLOC"] == "n"


def test_our_own_variants_are_words_of_the_spec(tmp_path: Path) -> None:
    config = parse_spec(f"+debug {tmp_path}/a.config", "--umtt-kconfig")
    assert config == KernelConfig((tmp_path / "a.config",), debug=True)
    assert config.to_spec() == f"+debug {tmp_path}/a.config"
    assert parse_spec(config.to_spec(), "again") == config
    both = parse_spec("+coverage +debug", "ini")
    assert both.variants == ("debug", "coverage")
    with pytest.raises(KernelError, match=r"ini: '\+kasan' is none of pytest-umtt's own "
                                          r"variants \(\+debug, \+coverage\)"):
        parse_spec("+kasan", "ini")

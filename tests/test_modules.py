"""A kernel variant with modules, on a real kernel: the gpio kselftests' own config
(GPIO_MOCKUP=m, GPIO_SIM=m) over pytest-umtt's fragment, its modules loaded with
parameters and unloaded in the guest, and the variant named where a run is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_umtt import KernelConfig, Machine, Simulation
from pytest_umtt.cache import cache_root
from pytest_umtt.kernel import build_kernel, debian_source, kernel_identity, modules_dir
from pytest_umtt.kselftest import build_kselftests
from pytest_umtt.rootfs import Rootfs

pytestmark = pytest.mark.kernel

GPIO = KernelConfig(kselftest_targets=("gpio",))


@pytest.fixture(scope="module")
def gpio_kernel(uml_kernel: Path) -> Path:
    """The gpio variant, built (incrementally) once and cached."""
    return build_kernel(debian_source(cache_root(), print), config=GPIO)


def test_the_variant_has_its_modules_and_says_so(gpio_kernel: Path) -> None:
    modules = modules_dir(gpio_kernel)
    assert modules is not None
    (release,) = (entry.name for entry in modules.iterdir())
    found = {path.name for path in (modules / release).rglob("*.ko")}
    assert {"gpio-mockup.ko", "gpio-sim.ko"} <= found
    assert (modules / release / "modules.dep").stat().st_size > 0
    identity = kernel_identity(gpio_kernel)
    assert identity.variant == "default + kselftest:gpio"
    assert identity.modules is not None and "modules sha256:" in str(identity)


def test_modprobe_with_parameters_and_rmmod(gpio_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=gpio_kernel, rootfs=rootfs) as sim:
        machine = sim.machine()
        release = machine.run("uname -r", check=True).output.strip()
        assert machine.run(f"test -e /lib/modules/{release}/modules.dep").ok
        machine.run("modprobe gpio-mockup gpio_mockup_ranges=-1,8,-1,3", check=True)
        chips = machine.run("gpiodetect", check=True).output
        assert "gpio-mockup-A" in chips and "(8 lines)" in chips and "(3 lines)" in chips
        assert "gpio_mockup" in machine.run("lsmod", check=True).output
        machine.run("rmmod gpio_mockup", check=True)
        assert "gpio-mockup" not in machine.run("gpiodetect").output
        assert not machine.run("modprobe no-such-module").ok


def test_the_default_kernel_loads_its_own_modules(uml_kernel: Path, rootfs: Rootfs) -> None:
    # defconfig's =m options (loop, tun, dummy, ...) are built and installed too.
    assert modules_dir(uml_kernel) is not None
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine()
        machine.run("modprobe dummy", check=True)
        assert "dummy" in machine.run("lsmod", check=True).output


def test_pytest_takes_the_variant_as_an_option(pytester: pytest.Pytester, gpio_kernel: Path,
                                               real_cache: Path) -> None:
    pytester.makepyfile("""
        import pytest
        from pytest_umtt import KernelConfig

        def test_session_variant(umtt_machine):
            assert umtt_machine.run("modprobe gpio-sim").ok

        @pytest.mark.umtt_machine(kernel=KernelConfig(kselftest_targets=("gpio",)))
        def test_marked_variant(umtt_machine):
            assert umtt_machine.run("modprobe gpio-mockup gpio_mockup_ranges=-1,4").ok
    """)
    result = pytester.runpytest_subprocess("--umtt-kconfig=kselftest:gpio", "-p",
                                           "no:cacheprovider")
    result.stdout.fnmatch_lines(["umtt: kernel *", "*variant: default + kselftest:gpio"])
    result.assert_outcomes(passed=2)


def test_the_gpio_kselftests_pass_on_their_variant(pytester: pytest.Pytester,
                                                   gpio_kernel: Path, real_cache: Path) -> None:
    tree = build_kselftests(["gpio"])
    pytester.makepyfile("def test_nothing_else(): pass")
    result = pytester.runpytest_subprocess(f"--umtt-kselftest={tree}", "-p", "no:cacheprovider",
                                           "--umtt-kconfig=kselftest:gpio", "-v")
    # gpio-mockup.sh reloads the module with parameters; gpio-sim.sh needs configfs,
    # a module here, loaded and mounted by the agent as a distribution's init does.
    result.stdout.fnmatch_lines(["*kselftest::gpio:gpio-mockup.sh PASSED*",
                                 "*kselftest::gpio:gpio-sim.sh PASSED*"])
    result.assert_outcomes(passed=3)


@pytest.mark.umtt_machine(kernel=GPIO)
def test_the_readme_driver_example(umtt_machine: Machine) -> None:
    umtt_machine.run("modprobe gpio-mockup gpio_mockup_ranges=-1,8", check=True)
    umtt_machine.run("echo 1 > /sys/kernel/debug/gpio-mockup/gpiochip0/3", check=True)
    assert umtt_machine.run("gpioget gpiochip0 3").output.strip() == "1"

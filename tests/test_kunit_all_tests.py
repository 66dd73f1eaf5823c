"""KUnit at kunit.py's scale, on a real kernel: the variant of the kernel's own
tools/testing/kunit/configs/all_tests.config (over a thousand cases), its cases as items
named as kunit.py names them, parameterised cases with each parameter reported.

The variant takes minutes to build, so these tests run when it is in the cache and say
how to build it otherwise, except where UMTT_REQUIRE_KERNEL is set (CI): there they build
it. The default kernel's KUnit tests are in test_plugin.py."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from pytest_umtt.cache import cache_root
from pytest_umtt.kconfig import KernelConfig
from pytest_umtt.kernel import (
    build_kernel,
    debian_source,
    patched_source,
    shipped_patches,
    variant_kernel,
)

pytestmark = pytest.mark.kernel

ALL_TESTS = Path("tools/testing/kunit/configs/all_tests.config")


@pytest.fixture(scope="module")
def all_tests_config() -> Path:
    """all_tests.config of the tree pytest-umtt builds from, its variant built."""
    cache = cache_root()
    tree = patched_source(debian_source(cache, print), shipped_patches(), cache, print).path
    config = tree / ALL_TESTS
    variant = KernelConfig(kunitconfigs=(config,))
    if os.environ.get("UMTT_REQUIRE_KERNEL"):
        build_kernel(debian_source(cache, print), config=variant)
    if not variant_kernel(variant).is_file():
        pytest.skip(f"the all_tests KUnit variant is not built: umtt-kernel build "
                    f"--kunitconfig {shlex.quote(str(config))}")
    return config


def test_a_parameterised_case_reports_each_parameter(
        pytester: pytest.Pytester, all_tests_config: Path, real_cache: Path) -> None:
    # lib/kunit/kunit-example-test.c: example_params_test runs values 3, 2, 1 and 0 and
    # skips those that are not powers of two; example_skip_test skips.
    result = pytester.runpytest_subprocess(
        f"--umtt-kconfig=kunit:{all_tests_config}", "--umtt-kunit=example*", "-v", "-rs",
        "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines_random([
        "*kunit::example.example_params_test PASSED*",
        "*kunit::example.example_params_test SUBSKIPPED[[]example value 0[]]*",
        "*kunit::example.example_params_test SUBPASSED[[]example value 2[]]*",
        "*kunit::example.example_params_test SUBSKIPPED[[]example value 3[]]*",
        "SKIPPED * unsupported param value 3",
        "*kunit::example.example_skip_test SKIPPED (this test should be skipped)*",
        "*kunit::example_init.example_init_test PASSED*",
        "[12] simulations: *"])  # the listing boot, unless an earlier session's was kept
    assert "failed" not in result.parseoutcomes()


def test_every_case_of_a_few_suites_runs_in_one_boot(
        pytester: pytest.Pytester, all_tests_config: Path, real_cache: Path) -> None:
    # -k keeps three suites of the ~540 cases listed: one boot runs them all.
    result = pytester.runpytest_subprocess(
        f"--umtt-kconfig=kunit:{all_tests_config}", "--umtt-kunit=*", "-p", "no:cacheprovider",
        "-k", "list-kunit-test or kunit_status or string-stream-test", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 40 and outcomes["deselected"] > 400
    assert "failed" not in outcomes
    result.stdout.fnmatch_lines(["[12] simulations: *"])  # a kept listing boots none

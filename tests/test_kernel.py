"""umtt-kernel: config fragment, cached builds, checks and bad input.

Builds of the real kernel are exercised by .ci/run (umtt-kernel build) and the
real-kernel tests; here fake source trees make each failure mode happen on demand.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pytest_umtt import kernel
from pytest_umtt.errors import CacheError, KernelBuildError, KernelError
from pytest_umtt.kconfig import KernelConfig, fragment_options, fragment_text
from pytest_umtt.kernel import (
    KernelSource,
    build_kernel,
    check_kernel,
    user_source,
)

FAKE_MAKEFILE = """\
kernelversion:
\t@echo 9.9.9-fake
defconfig:
\t@mkdir -p $(O) && echo '# fake defconfig' > $(O)/.config
olddefconfig:
\t@cat $(O)/umtt.config >> $(O)/.config
linux:
\t@{linux_recipe}
modules:
\t@echo modules built >> $(O)/modules.log
modules_install:
\t@mkdir -p $(INSTALL_MOD_PATH)/lib/modules/9.9.9-fake/kernel
\t@printf 'module' > $(INSTALL_MOD_PATH)/lib/modules/9.9.9-fake/kernel/x.ko
\t@echo "depmod=$(DEPMOD)" > $(INSTALL_MOD_PATH)/lib/modules/9.9.9-fake/modules.dep
"""


def fake_tree(root: Path, linux_recipe: str = "printf 'fake kernel' > $(O)/linux") -> Path:
    """A tree that looks like Linux to umtt-kernel, with a scripted ``make linux``."""
    tree = root / "linux"
    (tree / "arch" / "um").mkdir(parents=True)
    (tree / "include" / "uapi" / "linux").mkdir(parents=True)
    (tree / "include" / "uapi" / "linux" / "um_timetravel.h").write_text(
        "union um_timetravel_schedshm_client;\n")
    (tree / "scripts" / "kconfig").mkdir(parents=True)
    merge = tree / "scripts" / "kconfig" / "merge_config.sh"
    merge.write_text("#!/bin/sh\nexit 0\n")
    merge.chmod(0o755)
    (tree / "Makefile").write_text(FAKE_MAKEFILE.format(linux_recipe=linux_recipe))
    return tree


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("UMTT_CACHE_DIR", str(root))
    return root


def umtt_kernel(*args: str, env_cache: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = dict(os.environ, UMTT_CACHE_DIR=str(env_cache))
    builder: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "pytest_umtt.kernel", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kwargs)
    return builder


# --- the fragment ---------------------------------------------------------------------

def test_fragment_has_what_time_travel_and_determinism_need() -> None:
    options = fragment_options(fragment_text())
    assert options["CONFIG_UML_TIME_TRAVEL_SUPPORT"] == "y"
    assert options["CONFIG_SMP"] == "n"
    # The host's entropy never reaches the guest; the only hwrng is virtio-rng (seeded).
    assert options["CONFIG_UML_RANDOM"] == "n"
    for needed in ("CONFIG_HOSTFS", "CONFIG_VIRTIO_UML", "CONFIG_SOFT_WATCHDOG",
                   "CONFIG_UML_RTC", "CONFIG_KUNIT", "CONFIG_TMPFS", "CONFIG_DEVTMPFS",
                   "CONFIG_VIRTIO_CONSOLE", "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_VIRTIO_NET",
                   "CONFIG_GPIO_VIRTIO"):
        assert options[needed] == "y", needed


# --- sources --------------------------------------------------------------------------

def test_source_that_is_not_linux(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="is not a Linux source tree"):
        user_source(tmp_path)


def test_source_without_time_travel(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    (tree / "include" / "uapi" / "linux" / "um_timetravel.h").unlink()
    with pytest.raises(KernelError, match="no time-travel=ext protocol"):
        user_source(tree)


def test_source_without_shm_scheduler(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    (tree / "include" / "uapi" / "linux" / "um_timetravel.h").write_text("struct x;\n")
    with pytest.raises(KernelError, match="not the shared-memory scheduler"):
        user_source(tree)


def test_source_key_follows_git_state(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "add", "."], check=True)
    subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "x"], check=True)
    clean = user_source(tree)
    assert clean.version == "9.9.9-fake"
    (tree / "Makefile").write_text((tree / "Makefile").read_text() + "# edit\n")
    dirty = user_source(tree)
    fragment = fragment_text()
    assert kernel.kernel_key(clean, fragment) != kernel.kernel_key(dirty, fragment)


# --- builds ---------------------------------------------------------------------------

def test_build_is_cached_and_published_whole(tmp_path: Path, cache: Path) -> None:
    source = user_source(fake_tree(tmp_path))
    first = build_kernel(source, jobs=1)
    assert first.read_bytes() == b"fake kernel"
    assert (first.parent / "config").is_file() and (first.parent / "build.log").is_file()
    assert not list(first.parent.parent.glob("*.partial-*"))
    (first.parent / "build.log").write_text("marker")
    assert build_kernel(source, jobs=1) == first
    assert (first.parent / "build.log").read_text() == "marker"  # not rebuilt


def test_failed_build_names_the_log_and_keeps_nothing(tmp_path: Path, cache: Path) -> None:
    source = user_source(fake_tree(tmp_path, "echo 'error: boom in drivers/x.c'; exit 2"))
    with pytest.raises(KernelBuildError) as failure:
        build_kernel(source, jobs=1)
    message = str(failure.value)
    assert "exit 2" in message and "boom in drivers/x.c" in message
    assert str(failure.value.log) in message and failure.value.log.is_file()
    assert not list((cache / "kernels").glob("*/linux"))


def test_fragment_option_that_does_not_stick_is_named(tmp_path: Path, cache: Path) -> None:
    tree = fake_tree(tmp_path)
    makefile = tree / "Makefile"
    makefile.write_text(makefile.read_text().replace(
        "\t@cat $(O)/umtt.config >> $(O)/.config",
        "\t@grep -v CONFIG_UML_TIME_TRAVEL_SUPPORT $(O)/umtt.config >> $(O)/.config"))
    with pytest.raises(KernelBuildError, match=r"CONFIG_UML_TIME_TRAVEL_SUPPORT=y \(got n\)"):
        build_kernel(user_source(tree), jobs=1)


def test_unwritable_cache_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("UMTT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CacheError, match=f"cache directory {blocker}/cache is not usable"):
        build_kernel(user_source(fake_tree(tmp_path)), jobs=1)


def test_missing_build_tools_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernel, "LIBELF_HEADER", tmp_path / "libelf.h")
    assert kernel.missing_build_tools() == ["make", "gcc", "flex", "bison", "bc", "patch",
                                           "libelf-dev"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(KernelError, match="install them with: sudo apt-get install"):
        kernel.ensure_build_tools(lambda _: None)


def test_two_builds_at_once_build_once(tmp_path: Path, cache: Path) -> None:
    count = tmp_path / "builds"
    tree = fake_tree(tmp_path, f"echo x >> {count}; printf k > $(O)/linux")
    builders = [umtt_kernel("build", "--source", str(tree), env_cache=cache) for _ in range(2)]
    outputs = [b.communicate(timeout=60) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert count.read_text() == "x\n"


def test_ctrl_c_mid_build_leaves_nothing(tmp_path: Path, cache: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    tree = fake_tree(tmp_path, f"echo started > {fifo}; sleep 600")
    builder = umtt_kernel("build", "--source", str(tree), env_cache=cache,
                          start_new_session=True)
    # Opened without blocking: a build that fails early must fail the test, not hang it.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(reader) as started:
        ready, _, _ = select.select([started], [], [], 60)
        assert ready and started.read() == "started\n", builder.communicate(timeout=30)
    descendants = psutil.Process(builder.pid).children(recursive=True)
    os.killpg(builder.pid, signal.SIGINT)
    _, err = builder.communicate(timeout=30)
    assert builder.returncode == 130, err
    assert "interrupted" in err
    assert not [p for p in descendants if p.is_running() and p.status() != "zombie"]
    assert not list((cache / "kernels").glob("*/linux"))
    assert not list((cache / "kernels").glob("*.partial-*"))


def test_the_build_sees_no_toolchain_of_the_users(tmp_path: Path, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A rustc on the user's PATH became CONFIG_RUSTC_VERSION, and so another kernel.
    monkeypatch.setenv("PATH", f"{tmp_path}/cargo/bin:{os.environ['PATH']}")
    monkeypatch.setenv("RUSTFLAGS", "-C opt-level=3")
    tree = fake_tree(tmp_path, "printf '%s|%s|%s' \"$$PATH\" \"$(RUSTC)\" \"$$RUSTFLAGS\" "
                               "> $(O)/linux")
    built = build_kernel(user_source(tree), jobs=1)
    assert built.read_text() == "/usr/bin:/bin|false|"


def test_a_variant_is_cached_apart_and_leaves_the_default_alone(tmp_path: Path,
                                                                cache: Path) -> None:
    source = user_source(fake_tree(tmp_path))
    plain = build_kernel(source, jobs=1)
    variant = build_kernel(source, jobs=1, config=KernelConfig(options=("CONFIG_X=y",)))
    assert variant != plain and variant.is_file()
    assert "CONFIG_X=y" in (variant.parent / "config").read_text()
    assert json.loads((variant.parent / "variant.json").read_text()) == {
        "variant": "default + CONFIG_X=y", "requested": {"CONFIG_X": "y"},
        "did_not_take": []}
    assert kernel.kernel_identity(variant).variant == "default + CONFIG_X=y"
    assert build_kernel(source, jobs=1, config=KernelConfig(options=("CONFIG_X=y",))) == variant


def test_modules_are_built_installed_beside_the_kernel_and_named(tmp_path: Path,
                                                                 cache: Path) -> None:
    source = user_source(fake_tree(tmp_path))
    built = build_kernel(source, jobs=1, config=KernelConfig(options=("CONFIG_X=m",)))
    modules = kernel.modules_dir(built)
    assert modules is not None
    assert (modules / "9.9.9-fake" / "kernel" / "x.ko").read_bytes() == b"module"
    assert "depmod=/" in (modules / "9.9.9-fake" / "modules.dep").read_text()
    identity = kernel.kernel_identity(built)
    assert identity.modules == kernel.tree_digest(modules)
    assert f"(modules sha256:{identity.modules[:12]})" in str(identity)
    assert kernel.modules_dir(build_kernel(source, jobs=1)) is None


def test_an_option_that_does_not_take_is_said_by_name(tmp_path: Path, cache: Path) -> None:
    tree = fake_tree(tmp_path)
    makefile = tree / "Makefile"
    makefile.write_text(makefile.read_text().replace(
        "\t@cat $(O)/umtt.config >> $(O)/.config",
        "\t@grep -v CONFIG_PCI $(O)/umtt.config >> $(O)/.config"))
    said: list[str] = []
    built = build_kernel(user_source(tree), jobs=1, say=said.append,
                         config=KernelConfig(options=("CONFIG_PCI=y",)))
    assert "warning: CONFIG_PCI=y (got n): olddefconfig did not keep it" in "\n".join(said)
    assert json.loads((built.parent / "variant.json").read_text())["did_not_take"] == [
        "CONFIG_PCI=y (got n)"]


def test_path_takes_the_build_flags(tmp_path: Path, cache: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    tree = fake_tree(tmp_path)
    assert kernel.main(["path", "--source", str(tree), "--kconfig-add", "CONFIG_X=y"]) == 1
    assert "build it with: umtt-kernel build" in capsys.readouterr().err
    built = build_kernel(user_source(tree), jobs=1,
                         config=KernelConfig(options=("CONFIG_X=y",)))
    assert kernel.main(["path", "--source", str(tree), "--kconfig-add", "CONFIG_X=y"]) == 0
    assert capsys.readouterr().out.strip() == str(built)
    assert kernel.main(["path", "--kconfig-add", "CONFIG_SMP=y", "--source", str(tree)]) == 1
    assert "contradicts" in capsys.readouterr().err


# --- check ----------------------------------------------------------------------------

def test_check_rejects_what_cannot_work(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert "does not exist" in check_kernel(tmp_path / "nope").problems[0]
    assert "not an ELF" in check_kernel(script).problems[0]
    true = Path(shutil.which("true") or "/bin/true")
    assert "executable without time-travel=ext" in check_kernel(true).problems[0]


@pytest.mark.skipif(not Path("/usr/bin/linux").exists(),
                    reason="Debian's user-mode-linux is not installed (.ci/run installs it)")
def test_check_explains_debian_user_mode_linux() -> None:
    result = check_kernel(Path(os.path.realpath("/usr/bin/linux")))
    assert not result.ok
    assert "User-Mode Linux kernel without time-travel=ext" in result.problems[0]
    assert "umtt-kernel build" in result.problems[0]


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    assert kernel.main(["check", str(tmp_path / "missing")]) == 1


def test_path_without_a_default_kernel(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kernel.main(["path"]) == 1
    assert "umtt-kernel build" in capsys.readouterr().err


def test_shim_builds_and_is_cached(cache: Path) -> None:
    first = kernel.build_shim()
    assert first is not None and first.is_file()
    assert b"pytest-umtt getrandom shim" in first.read_bytes()
    assert kernel.build_shim() == first


def test_source_identity_is_part_of_the_key() -> None:
    one = KernelSource(Path("/a"), "6.12", "debian 1")
    two = KernelSource(Path("/a"), "6.12", "debian 2")
    assert kernel.kernel_key(one, "x") != kernel.kernel_key(two, "x")


def test_sanitizer_and_coverage_kernels_build_in_object_trees_of_their_own() -> None:
    # Their flags recompile every object: in the shared tree, each switch between them
    # and any other variant would rebuild the whole kernel.
    source = KernelSource(Path("/a"), "6.12", "debian 1")
    trees = {config: kernel.object_tree(source, config) for config in (
        KernelConfig(), KernelConfig(kselftest_targets=("gpio",)), KernelConfig(debug=True),
        KernelConfig(debug=True, options=("CONFIG_GPIO_SIM=y",)), KernelConfig(coverage=True))}
    assert len(set(trees.values())) == 3
    assert trees[KernelConfig()] == trees[KernelConfig(kselftest_targets=("gpio",))]
    assert trees[KernelConfig(debug=True)] == trees[
        KernelConfig(debug=True, options=("CONFIG_GPIO_SIM=y",))]
    assert kernel.object_tree(KernelSource(Path("/a"), "6.12", "debian 2"),
                              KernelConfig()) != trees[KernelConfig()]

"""The malloc setting that keeps freed memory in the process: checked by what it is for, page faults."""
import os
import subprocess
import sys

import pytest

from resnet_deploy import cli

# Steady-state page faults of a cycle of ResNet-18 (96x96, batch 64) allocations: three first-stage activations
# (64x64x24x24 float32, 9.4 MB) allocated, written, then freed newest first, and one stem activation
# (64x64x48x48, 37.7 MB). With glibc's defaults the stem's block, over the largest mmap threshold (32 MB),
# is mapped and unmapped every cycle (9,216 faults of 4 KB), and depending on the heap's history freeing the
# three small ones trims the top of the heap too; with the setting, each cycle reuses the previous one's pages.
FRESH_PAGES_SCRIPT = """
import resource, sys, torch
from resnet_deploy import allocator
torch.set_num_threads(1)
print(allocator.retain_freed_memory() if sys.argv[1] == "retain" else allocator.status())
def cycle():
    a, b, c = (torch.empty(64 * 64 * 24 * 24) for _ in range(3))
    for tensor in (a, b, c):
        tensor.fill_(1.0)
    del tensor, c, b, a
    torch.empty(64 * 64 * 48 * 48).fill_(1.0)
for _ in range(8):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**env, **extra}


def run_script(mode, env):
    result = subprocess.run([sys.executable, "-c", FRESH_PAGES_SCRIPT, mode], env=env, capture_output=True,
                            text=True, check=True)
    status, faults = result.stdout.splitlines()
    return status, int(faults)


def test_retained_memory_is_reused_without_page_faults():
    status, faults = run_script("retain", clean_env())
    assert status == "retain"
    assert faults < 100


def test_system_defaults_page_fault_on_reuse():
    status, faults = run_script("system", clean_env())
    assert status == "system"
    assert faults >= 9216  # at least the large tensor lands on fresh pages every cycle


@pytest.mark.parametrize("env, reason", [
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES sets malloc options"),
])
def test_a_users_own_malloc_settings_win(env, reason):
    status, faults = run_script("retain", clean_env(**env))
    assert status == f"user ({reason})"
    assert faults > 4000  # the user's settings (every tensor mapped and unmapped) are in effect, not ours


def test_cli_applies_the_setting_unless_told_not_to(capfd):
    code = subprocess.run([sys.executable, "-m", "resnet_deploy.cli", "info"], env=clean_env(),
                          capture_output=True, text=True)
    assert code.returncode == 0 and "malloc: retain" in code.stdout
    code = subprocess.run([sys.executable, "-m", "resnet_deploy.cli", "--system-malloc", "info"], env=clean_env(),
                          capture_output=True, text=True)
    assert code.returncode == 0 and "malloc: system" in code.stdout


def test_cli_help_explains_the_flag():
    assert "--system-malloc" in cli.build_parser().format_help()

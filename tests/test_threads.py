"""trainer.threads: the thread count follows the cores actually free (affinity, cgroup quota, other jobs)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from rlkd_cli import runtime


@pytest.mark.parametrize("cores, busy, procs, want, warns", [
    (2, 0.05, 1, 2, False),   # a quiet 2-core machine: both cores
    (2, 1.0, 1, 1, True),     # another job holds a core: one thread, and a warning
    (8, 0.0, 2, 4, False),    # two processes of a launch on one node split the cores
    (2, 2.0, 1, 1, True),     # everything busy: still one thread
    (2, 0.4, 1, 2, False),    # under half a core of noise is not a busy core
])
def test_choose_threads_follows_free_cores(cores, busy, procs, want, warns):
    threads, warning = runtime.choose_threads(None, cores=cores, busy=busy, procs=procs)
    assert threads == want
    assert (warning is not None) == warns
    if warns:
        assert "busy" in warning and "trainer.threads=N" in warning


def test_explicit_threads_are_kept_but_oversubscription_is_named():
    assert runtime.choose_threads(2, cores=2, busy=0.0) == (2, None)
    threads, warning = runtime.choose_threads(2, cores=2, busy=1.0)
    assert threads == 2
    assert "trainer.threads=2" in warning and "trainer.threads=1 fits" in warning


def test_cgroup_quota_caps_usable_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")   # 1.5 cores
    assert runtime.cgroup_cpu_quota(str(tmp_path)) == pytest.approx(1.5)
    assert runtime.usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_cpu_quota(str(v1)) == pytest.approx(1.0)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")    # v1's "unlimited"
    assert runtime.cgroup_cpu_quota(str(v1)) is None


def test_busy_cores_sees_a_spinning_process():
    """A process spinning on one of our cores is counted as (at least half) a busy core."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)
        assert runtime.busy_cores(0.5) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_set_threads_applies_the_choice_once_and_warns(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_THREADS", {})
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    calls = []
    monkeypatch.setattr(runtime, "busy_cores", lambda: calls.append(1) or 1.2)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="rlkd.runtime"):
            assert runtime.set_threads(None) == 1
            assert runtime.set_threads(None) == 1
        assert torch.get_num_threads() == 1
        assert len(calls) == 1                                     # measured once per process
        assert sum("this machine is busy" in r.message for r in caplog.records) == 1
    finally:
        torch.set_num_threads(before)


def test_set_threads_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(runtime, "busy_cores", lambda: pytest.fail("no measurement when OMP_NUM_THREADS is set"))
    assert runtime.set_threads(None) == torch.get_num_threads()

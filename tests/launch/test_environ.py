"""SLURM's compressed lists (hostlists, tasks per node) and the per-job rendezvous port."""
from __future__ import annotations

import pytest

from megatron_hdpissa.launch.environ import expand_hostlist, expand_tasks_per_node, job_port


# --- hostlists (expected lists written out by hand; checked against `scontrol show hostnames`) --

@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("host.example.com", ["host.example.com"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a-[1-2],b3", ["a-1", "a-2", "b3"]),
    ("gpu[1-2]-ib,cpu[003-005]", ["gpu1-ib", "gpu2-ib", "cpu003", "cpu004", "cpu005"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-100]", ["n098", "n099", "n100"]),
    ("n[08-9]", ["n08", "n09"]),
    ("n[1-010]", ["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10"]),
    ("n[0]", ["n0"]),
    ("n[00-02]", ["n00", "n01", "n02"]),
    ("x[3,1,2]", ["x3", "x1", "x2"]),
    ("a,a", ["a", "a"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[1-2],m[5-6]z[1-2]", ["n1", "n2", "m5z1", "m5z2", "m6z1", "m6z2"]),
    ("dgx[1,3-4],login,gpu[9-10]-ib", ["dgx1", "dgx3", "dgx4", "login", "gpu9-ib", "gpu10-ib"]),
    (" node[1-2] ", ["node1", "node2"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[1-2", "n1-2]", "n[]", "n[a-b]", "n[3-1]", "a,,b", "n[[1]]", "n[1-]"])
def test_expand_hostlist_rejects(spec):
    with pytest.raises(ValueError):
        expand_hostlist(spec)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


def test_job_port_is_deterministic_and_below_ephemeral_range():
    assert job_port(123456) == job_port(123456)
    assert job_port(1) != job_port(2)
    assert all(1024 < job_port(j) < 32768 for j in (0, 1, 11999, 12000, 10**9))

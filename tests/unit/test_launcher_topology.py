"""Node lists, node roles, ports, hostfiles and GPU detection: everything the launcher derives from the environment."""

from __future__ import annotations

import pytest

from ift_dist.launcher.hostlist import HostListError, expand_hostlist, first_host
from ift_dist.launcher.topology import (
    PORT_BASE,
    PORT_SPAN,
    TopologyError,
    detect_gpus,
    master_port_for_job,
    read_hostfile,
    slurm_node_role,
    write_hostfile,
)


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node07", ["node07"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),  # no padding: the lower bound has one digit
        ("n[08-10]", ["n08", "n09", "n10"]),  # padding from the lower bound's width
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),  # dotted prefix (IP-named nodes)
        ("rack[1-2]-gpu[1-2]", ["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"]),
        ("a[1-2]b,c", ["a1b", "a2b", "c"]),  # suffix after the bracket
        ("x[3,1]", ["x3", "x1"]),  # order as written
        (" node1 , node2 ", ["node1", "node2"]),
        ("", []),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-2", "n1-2]", "n[[1]]", "n[2-1]", "n[a-b]", "n[1-]", "n[]", "a,,b"])
def test_bad_hostlists_are_refused(text):
    with pytest.raises(HostListError):
        expand_hostlist(text)


def test_first_host():
    assert first_host("gpu[017-020],cpu1") == "gpu017"
    with pytest.raises(HostListError):
        first_host("")


def slurm_env(**changes):
    env = {
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_JOB_ID": "123456",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURMD_NODENAME": "gpu08",
    }
    env.update(changes)
    return {key: value for key, value in env.items() if value is not None}


def test_slurm_node_role():
    role = slurm_node_role(slurm_env())
    assert role.hosts == ("gpu07", "gpu08", "gpu09")
    assert (role.node_rank, role.num_nodes, role.master_addr) == (1, 3, "gpu07")
    assert role.master_port == PORT_BASE + 123456 % PORT_SPAN == master_port_for_job("123456")
    assert slurm_node_role(slurm_env(), master_port=29400).master_port == 29400


def test_master_port_is_the_same_on_every_node_and_stays_below_the_ephemeral_range():
    ports = {
        slurm_node_role(slurm_env(SLURM_NODEID=str(rank), SLURMD_NODENAME=None)).master_port
        for rank in range(3)
    }
    assert len(ports) == 1
    assert all(PORT_BASE <= master_port_for_job(job) < 32768 for job in (0, 1, 14999, 15000, 10**9 + 7))
    assert master_port_for_job(41) != master_port_for_job(42)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SLURM_NODEID": None}, "not inside a Slurm job step"),
        ({"SLURM_JOB_NODELIST": None}, "not inside a Slurm job step"),
        ({"SLURM_JOB_NUM_NODES": "2"}, "SLURM_JOB_NUM_NODES=2"),
        ({"SLURM_NODEID": "3", "SLURMD_NODENAME": None}, "outside the 3 hosts"),
        ({"SLURMD_NODENAME": "gpu09"}, "SLURMD_NODENAME=gpu09"),
    ],
)
def test_inconsistent_slurm_environment_is_refused(changes, message):
    with pytest.raises(TopologyError, match=message):
        slurm_node_role(slurm_env(**changes))


def test_old_variable_names_still_work():
    env = slurm_env(SLURM_JOB_NODELIST=None, SLURM_JOB_NUM_NODES=None)
    env.update({"SLURM_NODELIST": "gpu[07-09]", "SLURM_NNODES": "3"})
    assert slurm_node_role(env).master_addr == "gpu07"


def test_hostfile_round_trip(tmp_path):
    path = write_hostfile(tmp_path / "hostfile", ["a", "b"], 4)
    assert path.read_text() == "a slots=4\nb slots=4\n"
    assert read_hostfile(path) == {"a": 4, "b": 4}
    (tmp_path / "commented").write_text("# cluster\n\nnode1 slots=8\nnode2 slots=2  # small\n")
    assert read_hostfile(tmp_path / "commented") == {"node1": 8, "node2": 2}


@pytest.mark.parametrize("text", ["node1\n", "node1 slots=2\nnode1 slots=2\n", "# only a comment\n"])
def test_bad_hostfiles_are_refused(tmp_path, text):
    (tmp_path / "hostfile").write_text(text)
    with pytest.raises(TopologyError):
        read_hostfile(tmp_path / "hostfile")


NVIDIA_SMI = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"


@pytest.mark.parametrize(
    ("env", "listing", "gpus"),
    [
        ({}, NVIDIA_SMI, ["0", "1"]),
        ({}, "", []),  # no nvidia-smi, or it failed
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, NVIDIA_SMI, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, NVIDIA_SMI, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, NVIDIA_SMI, []),
        ({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, NVIDIA_SMI, ["1"]),  # CUDA stops at the first invalid id
        ({"CUDA_VISIBLE_DEVICES": "GPU-1"}, "", ["GPU-1"]),
        ({"DS_ACCELERATOR": "cpu"}, NVIDIA_SMI, []),
    ],
)
def test_detect_gpus(env, listing, gpus):
    assert detect_gpus(env, lambda: listing) == gpus

"""Packing over the ranks of a torch.distributed job (`qlis.workers.cluster`): the same archive
bytes as one process, every rank refusing another input, a rank that dies ending the job without an
archive, and the pieces (owners, spread, messages, fingerprints) without any process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import qlis
from qlis.archive.file import encode_tensor, plan_entry
from qlis.archive.pack import _fingerprint, _packed, _packed_error, _unpacked
from qlis.errors import ClusterError, InputError
from qlis.workers.cluster import Cluster, spread

TIMEOUT_S = 120
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A few small layers (the same shapes for every seed): several tensors for each rank."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(128, 64, generator=gen),
        "a.bias": torch.randn(128, generator=gen),
        "b.weight": torch.randn(32, 128, generator=gen) * 0.1,
        "c.weight": torch.randn(64, 32, generator=gen) * 0.05,
    }


def _model_file(path: Path, seed: int = 0) -> Path:
    save_file(_state(seed), str(path), metadata={"format": "pt"})
    return path


def _env() -> dict[str, str]:
    """This environment without any torch.distributed job in it (each test makes its own)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _torchrun(*args: object, cwd: Path, monitor_s: float = 0.1) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 ARGS`` on a port the rendezvous picks itself; torchrun
    ends the other ranks within ``monitor_s`` of one that fails."""
    return _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                   f"--monitor-interval={monitor_s}", *map(str, args)], cwd,
                  {**_env(), "TMPDIR": str(cwd)})  # torchrun leaves its log folders there


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """The exit code, stdout and stderr; the process killed (and the test failed) if it is
    still running after TIMEOUT_S: a hang."""
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {TIMEOUT_S} s (hung?)\n{out}\n{err[-4000:]}")
    return process.returncode, out, err


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


_RANK_PREAMBLE = """
import os, sys
from qlis.archive import pack as packing
from qlis.errors import ClusterError
from qlis.models.checkpoints import load_state_dict
rank = int(os.environ["RANK"])

def say(line):  # one write: the ranks share torchrun's stdout
    os.write(1, (line + "\\n").encode())
"""


def _rank_script(tmp_path: Path, body: str) -> Path:
    """A job script whose ranks know their ``rank``, ``packing`` and ``say``."""
    return _script(tmp_path, _RANK_PREAMBLE + textwrap.dedent(body))


# --- the command under torchrun ------------------------------------------------------------


POLICIES = {"default": [], "3-bits": ["--target-bits-per-weight", "3"]}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, dict]:
    """``qlis pack`` of one model for each of POLICIES, in one process (``python -m qlis``) and
    under ``torchrun --nproc_per_node=2`` (``python -m qlis`` too, plus an exit handler
    registered before qlis's own, so run after them, that reports whether the process group
    is still up), all started at once."""
    root = tmp_path_factory.mktemp("cluster_pack")
    model = _model_file(root / "m.safetensors")
    observed = root / "observed_qlis.py"
    observed.write_text(textwrap.dedent("""
        import atexit, os, runpy, sys
        import torch.distributed as dist
        atexit.register(lambda: os.write(2, (  # one write: the ranks share the pipe
            f"GROUP-AT-EXIT rank {os.environ['RANK']}: {dist.is_initialized()}\\n").encode()))
        runpy.run_module("qlis", run_name="__main__", alter_sys=True)  # = python -m qlis
    """))
    started = {}
    for name, options in POLICIES.items():
        out = {how: root / name / how / "m.qlis" for how in ("one", "two")}
        for path in out.values():
            path.parent.mkdir(parents=True)
        started[name] = out, {
            "one": _start([sys.executable, "-m", "qlis", "pack", str(model), "-o",
                           str(out["one"]), *options], root),
            "two": _torchrun(observed, "pack", model, "-o", out["two"], *options, cwd=root),
        }
    return {name: {how: (out[how], *_finish(process)) for how, process in processes.items()}
            for name, (out, processes) in started.items()}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_two_ranks_write_the_bytes_of_one_process_and_rank_0_alone_prints(packed, policy):
    one, rc1, out1, err1 = packed[policy]["one"]
    two, rc2, out2, err2 = packed[policy]["two"]
    assert rc1 == 0, err1
    assert two.exists(), err2[-4000:]
    assert two.read_bytes() == one.read_bytes()
    assert sorted(p.name for p in two.parent.iterdir()) == ["m.qlis"]  # no temporary left
    # torchrun merges the ranks' stdout: rank 1 must add nothing to rank 0's report
    assert out1.count("real ratio") == 1
    assert out2.count("real ratio") == 1
    assert out2.replace(str(two), "OUT") == out1.replace(str(one), "OUT")
    with qlis.open(two) as archive:
        assert len(archive.tensor_info()) == len(_state(0))
    assert rc2 == 0, err2[-4000:]


def test_ranks_leave_no_process_group_at_exit(packed):
    for policy in POLICIES:
        _, rc, _, err = packed[policy]["two"]
        reports = sorted(line for line in err.splitlines() if line.startswith("GROUP-AT-EXIT"))
        assert reports == ["GROUP-AT-EXIT rank 0: False", "GROUP-AT-EXIT rank 1: False"], err
        assert rc == 0, err[-4000:]


def test_every_rank_refuses_when_the_ranks_see_another_input(tmp_path):
    files = [_model_file(tmp_path / f"m{rank}.safetensors", seed=rank) for rank in (0, 1)]
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.qlis"
    script = _rank_script(tmp_path, """
        from datetime import timedelta
        import torch.distributed as dist

        try:
            packing.pack(load_state_dict(sys.argv[1 + rank]), sys.argv[3])
        except ClusterError as err:
            say(f"CLUSTER-ERROR rank {rank}: {err}")
            # the group still works: wait for the other rank's report before torchrun,
            # seeing this rank exit, stops it
            dist.monitored_barrier(timeout=timedelta(seconds=30))
            sys.exit(3)
        say(f"PACKED rank {rank}")
    """)
    rc, out_text, err = _finish(_torchrun(script, *files, out, cwd=tmp_path))
    assert rc != 0, out_text
    assert "PACKED" not in out_text
    refusals = [line for line in out_text.splitlines() if line.startswith("CLUSTER-ERROR")]
    assert sorted(line.split(":")[0] for line in refusals) == [
        "CLUSTER-ERROR rank 0", "CLUSTER-ERROR rank 1"], out_text + err[-4000:]
    assert all("another input" in line for line in refusals), refusals
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_a_rank_that_dies_mid_pack_ends_the_job_without_an_archive(tmp_path):
    model = _model_file(tmp_path / "m.safetensors")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.qlis"
    # rank 1 has planned with rank 0 (the layers' measurements are shared) and encoded its
    # first tensor; it dies where it would send it
    script = _rank_script(tmp_path, """
        if rank == 1:
            def dying(*args, **kwargs):
                say("DYING rank 1")
                os._exit(1)
            packing._packed = dying
        try:
            packing.pack(load_state_dict(sys.argv[1]), sys.argv[2])
        except ClusterError as err:
            say(f"CLUSTER-ERROR rank {rank}: {err}")
            sys.exit(3)
        say(f"PACKED rank {rank}")
    """)
    # torchrun checks its ranks every 15 s here: on a loaded machine, at 0.1 s it ended rank 0
    # (SIGTERM: no clean-up in a script) before gloo told it that rank 1 was gone
    rc, out_text, err = _finish(_torchrun(script, model, out, cwd=tmp_path, monitor_s=15))
    assert "DYING rank 1" in out_text, out_text + err[-4000:]  # the hook was reached
    assert rc != 0
    assert "PACKED" not in out_text
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary file either


def test_a_rank_whose_input_is_wrong_tells_the_others_before_any_work(tmp_path):
    """The command checked its input before it joined the job: rank 0 of ranks started by
    hand waited out the rendezvous (600 s) for a rank that had said why only to itself."""
    model = _model_file(tmp_path / "m.safetensors")
    script = _script(tmp_path, """
        import os, runpy, sys
        if os.environ["RANK"] == "1":
            sys.argv[2] += ".missing"
        runpy.run_module("qlis", run_name="__main__", alter_sys=True)
    """)
    rc, out_text, err = _finish(_torchrun(script, "pack", model, "-o", tmp_path / "m.qlis",
                                          cwd=tmp_path, monitor_s=15))
    assert rc != 0 and not (tmp_path / "m.qlis").exists()
    assert "qlis: error: rank 1: " in err and "m.safetensors.missing: no such file" in err, err


def test_sigterm_ends_a_rank_stuck_joining_a_job_that_does_not_answer(tmp_path):
    """The rank's rendezvous blocks in torch's own code against a port that accepts and
    never answers: SIGTERM (a scheduler, torchrun ending the job) must end it, and it has
    written nothing to leave behind."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections wait in its backlog: nothing is ever sent back
        script = _script(tmp_path, """
            import signal
            from qlis.workers.cluster import Cluster

            def interrupt(signum, frame):  # what qlis' commands make of SIGTERM
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, interrupt)
            print("JOINING", flush=True)
            Cluster.from_environment(timeout_s=600)
        """)
        env = {**_env(), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(silent.getsockname()[1])}
        process = _start([sys.executable, str(script)], tmp_path, env)
        try:
            assert process.stdout.readline() == "JOINING\n"
            time.sleep(2)  # inside the rendezvous
            process.terminate()
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail("SIGTERM did not end a rank waiting to join")
    assert process.returncode == -signal.SIGTERM


def test_rendezvous_without_the_other_rank_is_one_cluster_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = _script(tmp_path, """
        from qlis.workers.cluster import Cluster
        from qlis.errors import ClusterError
        try:
            Cluster.from_environment(timeout_s=1, waiting=lambda text: print("WAITING:", text))
        except ClusterError as err:
            print(f"CLUSTER-ERROR: {err}", flush=True)
            raise SystemExit(3)
        print("JOINED", flush=True)
    """)
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    process = _start([sys.executable, str(script)], tmp_path, env)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("rank 0 still waited for rank 1 after 30 s with timeout_s=1")
    assert time.monotonic() - start < 30
    assert process.returncode == 3, out + err
    waiting, refusal = out.splitlines()[:2]
    assert waiting == (f"WAITING: joining a job of 2 ranks at 127.0.0.1:{port} (waiting up to "
                       "1 s for every rank to start)")
    assert refusal.startswith("CLUSTER-ERROR: could not join the other ranks"), out
    assert "MASTER_ADDR" in refusal
    assert "Traceback" not in err


# --- calibrated, under torchrun ------------------------------------------------------------

_CALIBRATED_JOB = """
import hashlib, os, sys
import torch
from torch import nn
import qlis
from qlis.errors import QlisError

torch.set_num_threads(1)  # as torchrun starts each rank
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 48), nn.Linear(48, 24)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Front(nn.Module):  # a table looked up by the inputs: rd fits it on its gradients
    def __init__(self):
        super().__init__()
        self.table, self.proj = nn.Embedding(32, 16), nn.Linear(16, 24)

    def forward(self, x):
        return self.proj(x + self.table((x[:, 0].abs() * 8).long().clamp(max=31)))


class Tail(nn.Module):  # an output layer tied to a table: rd fits it on both uses
    def __init__(self):
        super().__init__()
        self.words, self.out = nn.Embedding(64, 24), nn.Linear(24, 64, bias=False)
        self.out.weight = self.words.weight

    def forward(self, x):
        return self.out(x + self.words((x[:, 0].abs() * 16).long().clamp(max=63)))


model = nn.Sequential(Front(), nn.Sequential(*[Block() for _ in range(3)]), Tail()).eval()
gen = torch.Generator().manual_seed(1)
calib = [torch.randn(20, 16, generator=gen) for _ in range(8)]
if sys.argv[2] == "misfit":
    calib[5] = torch.randn(20, 15, generator=gen)  # a batch of the second rank's share
options = ({"policy": "quant", "bits": 3} if sys.argv[2] == "quant"
           else {"target_bits_per_weight": 4.0})
rank = os.environ.get("RANK", "-")
if sys.argv[2] == "dies" and rank == "1":
    from qlis.quantize import reconstruct

    def dying(*args, **kwargs):  # after the float pass and the first group's pass
        os.write(1, b"DYING rank 1\\n")
        os._exit(1)

    reconstruct._fitted = dying
try:
    result = qlis.pack(model, sys.argv[1], calib=calib, **options)
except QlisError as err:
    os.write(1, f"ERROR rank {rank}: {type(err).__name__}: {err}\\n".encode())
    raise SystemExit(3)
os.write(1, f"PACKED rank {rank} {result.distortion['output']['cosine']!r}\\n".encode())
"""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict[str, dict]:
    """A calibrated ``qlis.pack`` (rd with a size target, and plain 3-bit quantization) in
    one process and under ``torchrun --nproc_per_node=2``, one whose calibration holds a
    batch the model cannot take and one whose rank 1 dies mid-way, all started at once."""
    root = tmp_path_factory.mktemp("cluster_calib")
    job = root / "job.py"
    job.write_text(_CALIBRATED_JOB)
    started = {}
    for name in ("rd", "quant", "misfit", "dies"):
        hows = ("one", "two") if name in ("rd", "quant") else ("two",)
        out = {how: root / name / how / "m.qlis" for how in hows}
        for path in out.values():
            path.parent.mkdir(parents=True)
        started[name] = out, {how: (_start([sys.executable, str(job), str(out[how]), name],
                                           root) if how == "one"
                                    # the dying rank's partner is given time to see it
                                    else _torchrun(job, out[how], name, cwd=root,
                                                   monitor_s=15 if name == "dies" else 0.1))
                              for how in hows}
    return {name: {how: (out[how], *_finish(process)) for how, process in processes.items()}
            for name, (out, processes) in started.items()}


@pytest.mark.parametrize("policy", ["rd", "quant"])
def test_two_ranks_calibrate_to_the_bytes_of_one_process(calibrated, policy):
    one, rc1, out1, err1 = calibrated[policy]["one"]
    two, rc2, out2, err2 = calibrated[policy]["two"]
    assert rc1 == 0 and rc2 == 0, err1[-3000:] + err2[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert sorted(p.name for p in two.parent.iterdir()) == ["m.qlis"]  # no spill file left
    cosine = out1.split()[-1]  # the quality every rank measured: one process's, to the bit
    assert sorted(out2.splitlines()) == [f"PACKED rank 0 {cosine}", f"PACKED rank 1 {cosine}"]
    with qlis.open(two) as archive:
        assert archive.entry("1.0.up.weight").plan["reconstruction"] == (
            "error feedback + bias correction")
        for table in ("0.table.weight", "2.words.weight"):
            assert archive.entry(table).plan["reconstruction"] == (
                "error feedback along the output's gradients" if policy == "rd"
                else "data-free: no error feedback for this kind of tensor")


def test_a_batch_one_rank_cannot_run_stops_every_rank_with_its_message(calibrated):
    out, rc, text, err = calibrated["misfit"]["two"]
    assert rc != 0
    lines = sorted(line for line in text.splitlines() if line.startswith("ERROR"))
    assert len(lines) == 2, text + err[-3000:]
    assert lines[0].startswith("ERROR rank 0: ClusterError: rank 1: the calibration data "
                               "does not fit the model (batch 5)")
    assert lines[1].startswith("ERROR rank 1: InputError: the calibration data does not fit "
                               "the model (batch 5)")
    assert list(out.parent.iterdir()) == []


def test_a_rank_that_dies_mid_calibration_ends_the_job_without_an_archive(calibrated):
    out, rc, text, err = calibrated["dies"]["two"]
    assert "DYING rank 1" in text, text + err[-3000:]  # the hook was reached
    assert rc != 0 and "PACKED" not in text
    assert "ERROR rank 0: ClusterError: the distributed job failed" in text, text
    assert list(out.parent.iterdir()) == []


# --- in one process ------------------------------------------------------------------------


def test_no_job_in_the_environment_is_no_cluster(monkeypatch):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    assert Cluster.from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Cluster.from_environment() is None


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"},
     "RANK=2 in a job of WORLD_SIZE=2: each rank's RANK is one of 0..1"),
    ({"WORLD_SIZE": "3", "RANK": "-1"}, "RANK=-1 in a job of WORLD_SIZE=3"),
    ({"WORLD_SIZE": "2", "RANK": "0x"}, "RANK='0x' in the environment is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a TCP port"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "0"}, "MASTER_PORT=0 is not a TCP port"),
    ({"WORLD_SIZE": str(2**32), "RANK": "0"},  # torch's store: a TypeError, a traceback
     "WORLD_SIZE=4294967296: qlis runs jobs of at most 1,048,576 ranks"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "256.1.1.1", "MASTER_PORT": "29500"},
     "MASTER_ADDR='256.1.1.1' is no address this machine can reach"),  # waited 1,199 s
])
def test_a_job_environment_no_rank_could_join_is_refused_before_waiting(monkeypatch, env, message):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    waited = []
    with pytest.raises(ClusterError) as refused:
        Cluster.from_environment(timeout_s=1, waiting=waited.append)
    assert str(refused.value).startswith(message)
    assert not waited


@given(costs=st.lists(st.floats(0, 1e9, allow_nan=False), max_size=40),
       world=st.integers(1, 5))
def test_owners_assign_every_item_the_same_way_on_every_rank_and_balance(costs, world):
    owner = Cluster(0, world).owners(costs)
    assert len(owner) == len(costs)
    assert all(0 <= rank < world for rank in owner)
    for rank in range(world):  # each rank computes the owners itself: they must agree
        assert Cluster(rank, world).owners(costs) == owner
    loads = [sum(c for c, r in zip(costs, owner, strict=True) if r == rank)
             for rank in range(world)]
    assert max(loads) - min(loads) <= max(costs, default=0) * (1 + 1e-9)


def test_owners_of_three_ranks_share_equal_costs():
    owner = Cluster(0, 3).owners([5.0] * 9)
    assert sorted(owner.count(rank) for rank in range(3)) == [3, 3, 3]


@pytest.mark.parametrize("jobs", [None, 1, 3])
def test_spread_without_a_cluster_is_a_map_that_reports_each_index(jobs):
    items = list(range(11))
    seen: list[int] = []
    lock = threading.Lock()

    def done(index: int) -> None:
        with lock:
            seen.append(index)

    assert spread(lambda x: x * x + 1, items, [1.0] * len(items), jobs, None,
                  done=done) == [x * x + 1 for x in items]
    assert sorted(seen) == list(range(len(items)))


def _thread_ranks(world: int) -> list[Cluster]:
    """Ranks in threads of this process, exchanging through JSON text as the real ones do."""
    board: list[str | None] = [None] * world
    barrier = threading.Barrier(world, timeout=30)

    class ThreadRank(Cluster):
        def all_gather_json(self, value):
            board[self.rank] = json.dumps(value)
            barrier.wait()
            seen = [json.loads(text) for text in board]
            barrier.wait()
            return seen

    return [ThreadRank(rank, world) for rank in range(world)]


def test_spread_over_ranks_gives_every_rank_all_results_each_computed_once():
    items = list(range(13))
    costs = [float((7 * i) % 5 + 1) for i in items]
    ranks = _thread_ranks(3)
    results: dict[int, list] = {}
    computed: dict[int, list[int]] = {rank.rank: [] for rank in ranks}
    errors: list[BaseException] = []

    def run(rank: Cluster) -> None:
        try:
            results[rank.rank] = spread(lambda x: (x, x * x), items, costs, 2, rank,
                                        to_json=list, from_json=tuple,
                                        done=computed[rank.rank].append)
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    expected = [(x, x * x) for x in items]
    assert all(results[rank] == expected for rank in range(3))
    owner = Cluster(0, 3).owners(costs)
    for rank, indices in computed.items():
        assert sorted(indices) == [i for i in items if owner[i] == rank]


def test_a_user_error_on_one_rank_is_told_to_the_others():
    """A NaN in a layer rank 1 owns: rank 0 waited for its results and said gloo's
    "Connection reset by peer", naming no reason."""
    ranks = _thread_ranks(2)
    raised: dict[int, BaseException] = {}

    def measure(x: int) -> int:
        if x == 3:
            raise InputError("layer 'w3' contains NaN values: repair the weights")
        return x

    def run(rank: Cluster) -> None:
        try:
            spread(measure, list(range(6)), [1.0] * 6, 1, rank)
        except BaseException as err:  # re-raised in the test's thread
            raised[rank.rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    owner = Cluster(0, 2).owners([1.0] * 6)[3]
    assert isinstance(raised[owner], InputError)
    other = raised[1 - owner]
    assert isinstance(other, ClusterError)
    assert str(other) == f"rank {owner}: layer 'w3' contains NaN values: repair the weights"


def test_spread_refuses_a_rank_that_returns_another_number_of_results():
    class ShortRank(Cluster):
        def all_gather_json(self, value):
            return [value, []]  # rank 1 sends nothing for the items it owns

    with pytest.raises(ClusterError, match="rank 1 returned another number"):
        spread(lambda x: x, [1, 2, 3, 4], [1.0] * 4, 1, ShortRank(0, 2))


@pytest.fixture(scope="module")
def encoded_layer():
    """A layer as rank 1 sends it: its quantized tensor encoded with its plan."""
    state = {"w.weight": _state(0)["b.weight"], "w.bias": torch.randn(32)}
    result = qlis.compress(state)
    layer = result.layers[0]
    return encode_tensor(layer.name, result.tensors[layer.name], "ans", plan_entry(layer)), layer


def _records(encoded) -> list[tuple[str | None, bytes, int]]:
    return [(key, bytes(data), crc) for key, data, crc in encoded.records]


def test_a_packed_tensor_unpacks_to_the_same_entry_records_and_plan(encoded_layer):
    encoded, layer = encoded_layer
    assert len(encoded.records) > 1 and layer.quantizer is not None
    got, got_layer = _unpacked(_packed(encoded, layer), 1)
    assert got.entry == encoded.entry
    assert _records(got) == _records(encoded)
    assert got_layer == layer

    plain = encode_tensor("w.bias", torch.linspace(-1, 1, 7))
    got, got_layer = _unpacked(_packed(plain, None), 1)
    assert got_layer is None
    assert got.entry == plain.entry and _records(got) == _records(plain)


def test_a_truncated_message_is_a_cluster_error_at_any_length(encoded_layer):
    message = _packed(*encoded_layer)
    for cut in range(len(message)):
        with pytest.raises(ClusterError, match="rank 1 sent a message that does not parse"):
            _unpacked(message[:cut], 1)
    with pytest.raises(ClusterError, match="does not parse"):
        _unpacked(message + b"\0", 1)  # trailing bytes: does not add up either


def _message(head: object, tail: bytes = b"") -> bytes:
    text = json.dumps(head).encode()
    return len(text).to_bytes(8, "little") + text + tail


@pytest.mark.parametrize("message", [
    b"\xff" * 40,
    _message([1, 2, 3]),
    _message(7),
    _message({"entry": {}, "records": [["x", 1]], "layer": None}, b"ab"),
    _message({"entry": {}, "records": [], "layer": {"name": "w", "unknown": 1}}),
    _message({"entry": {}, "layer": None}),
    (1 << 40).to_bytes(8, "little") + b"{}",
], ids=["bytes", "list-head", "number-head", "short-record", "bad-layer", "no-records",
        "huge-length"])
def test_a_garbled_message_is_a_cluster_error(message):
    with pytest.raises(ClusterError, match="rank 2 sent a message that does not parse"):
        _unpacked(message, 2)


def test_a_message_without_an_entry_is_a_cluster_error():
    with pytest.raises(ClusterError, match="does not parse"):
        _unpacked(_message({"records": [], "layer": None}), 2)


def test_a_rank_error_message_is_raised_with_its_text():
    with pytest.raises(ClusterError, match=r"^rank 1: w\.weight: disk full on the moon$"):
        _unpacked(_packed_error("rank 1: w.weight: disk full on the moon"), 1)


def test_fingerprint_sees_the_input_and_the_options():
    state = _state(0)
    base = _fingerprint(state, "rd", 0.5, "ans", {})
    assert _fingerprint(_state(0), "rd", 0.5, "ans", {}) == base  # deterministic
    changed = dict(state, **{"c.weight": state["c.weight"].clone()})
    changed["c.weight"][-1, -1] += 1.0
    renamed = {("z" + k if k == "a.bias" else k): v for k, v in state.items()}
    others = [
        _fingerprint(_state(1), "rd", 0.5, "ans", {}),
        _fingerprint(changed, "rd", 0.5, "ans", {}),
        _fingerprint(renamed, "rd", 0.5, "ans", {}),
        _fingerprint({k: v.double() for k, v in state.items()}, "rd", 0.5, "ans", {}),
        _fingerprint(state, "lapq", 0.5, "ans", {}),
        _fingerprint(state, "rd", 0.25, "ans", {}),
        _fingerprint(state, "rd", 0.5, "raw", {}),
        _fingerprint(state, "rd", 0.5, "ans", {"target_bits_per_weight": 3}),
        _fingerprint(state, "rd", 0.5, "ans", {"calib": [{"x": torch.ones(2, 3)}]}),
        _fingerprint(state, "rd", 0.5, "ans", {"calib": [{"x": torch.zeros(2, 3)}]}),
    ]
    assert base not in others and others[-1] != others[-2]
    assert len(set(others)) == len(others)


def test_fingerprint_sees_a_change_anywhere_in_a_large_tensor():
    """Only each tensor's first and last 64 KiB were compared: ranks reading copies that
    differ in the middle wrote an archive of both, silently."""
    state = {"w.weight": torch.zeros(256, 1024)}  # 1 MiB
    base = _fingerprint(state, "rd", 0.5, "ans", {})
    state["w.weight"][128, 512] = 1.0
    assert _fingerprint(state, "rd", 0.5, "ans", {}) != base


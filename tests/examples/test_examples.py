"""The launch scripts in examples/: every command they would run parses with the tool's own parser,
and the layouts they pick give the K they document. Nothing is trained."""
import argparse
import contextlib
import importlib.util
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_hdpissa.training.finetune import parse_args as trainer_parse_args

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TRAINER = "megatron_hdpissa.finetune"
CONVERTER = "tools/convert_hf_to_megatron.py"
# The smallest HD-PiSSA target of each model: k_proj / v_proj, (8 KV heads x 128) x hidden.
SMALLEST_TARGET = {"8b": (1024, 4096), "70b": (1024, 8192)}


def converter_parse_args(argv):
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", REPO / CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


def commands(script: Path, env: dict, args=(), fake_srun: Path | None = None) -> list[list[str]]:
    """The commands `script` would run: with DRY_RUN=1 it prints them shell-quoted; `fake_srun`
    (a folder put first on PATH) stands in for SLURM's srun in scripts without a dry run."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    if fake_srun is not None:
        full_env["PATH"] = f"{fake_srun}{os.pathsep}{full_env['PATH']}"
    proc = subprocess.run(["bash", str(script), *args], env=full_env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def after(argv: list[str], marker: str) -> list[str]:
    """The arguments after `marker` (a module or script name) in one command."""
    return argv[argv.index(marker) + 1:]


@contextlib.contextmanager
def exact_flags():
    """argparse takes any unambiguous prefix of a flag (`--hd-pissa-master-weight`); a script
    users copy should spell each flag out, so abbreviations are refused here."""
    init = argparse.ArgumentParser.__init__

    def strict(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "allow_abbrev": False})

    argparse.ArgumentParser.__init__ = strict
    try:
        yield
    finally:
        argparse.ArgumentParser.__init__ = init


def parse_with(parser, argv, what):
    try:
        with exact_flags():
            return parser(argv)
    except SystemExit as e:  # argparse prints the reason to stderr
        raise AssertionError(f"{what}: the parser rejects {shlex.join(argv)}") from e


def split_commands(cmds):
    (convert,) = [c for c in cmds if CONVERTER in c]
    (train,) = [c for c in cmds if TRAINER in c]
    return (parse_with(converter_parse_args, after(convert, CONVERTER), "conversion"),
            parse_with(trainer_parse_args, after(train, TRAINER), "trainer"), train)


def check_hd_pissa_layout(conv, args, world_size, model, expected_k=8):
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert (conv.tensor_model_parallel_size, conv.pipeline_model_parallel_size) == (tp, pp)
    assert args.pretrained_checkpoint == conv.save  # the trainer reads what the converter wrote
    assert world_size % (tp * pp) == 0
    dp = world_size // (tp * pp)
    k = dp * args.hd_pissa_virtual_ranks
    assert k == expected_k
    assert args.global_batch_size % (args.micro_batch_size * k) == 0
    m, n = SMALLEST_TARGET[model]
    assert args.hd_pissa_rank * k <= min(m, n) // 4  # "well under min(m, n)"
    assert args.peft == "hd-pissa" and args.bf16 and args.hd_pissa_svd == "randomized"
    assert args.hd_pissa_master_weights == "sharded-fp32" and conv.dtype == "bf16"
    assert args.sequence_parallel == (tp > 1)
    return dp, k


@pytest.mark.parametrize("tp, dp, virtual", [(1, 8, 1), (2, 4, 2)])
def test_llama3_8b_one_node(tp, dp, virtual):
    env = {"DRY_RUN": "1", "HF_DIR": "/models/Llama-3.1-8B", "DATA": "/data/train.jsonl", "TP": str(tp)}
    cmds = commands(EXAMPLES / "llama3_8b_one_node.sh", env)
    conv, args, train = split_commands(cmds)
    assert train[train.index("--nproc-per-node") + 1] == "8" and "torch.distributed.run" in train
    assert check_hd_pissa_layout(conv, args, 8, "8b") == (dp, 8)
    assert args.hd_pissa_virtual_ranks == virtual and args.valid_data_path is None
    # Flags after the script name reach the trainer last, and a held-out set adds evaluation.
    assert (args.epochs, args.train_iters) == (1, None)
    cmds = commands(EXAMPLES / "llama3_8b_one_node.sh", {**env, "VALID": "/data/heldout.jsonl", "TRAIN_ITERS": "7"},
                    args=["--hd-pissa-rank", "8"])
    _, args, _ = split_commands(cmds)
    assert (args.train_iters, args.epochs, args.hd_pissa_rank) == (7, None, 8)
    assert args.valid_data_path == "/data/heldout.jsonl"
    assert args.eval_interval > 0


@pytest.mark.parametrize("nodes, dp, virtual", [(2, 1, 8), (4, 2, 4), (8, 4, 2), (16, 8, 1)])
def test_llama3_70b_tp8_pp2_slurm(nodes, dp, virtual):
    env = {"DRY_RUN": "1", "HF_DIR": "/models/Llama-3.1-70B", "DATA": "/data/train.jsonl",
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS_PER_NODE": "8"}
    cmds = commands(EXAMPLES / "slurm" / "llama3_70b_tp8_pp2.sbatch", env)
    conv, args, train = split_commands(cmds)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 2)
    assert train[0] == "srun" and f"--ntasks={nodes * 8}" in train and "megatron_hdpissa.launch" in train
    assert check_hd_pissa_layout(conv, args, nodes * 8, "70b") == (dp, 8)
    assert args.hd_pissa_virtual_ranks == virtual
    sbatch_nodes = [line for line in (EXAMPLES / "slurm" / "llama3_70b_tp8_pp2.sbatch").read_text().splitlines()
                    if line.startswith("#SBATCH --nodes=")]
    assert sbatch_nodes == ["#SBATCH --nodes=4"]  # the default the comment's table marks


def test_generic_sbatch_flags(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    srun = fake / "srun"
    srun.write_text("#!/bin/bash\nprintf '%q ' srun \"$@\"; printf '\\n'\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
           "TP_SIZE": "2", "PRETRAINED_CHECKPOINT": "/ckpt", "DATA_PATH": "/data/train.jsonl"}
    cmds = commands(EXAMPLES / "slurm" / "finetune_hdpissa.sbatch", env, args=["--train-iters", "10"],
                    fake_srun=fake)
    (cmd,) = [c for c in cmds if c[0] == "srun"]
    args = parse_with(trainer_parse_args, after(cmd, TRAINER), "trainer")
    assert (args.tensor_model_parallel_size, args.train_iters, args.pretrained_checkpoint) == (2, 10, "/ckpt")


def test_a_typo_in_a_script_fails(tmp_path):
    """The guard itself: a misspelt trainer flag or converter flag in a copy of a script is caught."""
    text = (EXAMPLES / "llama3_8b_one_node.sh").read_text()
    env = {"DRY_RUN": "1", "HF_DIR": "/m", "DATA": "/d.jsonl"}
    for good, bad in (("--hd-pissa-svd randomized", "--hd-pissa-svd randomised"),
                      ("  --hd-pissa-master-weights", "  --hd-pissa-master-weight"),
                      ("--pipeline-model-parallel-size 1", "--pipeline-parallel-size 1")):
        assert text.count(good) == 1, good
        copy = tmp_path / "typo.sh"
        copy.write_text(text.replace(good, bad))
        with pytest.raises(AssertionError, match="the parser rejects"):
            split_commands(commands(copy, env))

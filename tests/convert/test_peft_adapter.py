"""convert/peft_adapter.py and --export-hf-adapter: real trainer runs on a tiny LLaMA (GQA: q 64 rows,
k / v 32) exported as HF PEFT adapters, loaded by `peft.PeftModel.from_pretrained` onto the original
HF base, against the trainer's merged --export-hf: LoRA (TP = 2, legacy checkpoint) and PiSSA (no
--save: a temporary checkpoint) exactly; HD-PiSSA (K = 2, r = 2, torch_dist) with its remainders
checked against numpy's float64 SVD of W_T - W_0, exact at full rank."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_trainer_material
from tests.helpers.trainer import finetune_main

TOKENS = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(3))
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def material(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    return tiny_trainer_material(tmp_path_factory.mktemp("adapter"), smollm2_hf_dir, gsm8k_path, seed=11,
                                 num_train=16, ckpt_format="torch_dist", num_attention_heads=4,
                                 num_key_value_heads=2)


def _train(m, name: str, tp: int = 1, **flags) -> dict:
    """A 3-step run on 2 ranks with --export-hf and --export-hf-adapter; the folders by role."""
    out = {"merged": m["root"] / f"{name}-merged", "adapter": m["root"] / f"{name}-adapter"}
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 1,
            "--global-batch-size": 2, "--seq-length": 96, "--train-iters": 3, "--lr": 2e-2, "--seed": 3,
            "--hd-pissa-rank": 2, "--hd-pissa-alpha": 4, "--no-progress": None,
            "--tensor-model-parallel-size": tp, "--export-hf": out["merged"], "--export-hf-adapter": out["adapter"],
            **flags}
    argv = [str(x) for k, v in args.items() for x in ((k,) if v is None else (k, v))]
    run_distributed(finetune_main, 2, tp, args=(argv,))
    return out


def _logits(hf_dir, adapter=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def _weights(folder, file="model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / file))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def lora(material):
    return _train(material, "lora", tp=2, **{"--peft": "lora", "--ckpt-format": "torch",
                                             "--save": material["root"] / "lora-run"})


@pytest.fixture(scope="module")
def pissa(material):
    return _train(material, "pissa", **{"--peft": "pissa", "--hd-pissa-fused-decomposition": None})


@pytest.fixture(scope="module")
def hd_pissa(material):
    return _train(material, "hd", **{"--save": material["root"] / "hd-run", "--ckpt-format": "torch_dist"})


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_lowrank_adapter_is_the_merged_model_on_the_original_base(material, lora, pissa, method):
    """PEFT's model = the merged export (logits to fp32 round-off), and each module's scaled
    `B A` = merged W - W_0 computed here from the two HF folders (PiSSA: rank 2r = [B | -B_0])."""
    run = {"lora": lora, "pissa": pissa}[method]
    config = json.loads((run["adapter"] / "adapter_config.json").read_text())
    r = {"lora": 2, "pissa": 4}[method]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (r, 2.0 * r, {}), config
    assert sorted(config["target_modules"]) == sorted(m.split(".")[1] for m in MODULES)
    factors, merged, base = _weights(run["adapter"], "adapter_model.safetensors"), _weights(run["merged"]), \
        _weights(material["hf"])
    for i in range(2):
        for module in MODULES:
            key = f"base_model.model.model.layers.{i}.{module}"
            a, b = factors[f"{key}.lora_A.weight"].double(), factors[f"{key}.lora_B.weight"].double()
            assert a.shape[0] == b.shape[1] == r
            name = f"model.layers.{i}.{module}.weight"
            want = merged[name].double() - base[name].double()
            assert want.abs().max() > 1e-4, f"{name} did not move"
            torch.testing.assert_close(2.0 * b @ a, want, rtol=0, atol=1e-5 * want.abs().max().item())
    theirs, ours = _logits(run["merged"]), _logits(material["hf"], run["adapter"])
    assert _gap(ours, theirs) <= 1e-5 * theirs.abs().max().item(), _gap(ours, theirs)
    assert _gap(_logits(material["hf"]), theirs) > 1e-3  # the fine-tune changed the logits
    assert not list(material["root"].glob(".*checkpoint-*"))  # PiSSA's temporary checkpoint (no --save) is gone


def _numpy_remainder(merged, base, name: str, rank: int) -> float:
    s = np.linalg.svd(merged[name].double().numpy() - base[name].double().numpy(), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2)))


def _readme_remainders(adapter) -> dict:
    rows = re.findall(r"^\| (model\.\S+) \| (\d+) \| \S+ \| (\S+) \|$", (adapter / "README.md").read_text(), re.M)
    return {m: (int(r), float(e)) for m, r, e in rows}


def test_hd_pissa_adapter_remainder_and_logits(material, hd_pissa, capsys):
    """The trainer's adapter at R = 2 K r = 8, the tool's at R = K r = 4 and at full rank (64:
    k / v capped at 32 through rank_pattern): README remainders = numpy's SVD tail; the PEFT
    model's logit gap is within the remainder's share of the fine-tune's change, and ~0 at full rank."""
    from tools.convert_megatron_to_hf import main as tool

    merged, base = _weights(hd_pissa["merged"]), _weights(material["hf"])
    ft, before = _logits(hd_pissa["merged"]), _logits(material["hf"])
    change = _gap(ft, before)
    folders = {8: hd_pissa["adapter"]}
    for rank in (4, 64):
        folders[rank] = material["root"] / f"hd-adapter-{rank}"
        assert tool(["--load", str(material["root"] / "hd-run"), "--export-hf-adapter", str(folders[rank]),
                     "--export-adapter-rank", str(rank)]) == 0
    gaps = {}
    for rank, folder in folders.items():
        rem = _readme_remainders(folder)
        assert len(rem) == 14, sorted(rem)
        for module, (r, got) in rem.items():
            want = _numpy_remainder(merged, base, module + ".weight", rank)
            assert r == min(rank, *merged[module + ".weight"].shape), (module, r)
            assert abs(got - want) <= 1e-3 * want + 1e-6, (rank, module, got, want)
        gaps[rank] = _gap(_logits(material["hf"], folder), ft)
        overall = float(re.search(r"overall (\S+)", (folder / "README.md").read_text()).group(1))
        print(f"R={rank}: remainder {overall:.3e}, logits gap {gaps[rank]:.3e} of a change {change:.3e}")
        if rank == 64:
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["r"] == 64 and config["rank_pattern"] == {
                f"model.layers.{i}.self_attn.{p}_proj": 32 for i in range(2) for p in "kv"}, config
            assert config["alpha_pattern"] == {k: 32.0 for k in config["rank_pattern"]}
            assert overall < 1e-6 and gaps[rank] <= 1e-5 * ft.abs().max().item(), (overall, gaps[rank])
        else:
            assert 1e-4 < overall < 0.5 and gaps[rank] <= 4 * overall * change, (rank, overall, gaps[rank])
    assert gaps[4] > gaps[8] > gaps[64]


def test_bad_input_is_one_line_naming_the_flag(material, lora, hd_pissa, tmp_path, capsys, smollm2_hf_dir):
    from megatron_hdpissa.training.arguments import parse_args
    from tests.helpers.hf_models import tiny_llama_with_smollm2_tokenizer
    from tools.convert_megatron_to_hf import main as tool

    other = tiny_llama_with_smollm2_tokenizer(tmp_path / "other", smollm2_hf_dir, seed=12, hidden_size=64,
                                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2)

    common = ["--pretrained-checkpoint", "b", "--data-path", "d", "--train-iters", "1"]
    for extra, want in ((["--peft", "lora", "--export-hf-adapter", "x", "--export-adapter-rank", "4"],
                         "--export-adapter-rank must be >= 1 and goes with --export-hf-adapter and --peft hd-pissa"),
                        (["--export-adapter-rank", "4"], "--export-adapter-rank must be >= 1"),
                        (["--peft", "full", "--export-hf-adapter", "x"], "--export-hf-adapter needs an adapter method")):
        with pytest.raises(SystemExit):
            parse_args(common + extra)
        assert want in capsys.readouterr().err, extra
    from megatron_hdpissa.training.validation import check_outputs

    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="--export-hf-adapter .* is a file, not a folder"):
        check_outputs(parse_args(common + ["--export-hf-adapter", str(tmp_path / "a_file")]))
    lora_run, hd_run = str(material["root"] / "lora-run"), str(material["root"] / "hd-run")
    cases = [
        ([hd_run, "--export-adapter-rank", "0"], "error: --export-adapter-rank must be a positive integer, got 0"),
        ([lora_run, "--export-adapter-rank", "4"], "error: --export-adapter-rank applies to HD-PiSSA checkpoints"),
        ([hd_run, "--pretrained-checkpoint", str(tmp_path / "none")], "error: --pretrained-checkpoint "),
        ([str(material["base"])], "is not a training checkpoint"),
        # another model of the same shapes: its embeddings differ, so no adapter reproduces the run
        ([hd_run, "--pretrained-checkpoint", str(other)], "tensors outside the adapted modules differ"),
        ([lora_run, "--pretrained-checkpoint", str(hd_pissa["merged"])], "differs from it"),
        ([hd_run, "--pretrained-checkpoint", str(material["root"] / "hd-adapter")], "error: --pretrained-checkpoint "),
    ]
    for i, (argv, want) in enumerate(cases):
        assert tool(["--load", *argv, "--export-hf-adapter", str(tmp_path / f"out{i}")]) == 1
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and want in errors[0], (argv, err)
        assert not (tmp_path / f"out{i}").exists()

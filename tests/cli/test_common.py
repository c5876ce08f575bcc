"""Options every model-running command shares: --device (auto, cpu, cuda, cuda:N) and --jacobian-batch;
out of memory in a Jacobian pass exits 1 naming --jacobian-batch, with no output file left."""

import json

import pytest
import torch

from steindiff.cli import main

CUDA = torch.cuda.is_available()
# every command that runs a model, with what it needs besides --device
COMMANDS = {
    "sample": ["--n", "4"],
    "calibrate": ["--out", "{tmp}/c.json"],
    "diagnose": ["--n", "4"],
    "bench": ["--model", "gmm:toy2d", "--n", "4"],
    "train": ["--out", "{tmp}/ckpt"],
    "demo": ["--out", "{tmp}/demo"],
    "sample-dist": ["--out-dir", "{tmp}/dist"],
}


def _args(cmd, tmp_path, *extra):
    return [cmd, *[a.format(tmp=tmp_path) for a in COMMANDS[cmd]], *extra]


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_documents_the_device(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--device" in out and "auto (" in out and "cuda:N" in out


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_cuda_without_cuda_exits_2(cmd, tmp_path, capsys):
    assert main(_args(cmd, tmp_path, "--device", "cuda", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert f"steindiff {cmd}: error: --device: device 'cuda' requested but CUDA is not available" in err
    assert list(tmp_path.iterdir()) == []  # refused before any work or output


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("device,match", [("cuda:99", "cuda:99"), ("gpu", "unknown device 'gpu'")])
def test_bad_devices_exit_2(cmd, device, match, tmp_path, capsys):
    assert main(_args(cmd, tmp_path, "--device", device, "--no-progress")) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cmd", ["sample", "calibrate", "diagnose", "bench", "demo", "sample-dist"])
def test_bad_jacobian_batch_exits_2(cmd, tmp_path, capsys):
    assert main(_args(cmd, tmp_path, "--jacobian-batch", "0", "--device", "cpu", "--no-progress")) == 2
    assert "--jacobian-batch must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["sample", "calibrate", "diagnose", "bench", "demo", "sample-dist"])
def test_bad_jacobian_precision_exits_2(cmd, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(_args(cmd, tmp_path, "--jacobian-precision", "fp16", "--device", "cpu", "--no-progress"))
    assert e.value.code == 2
    assert "argument --jacobian-precision: invalid choice: 'fp16'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bf16_jacobian_precision_needs_reverse_mode(tmp_path, capsys):
    assert main(["sample", "--n", "4", "--stabilizer", "stein", "--divergence", "jvp", "--jacobian-precision", "bf16",
                 "--device", "cpu", "--no-progress"]) == 2
    assert "jacobian_precision='bf16' is for the reverse-mode" in capsys.readouterr().err


def test_sample_with_a_bf16_jacobian_pass(capsys):
    assert main(["sample", "--model", "digits", "--n", "4", "--nfe", "3", "--stabilizer", "stein", "--probes", "1",
                 "--jacobian-precision", "bf16", "--jacobian-batch", "2", "--device", "cpu", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nfe"] == 3 and out["extra_passes"] == 6  # the Jacobian pass's own forward pass and one backward


def test_help_says_jvp_costs_more(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "vjp (reverse mode, the default and the cheaper one)" in out and "costs more time and memory" in out
    assert "--jacobian-batch N" in out and "--jacobian-precision {fp32,bf16}" in out


def test_bf16_help_states_the_h100_measurement(capsys):
    """--jacobian-precision's help quotes the H100 run of benchmarks/gpu_check.py, and its figures are that file's."""
    from pathlib import Path

    from steindiff.cli.common import BF16_ON_H100

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "not measured" not in out and f"an H100 ({BF16_ON_H100})" in out
    gpu = json.loads((Path(__file__).parents[2] / "docs/results/gpu-check-nvidia-h100-80gb-hbm3.json").read_text())
    unet = next(t for t in gpu["timing"] if t["model"] == "unet-34.4M")
    rows = {r["variant"]: r for r in unet["rows"]}
    bf16, fp32 = rows["stein_vjp_p1_bf16"], rows["stein_vjp_p1"]
    assert (f"{bf16['time_ratio']:.1f}x the plain solver's time and {bf16['mem_ratio']:.1f}x its memory in bf16, "
            f"against {fp32['time_ratio']:.1f}x and {fp32['mem_ratio']:.1f}x in fp32") in BF16_ON_H100
    assert f"batch {unet['batch']}" in BF16_ON_H100


@pytest.mark.parametrize("jb,size", [([], "batch of 6 samples"), (["--jacobian-batch", "4"], "4 samples x 5 probe(s)")])
def test_out_of_memory_in_the_jacobian_pass(jb, size, tmp_path, capsys, oom_model_name):
    out, trace = tmp_path / "s.npz", tmp_path / "t.json"
    rc = main(["sample", "--model", oom_model_name, "--stabilizer", "stein", "--n", "6", "--nfe", "3", *jb,
               "--device", "cpu", "--out", str(out), "--trace", str(trace), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "JacobianOutOfMemoryError" in err and "--jacobian-batch" in err and size in err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing half-written


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))])
def test_sample_on_a_device_equals_the_cpu(device, tmp_path, capsys):
    runs = {}
    for dev in ("cpu", device):
        assert main(["sample", "--model", "gmm:image64", "--stabilizer", "stein", "--n", "40", "--nfe", "4", "--seed",
                     "3",
                     "--dtype", "float64", "--jacobian-batch", "16", "--device", dev, "--json", "--no-progress"]) == 0
        runs[dev] = json.loads(capsys.readouterr().out)
    assert runs[device]["device"].startswith(device)
    assert runs[device]["gammas"] == pytest.approx(runs["cpu"]["gammas"], rel=1e-6)
    assert runs[device]["metrics"]["sw2"] == pytest.approx(runs["cpu"]["metrics"]["sw2"], rel=1e-6)

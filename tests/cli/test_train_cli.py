import json

import numpy as np
import pytest
import torch

from steindiff.cli import main

TINY = ["--channels", "8", "--channel-mult", "1,2", "--attn-levels", "1", "--batch-size", "8", "--warmup", "2"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--no-progress" in out and "digits" in out


def test_train_resume_and_sample(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--out", str(out), "--iters", "2", "--no-progress", "--json", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["holdout"] == 297 and summary["data"]["shape"] == [1, 8, 8]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    # an existing checkpoint is not overwritten without --resume
    assert main(["train", "--out", str(out), "--iters", "3", "--no-progress", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err

    assert main(["train", "--out", str(out), "--iters", "3", "--resume", "--no-progress", *TINY]) == 0
    assert "(mean of the last 3 iterations)" in capsys.readouterr().out  # the true count, not the window's 200

    # the checkpoint is a model for the other commands
    assert main(["sample", "--model", str(out), "--n", "4", "--nfe", "2", "--solver", "euler", "--no-progress",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4

    # another architecture cannot resume it
    assert main(["train", "--out", str(out), "--iters", "4", "--resume", "--no-progress", *TINY[:-2], "--channels",
                 "16"]) == 2
    assert "architecture differs" in capsys.readouterr().err


def test_flow_objective_trains_resumes_and_samples_with_the_flow_schedule(tmp_path, capsys):
    out = tmp_path / "fl"
    args = ["train", "--objective", "flow", "--logit-std", "0.7", "--out", str(out), "--no-progress", "--json", *TINY]
    assert main([*args, "--iters", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["loss_type"] == "flow"
    assert json.loads((out / "config.json").read_text())["objective"] == "flow"
    assert main([*args, "--iters", "3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert main(["sample", "--model", str(out), "--n", "4", "--nfe", "3", "--solver", "heun_flow", "--schedule", "flow",
                 "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 4 and s["nfe"] == 3


def test_user_npy_data(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc = main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"), "--iters", "1",
               "--no-progress", "--json", "--channels", "8", "--channel-mult", "1,2", "--attn-levels", "",
               "--batch-size", "4"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["data"]["shape"] == [1, 4, 4] and s["holdout"] == 0


@pytest.mark.parametrize("args,match", [
    (["--data", "/no/such/data.npy"], "no such file"),
    (["--resume"], "nothing to resume"),
    (["--iters", "0"], "iters must be >= 1"),
    (["--loss", "edm", "--lr", "-1"], "lr > 0"),
    (["--channel-mult", "1,1,1,1,1"], "not divisible by 16"),
    (["--attn-levels", "5"], "attn_levels"),
    (["--threads", "0"], "--threads"),
])
def test_usage_errors(tmp_path, capsys, args, match):
    rc = main(["train", "--out", str(tmp_path / "o"), "--no-progress", *TINY, *args])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_bad_data_and_outputs(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.full((4, 1, 8, 8), 5.0, np.float32))
    assert main(["train", "--data", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and "[-1, 1]" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert main(["train", "--out", str(tmp_path / "full"), "--no-progress"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "no" / "dir"), "--no-progress"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "o"), "--channel-mult", "a,b"])
    assert e.value.code == 2


def test_patches_split_by_region_in_the_checkpoint_and_float16_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    from steindiff.data import load_dataset
    from steindiff.models.registry import load_model

    out = tmp_path / "p"
    assert main(["train", "--data", "patches:size=16,photos=chelsea", "--out", str(out), "--iters", "1",
                 "--weights-dtype", "float16", "--no-progress", "--json", *TINY]) == 0
    s = json.loads(capsys.readouterr().out)
    ds = load_dataset("patches:size=16,photos=chelsea")
    cfg = json.loads((out / "config.json").read_text())
    assert s["data"]["shape"] == [3, 16, 16] and cfg["data"]["source"] == "patches:size=16,photos=chelsea"
    assert cfg["data"]["holdout"]["by"] == "photo region" and cfg["data"]["holdout"]["indices"] == ds.holdout.tolist()
    assert cfg["weights"]["dtype"] == "float16" and cfg["training"]["weights_dtype"] == "float16"
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    spec = load_model(str(out))
    assert spec.info["metrics"] == "patches" and spec.info["heldout"].shape == (len(ds.holdout), 3, 16, 16)


@pytest.mark.parametrize("args,match", [
    (["--data", "patches:photos=camera+coins"], "are grayscale only; an RGB patch model needs at least one color"),
    (["--data", "patches:size=512,photos=chelsea"], "photo chelsea is 451x300 pixels, smaller than the patch size"),
    (["--data", "patches:size=20,photos=chelsea", "--channel-mult", "1,2,2,2"], "size 20x20 is not divisible by 8"),
    (["--data", "patches:photos=chelsea", "--holdout", "10"], "holds out its own patches"),
])
def test_bad_patches_are_refused_before_any_training(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setattr("steindiff.train._Run.run", lambda *a: pytest.fail("training started"))
    assert main(["train", "--out", str(tmp_path / "o"), "--no-progress", *TINY, *args]) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

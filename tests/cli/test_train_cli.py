import json

import numpy as np
import pytest

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

    assert main(["train", "--out", str(out), "--iters", "3", "--resume", "--no-progress", "--json", *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3

    # the checkpoint is a model for the other commands
    assert main(["sample", "--model", str(out), "--n", "4", "--nfe", "2", "--solver", "euler", "--no-progress",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4

    # another architecture cannot resume it
    assert main(["train", "--out", str(out), "--iters", "4", "--resume", "--no-progress", *TINY[:-2], "--channels",
                 "16"]) == 2
    assert "architecture differs" in capsys.readouterr().err


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

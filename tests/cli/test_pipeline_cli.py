"""``steindiff calibrate-pipeline`` on a tiny pipeline saved with save_pretrained (loaded offline), and
``steindiff export`` of its file: outputs, the cache, usage errors (exit 2) with nothing half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integrations"))
import tiny_pipelines as tp  # noqa: E402

from steindiff.cli import main  # noqa: E402
from steindiff.integrations.diffusers_scheduler import SteinDiffScheduler  # noqa: E402

TINY = ["--n", "8", "--ref-steps", "8", "--max-solves", "2", "--max-seconds", "10", "--max-sequence-length", "8",
        "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-sd3"
    tp.stable_diffusion_3().to(torch.float32).save_pretrained(path)
    return path


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\nsunset\n")
    return p


def test_calibrate_pipeline_writes_a_calibration_the_scheduler_takes(folder, prompts, tmp_path, capsys):
    out, cache = tmp_path / "cal.json", tmp_path / "cache"
    argv = ["calibrate-pipeline", str(folder), "--prompts", str(prompts), "--guidance-scale", "4", "--height", "8",
            "--width", "8", "--solver", "dpmpp_2m", "--nfe", "3", "--calibration-dir", str(cache), "--out", str(out),
            "--json", *TINY]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "steindiff: calibrating dpmpp_2m / flow / NFE 3" in captured.err
    assert summary["num_inference_steps"] == 3 and summary["guidance_scale"] == 4.0 and len(summary["gammas"]) == 3
    assert summary["pipeline"] == str(folder) and summary["usage"][1].startswith("pipe(prompt, num_inference_steps=3")
    made = json.loads(out.read_text())
    assert made["schema"] == "steindiff.gamma-schedule/1" and made["pipeline"]["sample_shape"] == [4, 8, 8]
    assert made["diffusers"]["guidance_scale"] == 4.0 and len(list(cache.glob("*.json"))) == 1
    # the file drives the pipeline's scheduler (with the model check) and the pipeline runs at the same call
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SteinDiffScheduler.from_pipeline(pipe, calibration=out, guidance_scale=4)
    image = pipe("a cat", num_inference_steps=3, guidance_scale=4, height=8, width=8, max_sequence_length=8,
                 output_type="pt").images
    assert image.shape == (1, 3, 8, 8) and torch.isfinite(image).all()
    # again: read from the cache (no notice), the same calibration
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "calibrating" not in captured.err and json.loads(captured.out)["sigmas"] == summary["sigmas"]
    # text output names the file and the two lines to use it
    assert main([a for a in argv if a != "--json"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "SteinDiffScheduler.from_pipeline(pipe, calibration=" in text


def test_export_cli(folder, prompts, tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert main(["calibrate-pipeline", str(folder), "--prompts", str(prompts), "--height", "8", "--width", "8",
                 "--nfe", "3", "--calibration-dir", str(tmp_path / "c"), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    text = capsys.readouterr().out
    for fmt in ("diffusers", "kdiffusion", "comfyui"):
        assert f"{fmt}: SIGMAS = " in text
    assert "FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=SIGMAS)" in text and "ManualSigmas" in text
    written = tmp_path / "exports.json"
    assert main(["export", str(out), "--format", "diffusers", "--json", "--out", str(written)]) == 0
    summary = json.loads(capsys.readouterr().out)
    (ex,) = summary["exports"]
    assert ex["format"] == "diffusers" and json.loads(written.read_text())["exports"] == summary["exports"]
    # the exported sigmas, given to the pipeline's own scheduler, are the calibration's levels
    own = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    own.set_timesteps(sigmas=ex["sigmas"])
    t = torch.tensor(json.loads(out.read_text())["sigmas"][:-1], dtype=torch.float64)
    torch.testing.assert_close(own.sigmas[:-1].double(), t / (1 + t), rtol=2e-6, atol=1e-6)


def test_usage_errors_exit_2_and_write_nothing(folder, prompts, tmp_path, capsys):
    out = tmp_path / "cal.json"
    base = ["calibrate-pipeline", str(folder), "--prompts", str(prompts), "--out", str(out), *TINY]
    cases = [
        (["calibrate-pipeline", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", str(out)],
         "does not exist"),
        (["calibrate-pipeline", str(tmp_path), "--prompts", str(prompts), "--out", str(out)],
         "has no model_index.json"),
        ([*base[:3], str(tmp_path / "missing.txt"), *base[4:]], "cannot read --prompts"),
        ([*base, "--solver", "rk4"], "unknown solver 'rk4'"),
        ([*base, "--solver", "heun", "--nfe", "1"], "--nfe 1 buys heun a single step"),
        ([*base, "--schedule", "cosine"], "schedule 'cosine' is not one of flow, karras, logsnr, time"),
        ([*base, "--height", "0"], "--height must be >= 1"),
        ([*base[:-len(TINY)], "--out", str(tmp_path / "no" / "dir" / "x.json")], "x.json"),
        ([*base, "--no-calibrate", "--calibration-dir", str(tmp_path / "empty")], "nothing is cached"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases.append(([*base[:3], str(empty), *base[4:]], "holds no prompt"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()
    assert main(["export", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"schema": "steindiff.gamma-schedule/1", "model": "gmm:toy2d", "solver": "euler",
                                 "nfe": 2, "schedule": "karras", "sigmas": [80.0, 1.0, 0.0], "coords": "ve",
                                 "gammas": [1.0, 0.9]}))
    assert main(["export", str(plain), "--format", "diffusers", "--out", str(tmp_path / "e.json")]) == 2
    assert "needs the pipeline's scheduler config" in capsys.readouterr().err and not (tmp_path / "e.json").exists()
    assert main(["export", str(plain), "--format", "diffusers", "--scheduler-config", str(folder)]) == 0
    assert "gammas are not 1 (0.9 to 1)" in capsys.readouterr().out

"""``ocrbatch ocr`` output and its handling of bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ocrbatch.cli.main import main


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, test_images):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(test_images[:3]):
        path = folder / f"page{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_json_output(tiny_model, image_files, engine_f32):
    result = run("ocr", *image_files, "--model", tiny_model, "--quant", "F32", "--max-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in image_files]
    for row, image in zip(rows, image_files):
        assert {"path", "text", "token_ids", "n_image_tokens", "timings", "model", "quant"} <= row.keys()
        assert row["quant"] == "F32" and row["error"] is None
        [expected] = engine_f32.ocr([image], max_tokens=12)
        assert row["token_ids"] == expected.token_ids
        assert row["n_image_tokens"] == expected.n_image_tokens
        assert row["timings"]["vision_s"] > 0


def test_int8_vision_from_the_command_line(tiny_model, image_files, engine_f32):
    result = run("ocr", image_files[0], "--model", tiny_model, "--quant", "F32", "--vision-dtype", "int8",
                 "--max-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    [exact] = engine_f32.ocr([image_files[0]], max_tokens=12)
    assert row["error"] is None and row["n_image_tokens"] == exact.n_image_tokens
    assert len(row["token_ids"]) > 0


def test_bad_images_fail_alone(tiny_model, image_files, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_files[0].read_bytes()[:200])
    result = run("ocr", empty, image_files[0], text, truncated, tmp_path / "missing.png",
                 "--model", tiny_model, "--quant", "F32", "--max-tokens", "4", "--json")
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"Error: {empty}: empty file (0 bytes)",
        f"Error: {text}: not a recognised image format",
        f"Error: {truncated}: corrupt or truncated image (image file is truncated)",
        f"Error: {tmp_path / 'missing.png'}: no such file",
    ]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [bool(row["error"]) for row in rows] == [True, False, True, True, True]
    assert rows[1]["token_ids"]


def test_unknown_task(tiny_model, image_files):
    result = run("ocr", image_files[0], "--model", tiny_model, "--task", "poetry")
    assert result.exit_code != 0 and "poetry" in result.stderr


def test_later_task_on_a_10_checkpoint(tiny_model, image_files):
    result = run("ocr", image_files[0], "--model", tiny_model, "--quant", "F32", "--task", "seal")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: task 'seal' needs a PaddleOCR-VL 1.5+ model; {tiny_model} is 1.0")


@pytest.mark.parametrize("breakage", ["missing", "no-config", "bad-config", "bad-weights"])
def test_broken_checkpoints_are_one_line_errors(tmp_path, tiny_model, image_files, breakage):
    broken = tmp_path / "broken"
    if breakage != "missing":
        shutil.copytree(tiny_model, broken)
    if breakage == "no-config":
        (broken / "config.json").unlink()
    elif breakage == "bad-config":
        (broken / "config.json").write_text("{ not json")
    elif breakage == "bad-weights":
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    process = subprocess.run(
        [sys.executable, "-m", "ocrbatch", "ocr", str(image_files[0]), "--model", str(broken), "--quant", "F32"],
        capture_output=True, text=True, timeout=300)
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {broken}"), process.stderr
    assert "Traceback" not in process.stderr


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("convert", "SomeOrg/SomeModel")
    assert result.exit_code == 1
    assert "SomeOrg/SomeModel: could not download" in result.stderr
    assert "pass a local model folder" in result.stderr

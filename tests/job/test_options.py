"""JobOptions: the rules for which options go together live with the options, not in the command line."""

import pytest
from click.testing import CliRunner
from helpers import job_options

from ocrbatch.cli.main import main
from ocrbatch.job.options import OptionError


@pytest.mark.parametrize("engine, settings, option, message", [
    ("local", dict(layout="cdla", layout_model="x.onnx"), "--layout-model", "applies to --layout pp-doclayout only"),
    ("local", dict(pdf_text="auto", task="table"), "--pdf-text", "stands in for OCR only, not task 'table'"),
    ("local", dict(task="spotting", layout="cdla"), "--task", "spotting reads whole pages"),
    ("local", dict(backend="openai"), "--base-url", "needs the server's address"),
    ("ray", dict(backend="openai"), "--base-url", "needs the server's address"),
    ("ray", dict(video_fps=2.0), "--video-fps", "samples videos at 1 frame/s"),
])
def test_options_that_do_not_go_together_name_the_option_to_change(tmp_path, engine, settings, option, message):
    options = job_options("model", [tmp_path], tmp_path / "out.parquet", **settings)
    with pytest.raises(OptionError, match=message) as raised:
        options.validate(engine)
    assert raised.value.option == option


def test_options_that_go_together_pass(tmp_path):
    job_options("model", [tmp_path], tmp_path / "out.parquet", layout="pp-doclayout", layout_model="x").validate()
    job_options("model", [tmp_path], tmp_path / "out", video_fps=2.0).validate("local")
    job_options("model", [tmp_path], tmp_path, layout="none").validate("ray")  # a folder is the ray dataset
    job_options("model", [tmp_path], tmp_path, backend="openai", base_url="http://x/v1").validate("ray")


def test_the_command_line_reports_the_rule_as_a_bad_parameter(tmp_path):
    (tmp_path / "out.parquet").mkdir()
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "out.parquet")])
    assert result.exit_code == 2 and "Invalid value for --out" in result.output
    assert "is a folder; the local engine writes one file" in result.output

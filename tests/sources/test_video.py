"""Video files as documents: sampled frames, near-duplicates dropped, timestamps, broken files, kills."""

import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_rows, run_cli, settle, write_pdf
from video_fixtures import noisy, slide_image, truncate, write_slides_video, write_unknown_codec_video, write_video

from ocrbatch.engines.local import run_job
from ocrbatch.job.options import JobOptions
from ocrbatch.records.sqlite import checkpoint_path_for
from ocrbatch.sources import video
from ocrbatch.sources.discover import Document
from ocrbatch.sources.rasterize import iter_pages

cli = run_cli



def test_slides_held_for_seconds_are_one_page_each_at_their_timestamps(tmp_path, record_property):
    path = tmp_path / "talk.mp4"
    starts = write_slides_video(path, [4, 3, 5, 3])  # 15 s at 5 frames/s, every frame noisy
    assert starts == [0.0, 4.0, 7.0, 12.0]
    for fps, sampled in [(1, 15), (5, 75)]:
        survey = video.survey(path, fps)
        assert (survey.sampled, survey.kept, survey.error, survey.duration_s) == (sampled, 4, None, 15.0)
        record_property(f"frames_sampled_vs_kept_at_{fps}fps", f"{sampled} -> {survey.kept}")
    pages = list(iter_pages(Document(path, "x"), [1, 2, 3, 4], max_pixels=10**6))
    assert [page.timestamp_s for page in pages] == starts
    assert all(page.error is None and page.image.size == (320, 240) for page in pages)
    assert [page.page for page in iter_pages(Document(path, "x"), [3], max_pixels=10**6)] == [3]


def test_the_duplicate_rule_keeps_a_new_line_of_text_and_drops_a_pointer(tmp_path):
    """A new line (a bar of 100×8 px: 40 cells) is a new page; a mouse pointer (12×12 px) is not."""
    rng = np.random.default_rng(1)
    slide = slide_image(0)
    pointer, new_line = slide.copy(), slide.copy()
    pointer[100:112, 150:162] = 0
    new_line[200:208, 40:140] = 0
    frames = [*noisy(slide, 5, rng), *noisy(pointer, 5, rng), *noisy(new_line, 5, rng)]
    write_video(tmp_path / "build.mp4", frames)
    survey = video.survey(tmp_path / "build.mp4", 5)
    pages = list(iter_pages(Document(tmp_path / "build.mp4", "x"), [1, 2, 3]))
    assert survey.kept == 2 and [page.timestamp_s for page in pages] == [0.0, 2.0]


def test_broken_and_unsupported_videos(tmp_path):
    cut = tmp_path / "cut.mkv"
    write_slides_video(cut, [3, 3, 3])
    truncate(cut, 0.6)  # Matroska decodes what it has and stops without an error: the declared duration tells
    survey = video.survey(cut, 1)
    assert survey.kept == 2 and survey.page_count == 3 and "of the 9.0 s it declares (truncated?)" in survey.error
    *good, broken = iter_pages(Document(cut, "x"), [1, 2, 3])
    assert [page.timestamp_s for page in good] == [0.0, 3.0] and broken.page == 3
    assert broken.error == survey.error
    write_unknown_codec_video(tmp_path / "odd.avi")
    with pytest.raises(video.InputError, match=r"unsupported video codec none \(QQQQ / 0x51515151\)"):
        video.survey(tmp_path / "odd.avi")


def video_page_states(out: Path, name: str) -> dict[int, str]:
    with sqlite3.connect(f"file:{checkpoint_path_for(out)}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT p.page, p.status FROM pages p JOIN documents d USING (doc_id) WHERE d.path LIKE ?",
                          (f"%{name}",)).fetchall()
    return dict(rows)


def job_options(tiny_model, paths, out, **overrides) -> JobOptions:
    settings = dict(paths=[Path(p) for p in paths], out=Path(out), model=str(tiny_model), quant="F32",
                    max_tokens=4, workers=1, seqs_per_worker=2, dpi=72, progress=False, min_file_age=0)
    settings.update(overrides)
    return JobOptions(**settings)



@pytest.mark.slow
def test_a_job_over_videos_and_images(tiny_model, tmp_path):
    from helpers import document_image

    docs = tmp_path / "docs"
    docs.mkdir()
    starts = write_slides_video(docs / "talk.mp4", [3, 3, 3])
    write_slides_video(docs / "cut.mkv", [3, 3, 3], seed=1)
    truncate(docs / "cut.mkv", 0.6)
    write_unknown_codec_video(docs / "odd.avi")
    document_image(320, 200, 1).save(docs / "scan.png")
    settle(docs)
    out = tmp_path / "out.jsonl"

    dry = cli("run", docs, "--out", out, "--model", tiny_model, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = {line.split("\t")[1]: line for line in dry.stdout.splitlines()}
    assert lines[str(docs / "talk.mp4")] == f"3\t{docs / 'talk.mp4'}\tvideo 9.0 s, 3 frames kept of 9 sampled at 1/s"
    assert re.search(r"\tvideo 9\.0 s, 2 frames kept of [5-8] sampled at 1/s; then fails: .*ends after",
                     lines[str(docs / "cut.mkv")])
    assert "unsupported video codec none (QQQQ" in lines[str(docs / "odd.avi")]

    summary = run_job(job_options(tiny_model, [docs], out))  # layout (cdla) as for images
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(out)}
    talk = [rows[("talk.mp4", page)] for page in (1, 2, 3)]
    assert [r["timestamp_s"] for r in talk] == starts and all(r["status"] == "ok" for r in talk)
    assert all(r["page_count"] == 3 and (r["width"], r["height"]) == (320, 240) and r["blocks"] for r in talk)
    cut = [rows[("cut.mkv", page)] for page in (1, 2, 3)]
    assert [r["status"] for r in cut] == ["ok", "ok", "failed"] and [r["timestamp_s"] for r in cut] == [0, 3, None]
    assert "ends after" in cut[2]["error"] and "(truncated?)" in cut[2]["error"]
    assert rows[("odd.avi", 0)]["status"] == "failed" and "QQQQ" in rows[("odd.avi", 0)]["error"]
    assert rows[("scan.png", 1)]["timestamp_s"] is None and rows[("scan.png", 1)]["status"] == "ok"
    assert len(rows) == 8 and summary.pages_failed >= 1

    retried = run_job(job_options(tiny_model, [docs], out, retry_failed=True))
    again = {(Path(r["path"]).name, r["page"]): r for r in read_rows(out)}
    # Only the failed pages are redone (and fail again, for the same reasons); still each page once.
    assert retried.pages_ok == 0 and retried.pages_failed >= 1 and set(again) == set(rows)
    assert again[("cut.mkv", 3)]["error"] == cut[2]["error"]
    refused = cli("run", docs, "--out", out, "--model", tiny_model, "--quant", "F32", "--max-tokens", "4",
                  "--video-fps", "2")
    assert refused.returncode == 3 and "video_fps=1, not 2" in refused.stderr


@pytest.mark.slow
def test_kill_9_mid_video_then_every_page_exactly_once(tiny_model, tmp_path):
    from helpers import llama_workers, page_states, popen, slow_run_args, wait_for_ok_pages

    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "a.pdf", 2, text="First")
    starts = write_slides_video(docs / "b-talk.mp4", [3, 2, 4, 3])
    write_pdf(docs / "c.pdf", 2, text="Last")
    settle(docs)
    clean_out, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    args = lambda target: slow_run_args(tiny_model, docs, target, tokens=200)  # noqa: E731
    clean = subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args(clean_out))], capture_output=True,
                           text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr
    reference = {(Path(r["path"]).name, r["page"]): (r["status"], r["text"], r["timestamp_s"])
                 for r in read_rows(clean_out)}
    assert len(reference) == 8
    assert [reference[("b-talk.mp4", page)][2] for page in (1, 2, 3, 4)] == starts

    landed, video_split = 0, False
    for target_ok in (1, 3, 5):  # inside a.pdf, inside the video, after it
        process = popen(args(out))
        wait_for_ok_pages(out, process, at_least=target_ok, deadline_s=300)
        before_kill = page_states(out)
        decoding = llama_workers(process)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        states = page_states(out)
        if alive and decoding and states.get("pending", 0) and states.get("ok", 0) >= before_kill.get("ok", 0):
            landed += 1
        video_states = set(video_page_states(out, "b-talk.mp4").values())
        video_split = video_split or {"ok", "pending"} <= video_states
    assert landed == 3, "every kill must land mid-run, with pages still pending"
    assert video_split, "one kill must land with the video's pages part done, part pending"
    final = subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args(out))], capture_output=True, text=True,
                           timeout=900)
    assert final.returncode == 0, final.stderr
    rows = read_rows(out)
    keys = [(Path(r["path"]).name, r["page"]) for r in rows]
    assert len(keys) == len(set(keys)) == 8
    assert {key: (r["status"], r["text"], r["timestamp_s"]) for key, r in zip(keys, rows)} == reference
    assert checkpoint_path_for(out).exists()

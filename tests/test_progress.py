"""Issue 14 item 5: every long phase shows progress with elapsed time and ETA; plain lines when not on a terminal.

The clock is injected: the lines are asserted exactly, no test depends on how fast the machine is."""

from __future__ import annotations

from pathlib import Path

from peftlab.config import ModelConfig
from peftlab.models import gguf, loader
from peftlab.watch.progress import Countdown, Progress, phase


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(capsys) -> list[str]:
    """The progress lines: on stderr (stdout keeps the results)."""
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_a_phase_in_a_log_prints_its_start_tenths_with_eta_and_its_end(capsys) -> None:
    clock = Clock()
    progress = Progress("evaluating on validation", total=20, clock=clock).start()
    for _ in range(20):
        clock.now += 3.0  # 3 s a batch
        progress.advance()
    progress.stop()
    out = lines(capsys)
    assert out[0] == "evaluating on validation 0/20 ..."
    assert out[1] == "evaluating on validation 2/20 (10%)  elapsed 6s  eta 54s"
    assert out[5] == "evaluating on validation 10/20 (50%)  elapsed 30s  eta 30s"
    assert len(out) == 11 and out[-1] == "evaluating on validation: done in 1m00s (20/20)"  # no update at 100%
    assert not any("\x1b" in line or "\r" in line for line in out)  # no ANSI, no carriage return in a pipe


def test_a_phase_stopped_short_of_its_total_does_not_say_done(capsys) -> None:
    # Ctrl-C at step 4 of 12 printed "train: done in 3s (4/12)"
    clock = Clock()
    progress = Progress("train", total=12, clock=clock).start()
    clock.now += 3.0
    progress.advance(4)
    progress.stop()
    assert lines(capsys)[-1] == "train: stopped after 3s (4/12)"


def test_a_resumed_phase_counts_its_eta_from_this_session_and_quick_tenths_stay_quiet(capsys) -> None:
    clock = Clock()
    progress = Progress("train", clock=clock).start(total=100, done=50)
    clock.now += 1.0
    progress.advance(60)  # a tenth crossed one second after the last line: not worth a line of its own
    clock.now += 9.0
    progress.advance(70)  # 20 steps in 10 s: 30 left -> 15 s
    clock.now += 31.0
    progress.advance(71)  # no new tenth, but half a minute of silence
    assert lines(capsys) == ["train 50/100 ...", "train 70/100 (70%)  elapsed 10s  eta 15s",
                             "train 71/100 (71%)  elapsed 41s  eta 57s"]


def test_a_phase_without_a_total_shows_elapsed_time_and_a_failed_phase_no_done_line(capsys) -> None:
    clock = Clock()
    with Progress("loading the model x", clock=clock):
        clock.now += 125
    try:
        with phase("converting the GGUF tokenizer of y"):
            raise ValueError("broken")
    except ValueError:
        pass
    assert lines(capsys) == ["loading the model x ...", "loading the model x: done in 2m05s",
                             "converting the GGUF tokenizer of y ..."]


def test_disabled_progress_prints_nothing_and_records_go_to_stdout(capsys) -> None:
    progress = Progress("train", enabled=False).start(total=4)
    progress.advance(4)
    progress.log("a line")  # records still print when the bar is off (tests pass show_progress=False)
    progress.stop()
    out = capsys.readouterr()
    assert out.out == "a line\n" and out.err == ""


def test_countdown_shows_n_of_n_and_the_overall_eta_from_the_mean_item(capsys) -> None:
    clock = Clock()
    countdown = Countdown("trial", 4, clock=clock)
    countdown.next("trial-000: lr=0.001")
    clock.now += 60
    countdown.next("trial-001")
    clock.now += 120  # mean 90 s per trial, 2 left
    countdown.next()
    clock.now += 90
    countdown.next()
    clock.now += 30
    countdown.finish()
    assert lines(capsys) == [
        "[trial 1/4] trial-000: lr=0.001  elapsed 0s  overall eta n/a",
        "[trial 2/4] trial-001  elapsed 1m00s  overall eta 3m00s",
        "[trial 3/4]  elapsed 3m00s  overall eta 3m00s",
        "[trial 4/4]  elapsed 4m30s  overall eta 1m30s",
        "[trials] 4/4 in 5m00s",
    ]


def test_loading_phases_name_the_model_load_and_the_gguf_conversion(capsys, tmp_path, monkeypatch) -> None:
    class AutoTokenizer:
        pass

    class AutoModelForCausalLM:
        pass

    class AutoConfig:
        pass

    cfg = ModelConfig(source="gguf:gemma-3-270m")
    for loader_class in (AutoTokenizer, AutoModelForCausalLM, AutoConfig):
        with loader._loading_phase(loader_class, cfg):
            pass
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    def convert(path: Path, out: Path) -> None:
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("{}")

    gguf.converted(tmp_path / "m.gguf", convert)
    gguf.converted(tmp_path / "m.gguf", convert)  # cached: silent
    starts = [line for line in lines(capsys) if line.endswith("...")]
    assert starts == ["loading the model gguf:gemma-3-270m ...",  # configs and tokenizers load in a blink
                      f"converting m.gguf once (tokenizer + dequantised weights) into {tmp_path / 'cache' / 'gguf'} ..."]

"""`peftlab doctor`: what the loss sees, lengths, one forward+backward, memory; non-zero exit when something is wrong."""

from __future__ import annotations

import re


def test_doctor_on_the_cpu_twin_is_healthy(cli_out):
    code, lines = cli_out("doctor", "tiny-gemma2-dolly")
    assert code == 0, "\n".join(lines)
    text = "\n".join(lines)
    masked = re.search(r"example: (\d+) prompt tokens masked \(-100\), (\d+) tokens trained", text)
    assert masked and int(masked[1]) > 0 and int(masked[2]) > 0
    assert any(line.startswith("  masked  | ### Instruction:") for line in lines)
    assert any(line.startswith("  TRAINED | ") for line in lines)
    assert re.search(r"truncated \d+/400", text)
    assert re.search(r"forward: loss \d+\.\d+ is finite and > 0", text)
    assert re.search(r"memory estimate at batch \d+ x 768 tokens: ~\d+\.\d+ GiB", text)
    assert not any(line.startswith("FAIL") for line in lines)
    assert lines[-1] == "doctor: healthy"


def test_doctor_fails_a_recipe_that_truncates_heavily(cli_out):
    code, lines = cli_out("doctor", "tiny-gemma2-dolly", "--set", "data.max_length=64", "--set", "data.max_samples=100")
    assert code != 0
    fails = [line for line in lines if line.startswith("FAIL")]
    assert any("truncated: raise data.max_length" in line for line in fails)
    assert any("fully masked" in line or "every label masked" in line for line in fails)
    assert re.fullmatch(r"doctor found \d+ problem\(s\)", lines[-1])

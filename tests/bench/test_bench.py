"""`agora bench serve`: metric arithmetic, workloads, and a run against a real server."""

from __future__ import annotations

import json

import pytest

from agora.bench import workloads
from agora.bench.serve import RequestResult, compute_metrics, parse_goodput
from agora.cli import main as agora_main
from tests.server.conftest import MODEL, start_server, stop_server


def result(ttft: float, e2e: float, out: int, prompt: int = 10, turn: int = 0, itl: list[float] | None = None):
    return RequestResult(True, 0.0, ttft=ttft, e2e=e2e, output_tokens=out, prompt_tokens=prompt, turn=turn,
                         itl=itl or [])  # fmt: skip


def test_metrics_arithmetic_goodput_and_errors():
    results = [
        result(0.1, 1.1, 11, itl=[0.1] * 10),  # tpot 0.1
        result(0.3, 0.7, 5, turn=1, itl=[0.1] * 4),  # tpot 0.1
        RequestResult(False, 0.0, error="HTTP 400: too long"),
    ]
    m = compute_metrics(results, duration=2.0, slos=parse_goodput(["ttft:200", "tpot:150"]))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["errors"] == {"HTTP 400": 1} and "too long" in m["first_error"]
    assert m["output_tokens"] == 16 and m["input_tokens"] == 20
    assert m["output_throughput"] == pytest.approx(8.0)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(280.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["ttft_later_turns_ms"]["median"] == pytest.approx(300.0)
    # Only the first request meets TTFT <= 200 ms (and TPOT <= 150 ms); failures count against the fraction.
    assert m["goodput"]["requests_per_s"] == pytest.approx(0.5)
    assert m["goodput"]["fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [["ttft"], ["speed:5"], ["tpot:"]])
def test_bad_goodput_spec(bad):
    with pytest.raises(ValueError):
        parse_goodput(bad)


def test_ranges_and_workloads_are_deterministic():
    assert workloads.parse_range("64") == (64, 64)
    assert workloads.parse_range("8:16") == (8, 16)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(ValueError):
            workloads.parse_range(bad)
    a = list(workloads.random_workload(5, (4, 8), (2, 3), seed=1))
    b = list(workloads.random_workload(5, (4, 8), (2, 3), seed=1))
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert all(4 <= len(x.prompt.split()) <= 8 and 2 <= x.max_tokens <= 3 for x in a)
    shared = list(workloads.shared_prefix_workload(6, 3, 50, (5, 5), (4, 4), seed=0))
    assert shared[0].messages[0] == shared[3].messages[0] != shared[1].messages[0]


def test_agent_sessions_resend_the_growing_history():
    [s] = workloads.agent_sessions(1, 3, system_len=20, task_len=5, tool_result_len=7, output_len=4, seed=0)
    first = s.request(0)
    s.advance("ok, calling the tool", 0)
    second = s.request(1)
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[-2] == {"role": "assistant", "content": "ok, calling the tool"}
    assert second.messages[-1]["content"].startswith("Tool result: ")
    assert second.turn == 1 and second.session == 0


def test_agent_output_lengths_drawn_per_turn_from_a_range():
    [s] = workloads.agent_sessions(1, 40, system_len=5, task_len=5, tool_result_len=3, output_len=(16, 80), seed=0)
    lens = [s.request(t).max_tokens for t in range(40)]
    assert min(lens) >= 16 and max(lens) <= 80 and len(set(lens)) > 10


@pytest.mark.parametrize("workload", ["random", "shared-prefix", "agent", "agent-repeat"])
def test_each_concurrency_level_sends_prompts_of_its_own(workload, monkeypatch):
    """A sweep's later level must not find the earlier level's prompts in the prefix cache, nor (greedy) their
    answers in the suffix decoder's cache of recent outputs: each level draws its own prompts."""
    from agora.bench import cli, serve

    sent: list[tuple[str, int]] = []  # (what a request carries, when its level started)
    levels_started: list[int] = []

    async def fake_send(client, cfg, spec):
        body = spec.prompt if spec.messages is None else json.dumps(spec.messages[:2])  # an agent's first turn
        sent.append((body, len(levels_started)))
        return RequestResult(True, 0.0, ttft=0.01, e2e=0.02, output_tokens=2, prompt_tokens=5, text="done")

    real_compute = serve.compute_metrics

    def counting_metrics(*a, **k):
        levels_started.append(1)
        return real_compute(*a, **k)

    monkeypatch.setattr(serve, "send", fake_send)
    monkeypatch.setattr(cli, "send", fake_send)
    monkeypatch.setattr(cli, "compute_metrics", counting_metrics)
    assert run_cli("--base-url", "http://127.0.0.1:9", "--model", MODEL, "--workload", workload, "--num-prompts", "4",
                   "--concurrency", "1,2,2", "--turns", "2", "--warmup", "0") == 0  # fmt: skip
    per_level = [{body for body, level in sent if level == i} for i in range(3)]
    assert all(per_level)
    assert not per_level[0] & per_level[1] and not per_level[1] & per_level[2] and not per_level[0] & per_level[2]
    # the first level is what the seed always gave: results of one level stay comparable with earlier runs
    first = {b for b, level in sent if level == 0}
    sent.clear()
    levels_started.clear()
    assert run_cli("--base-url", "http://127.0.0.1:9", "--model", MODEL, "--workload", workload, "--num-prompts", "4",
                   "--concurrency", "1", "--turns", "2", "--warmup", "0") == 0  # fmt: skip
    assert {b for b, _ in sent} == first


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    r = start_server(tiny_model_dir)
    yield r
    stop_server(r)


def run_cli(*argv: str) -> int:
    return agora_main(["bench", "serve", *argv])


def test_bench_against_a_real_server(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = run_cli("--base-url", server.url, "--model", MODEL, "--workload", "random", "--num-prompts", "6",
                 "--input-len", "5:20", "--output-len", "8", "--ignore-eos", "--concurrency", "1,3",
                 "--goodput", "ttft:10000", "--result-json", str(out), "--plot-dir", str(tmp_path),
                 "--report", str(tmp_path / "report.html"), "--api-key", "sk-never-in-the-report")  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Output token throughput" in printed and "Median TTFT" in printed
    data = json.loads(out.read_text())
    assert [r["concurrency"] for r in data["runs"]] == [1, 3]
    for run in data["runs"]:
        m = run["metrics"]
        assert m["completed"] == 6 and m["failed"] == 0
        assert m["output_tokens"] == 6 * 8  # from the server's usage, with ignore_eos
        assert m["goodput"]["fraction"] == 1.0
        assert len(run["samples"]["ttft_s"]) == 6
    assert (tmp_path / "latency_distributions.png").stat().st_size > 1000
    assert (tmp_path / "throughput_vs_concurrency.png").stat().st_size > 1000
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "sk-never-in-the-report" not in page
    for run in data["runs"]:  # the table holds the very numbers of the JSON result
        assert f"<th>{run['label']}</th>" in page
        assert f"<td>{run['metrics']['output_throughput']:.2f}</td>" in page
        assert f"<td>{run['metrics']['ttft_ms']['p99']:.2f}</td>" in page
    assert "<script" not in page and "http" not in page.replace(server.url, "")  # one file, nothing to fetch


def test_agent_and_shared_prefix_workloads(server, tmp_path):
    out = tmp_path / "a.json"
    assert run_cli("--base-url", server.url, "--model", MODEL, "--workload", "agent", "--concurrency", "2",
                   "--turns", "3", "--output-len", "4", "--system-prompt-len", "30", "--tool-result-len", "10",
                   "--ignore-eos", "--warmup", "0", "--result-json", str(out)) == 0  # fmt: skip
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert m["completed"] == 6 and "ttft_later_turns_ms" in m
    assert run_cli("--base-url", server.url, "--model", MODEL, "--workload", "shared-prefix", "--num-prompts", "4",
                   "--prefix-len", "40", "--input-len", "5", "--output-len", "3", "--warmup", "0") == 0  # fmt: skip


def test_errors_are_counted_and_shown(server, tmp_path, capsys):
    out = tmp_path / "e.json"
    # 600 new tokens cannot fit the tiny model's 512-token context: every request is refused.
    rc = run_cli("--base-url", server.url, "--model", MODEL, "--num-prompts", "3", "--input-len", "5",
                 "--output-len", "600", "--warmup", "0", "--result-json", str(out))  # fmt: skip
    assert rc == 1
    assert "Failed requests:" in capsys.readouterr().out
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert m["failed"] == 3 and m["errors"] == {"HTTP 400": 3}


def test_unreachable_server_fails_fast_with_a_message(capsys):
    rc = run_cli("--base-url", "http://127.0.0.1:9", "--model", "x", "--num-prompts", "1", "--timeout", "5")
    assert rc == 1
    assert "warm-up request failed" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert run_cli("--model", "x", "--output-len", "0") == 2
    assert run_cli("--model", "x", "--goodput", "speed:3") == 2


def test_agent_repeat_sessions_ask_for_copies_and_cap_each_turn_by_what_it_copies():
    [s] = workloads.repeat_sessions(1, 4, 768, seed=0)
    first = s.request(0)
    assert "```python" in first.messages[-1]["content"] and "Rename" in first.messages[-1]["content"]
    code = first.messages[-1]["content"].split("```python\n")[1].split("```")[0]
    assert first.max_tokens == len(code) // 3 + 32 < 768
    s.advance("the file", 0)
    second = s.request(1)
    assert second.messages[-2] == {"role": "assistant", "content": "the file"}
    assert "Quote the tool result above exactly" in second.messages[-1]["content"]
    assert [workloads.repeat_sessions(2, 4, 768, seed=0)[i].messages for i in range(2)] == [
        workloads.repeat_sessions(2, 4, 768, seed=0)[i].messages for i in range(2)
    ]
    assert workloads.repeat_sessions(1, 4, 64, seed=0)[0].request(0).max_tokens == 64

"""Graders against scores worked out by hand: string_check, text_similarity, code_output, multi, judge.

The sandbox itself (python graders, hostile code) is tested in test_grader_sandbox.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from trainer_core.config import GRPOStage
from trainer_core.grader_config import Grader, ScoreModelGrader, unavailable_metric_reason
from trainer_core.graders.formula import evaluate_formula
from trainer_core.graders.judge import Judge, JudgeUnavailable, parse_score
from trainer_core.graders.scoring import GraderRuntime, build_grader, outputs_match
from trainer_core.graders.templates import GradingError, make_sample, render

GRADER = TypeAdapter(Grader)


def grade(spec: dict[str, Any], texts: list[str], items: list[dict[str, Any]], **runtime: Any):
    return build_grader(GRADER.validate_python(spec), GraderRuntime(**runtime))(texts, items)


def test_templates_read_item_fields_and_the_sample() -> None:
    sample = make_sample('{"answer": 42, "why": "six times seven"}')
    item = {"answer": "42", "meta": {"lang": "en"}, "n": 3}
    assert render("{{ item.answer }}/{{item.meta.lang}}/{{item.n}}", sample, item) == "42/en/3"
    both = "{{sample.output_json.answer}} {{sample.output_json.why}}"
    assert render(both, sample, item) == "42 six times seven"
    assert render("{{sample.output_text}}", sample, item) == '{"answer": 42, "why": "six times seven"}'
    with pytest.raises(GradingError, match="item.missing"):
        render("{{item.missing}}", sample, item)
    with pytest.raises(GradingError, match="not valid JSON"):
        render("{{sample.output_json.x}}", make_sample("plain text"), item)


@pytest.mark.parametrize("operation, expected", [
    # input, reference pairs: ("Paris", "Paris"), ("The answer is Paris", "Paris"), ("paris", "Paris")
    ("eq", [1.0, 0.0, 0.0]),
    ("ne", [0.0, 1.0, 1.0]),
    ("like", [1.0, 1.0, 0.0]),
    ("ilike", [1.0, 1.0, 1.0]),
])
def test_string_check_operations(operation: str, expected: list[float]) -> None:
    spec = {"type": "string_check", "name": "city", "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}", "operation": operation}
    scores = grade(spec, ["Paris", "The answer is Paris", "paris"], [{"answer": "Paris"}] * 3)
    assert scores.totals == expected
    assert scores.metrics()["rewards/city"] == pytest.approx(sum(expected) / 3)
    assert scores.metrics()["rewards/city/errors"] == 0


def test_string_check_missing_field_scores_zero_and_is_counted() -> None:
    spec = {"type": "string_check", "name": "s", "reference": "{{item.answer}}"}
    scores = grade(spec, ["x", "y"], [{"answer": "x"}, {}])
    assert scores.totals == [1.0, 0.0]
    assert scores.errors == {"s": 1}
    assert "item.answer" in scores.messages[0]


@pytest.mark.parametrize("metric, expected", [
    # "the cat sat on the mat" vs reference "the cat sat on a mat", worked by hand:
    # fuzzy: 22 + 20 characters, longest common subsequence 19 -> 2*19/42.
    ("fuzzy_match", 38 / 42),
    # rouge_1: 5 of 6 unigrams shared both ways (one "the" is unmatched) -> F = 5/6.
    ("rouge_1", 5 / 6),
    # rouge_2: the-cat, cat-sat, sat-on shared of 5 bigrams each -> 3/5.
    ("rouge_2", 3 / 5),
    # rouge_3: the-cat-sat, cat-sat-on of 4 trigrams each -> 2/4.
    ("rouge_3", 2 / 4),
    # rouge_l: longest common subsequence "the cat sat on mat" = 5 tokens of 6 -> 5/6.
    ("rouge_l", 5 / 6),
    # gleu: matched 1..4-grams 5+3+2+1 = 11 of 6+5+4+3 = 18 on both sides -> 11/18.
    ("gleu", 11 / 18),
])
def test_text_similarity_metrics(metric: str, expected: float) -> None:
    spec = {"type": "text_similarity", "name": "sim", "reference": "{{item.ref}}",
            "evaluation_metric": metric}
    scores = grade(spec, ["the cat sat on the mat"], [{"ref": "the cat sat on a mat"}])
    assert scores.totals[0] == pytest.approx(expected)


def test_bleu_by_hand() -> None:
    # Identical 4-token sentences: every n-gram precision is 1 and no brevity penalty -> 1.
    # Disjoint sentences: 0. "a b c d" vs "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> sacrebleu's
    # default 'exp' smoothing gives p4 = 1 / (2 * 1) -> BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4).
    spec = {"type": "text_similarity", "name": "b", "reference": "{{item.ref}}", "evaluation_metric": "bleu"}
    scores = grade(spec, ["a b c d", "w x y z", "a b c d"], [{"ref": "a b c d"}, {"ref": "a b c d"},
                                                             {"ref": "a b c e"}])
    assert scores.totals[0] == pytest.approx(1.0)
    assert scores.totals[1] == pytest.approx(0.0)
    assert scores.totals[2] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)


def test_unavailable_metric_is_refused_at_validation() -> None:
    reason = unavailable_metric_reason("meteor")
    spec = {"type": "text_similarity", "reference": "x", "evaluation_metric": "meteor"}
    if reason is None:
        GRADER.validate_python(spec)
    else:
        with pytest.raises(ValidationError, match="meteor"):
            GRADER.validate_python(spec)


@pytest.mark.parametrize("formula, scores, expected", [
    ("0.7 * a + 0.3 * b", {"a": 1.0, "b": 0.5}, 0.85),
    ("(a + b) / 2", {"a": 1.0, "b": 0.0}, 0.5),
    ("a ^ 2 - b", {"a": 3.0, "b": 1.0}, 8.0),
    ("max(a, b) * min(a, b)", {"a": 0.5, "b": 0.25}, 0.125),
    ("sqrt(a) + abs(b - 1) + floor(2.7) + ceil(0.2)", {"a": 4.0, "b": 0.5}, 5.5),
    ("exp(0) + log(1)", {"a": 0.0}, 1.0),
    ("1 if a >= 0.5 else b", {"a": 0.4, "b": 0.25}, 0.25),
])
def test_multi_formulas(formula: str, scores: dict[str, float], expected: float) -> None:
    assert evaluate_formula(formula, scores) == pytest.approx(expected)


@pytest.mark.parametrize("formula, message", [
    ("__import__('os').system('true')", "only numbers"),
    ("__import__(a)", "not one of the graders"),
    ("a.__class__", "Attribute"),
    ("'x' * 10", "only numbers"),
    ("[a, b][0]", "not available"),
    ("c + 1", "'c'"),
    ("a +", "does not parse"),
])
def test_multi_refuses_unsafe_or_wrong_formulas(formula: str, message: str) -> None:
    spec = {"type": "multi", "calculate_output": formula, "graders": {
        "a": {"type": "string_check", "reference": "x"}, "b": {"type": "string_check", "reference": "y"}}}
    with pytest.raises(ValidationError, match=message):
        GRADER.validate_python(spec)


def test_multi_grader_combines_sub_graders_by_name() -> None:
    spec = {"type": "multi", "name": "total", "calculate_output": "0.75 * exact + 0.25 * close",
            "graders": {
                "exact": {"type": "string_check", "reference": "{{item.answer}}", "operation": "eq"},
                "close": {"type": "text_similarity", "reference": "{{item.answer}}",
                          "evaluation_metric": "rouge_1"},
            }}
    # "blue sky" vs "blue sky": 0.75 + 0.25; "blue" vs "blue sky": rouge_1 P=1 R=1/2 F=2/3 -> 0.25 * 2/3.
    scores = grade(spec, ["blue sky", "blue"], [{"answer": "blue sky"}] * 2)
    assert scores.totals == pytest.approx([1.0, 0.25 * 2 / 3])
    assert scores.components["exact"] == [1.0, 0.0]
    assert scores.metrics()["rewards/total"] == pytest.approx((1.0 + 0.25 * 2 / 3) / 2)


def test_multi_formula_error_scores_zero_and_is_counted() -> None:
    spec = {"type": "multi", "name": "m", "calculate_output": "log(a)",
            "graders": {"a": {"type": "string_check", "reference": "x"}}}
    scores = grade(spec, ["x", "y"], [{}, {}])  # log(1) = 0; log(0) is a math domain error
    assert scores.totals == [0.0, 0.0]
    assert scores.errors["m"] == 1


@pytest.mark.parametrize("stdout, predicted, exact, normalized", [
    ("4\n", "4", True, True),
    ("a  b\nc\n", "a b c", False, True),
    ("a b\n", " a b", False, True),
    ("4\n", "5", False, False),
])
def test_code_output_comparisons(stdout: str, predicted: str, exact: bool, normalized: bool) -> None:
    assert outputs_match(stdout, predicted, "exact") is exact
    assert outputs_match(stdout, predicted, "normalized") is normalized


def test_grader_errors_name_the_json_path() -> None:
    with pytest.raises(ValidationError) as info:
        GRPOStage.model_validate({"method": "grpo", "datasets": [{"id": "d"}], "batch_size": 8, "reward": {
            "type": "multi", "calculate_output": "a",
            "graders": {"a": {"type": "string_check", "reference": "{{item}}"}}}})
    assert "reward.multi.graders.a.string_check.reference" in str(info.value)
    with pytest.raises(ValidationError, match="grade"):
        GRADER.validate_python({"type": "python", "source": "def score(sample, item):\n    return 1\n"})


def test_stage_reward_accepts_the_old_form_and_graders() -> None:
    base = {"method": "grpo", "datasets": [{"id": "d"}], "batch_size": 8}
    assert GRPOStage.model_validate({**base, "reward": {"type": "exact_match"}}).reward.type == "exact_match"
    stage = GRPOStage.model_validate({**base, "reward": {"type": "string_check", "name": "x",
                                                        "reference": "{{item.answer}}"}})
    assert stage.reward.type == "string_check"
    assert GRPOStage.model_validate(stage.model_dump(mode="json")) == stage


def test_grader_config_does_not_import_torch() -> None:
    code = ("import sys, trainer_core.config, trainer_core.graders.scoring; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- score_model


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that fails ``fail_first`` requests with 503, then says a score."""

    fail_first = 0
    calls: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).calls.append({"body": body, "auth": self.headers.get("Authorization")})
            failing = len(type(self).calls) <= type(self).fail_first
        if failing:
            self.send_response(503)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        reply = "no idea" if "???" in text else f"Score: {0.25 * len(text.split())}"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[tuple[str, type[_Judge]]]:
    handler = type("Judge", (_Judge,), {"calls": [], "fail_first": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    server.shutdown()


def _judge_spec(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "score_model", "name": "judge", "model": "tiny", "base_url": base_url,
            "input": [{"role": "system", "content": "Rate the answer to {{item.q}}."},
                      {"role": "user", "content": "{{sample.output_text}}"}],
            "range": [0, 1], "sampling_params": {"temperature": 0, "max_completions_tokens": 8}, **extra}


def test_score_model_scores_by_the_judges_last_number_clamped(judge_server, monkeypatch) -> None:
    url, handler = judge_server
    spec = _judge_spec(url, api_key_env="JUDGE_KEY")
    # Replies: 0.25 per word; "a b c d e" -> 1.25 clamped to 1; "???" -> no number -> error.
    scores = grade(spec, ["a", "a b", "a b c d e", "???"], [{"q": "2+2"}] * 4, secrets={"JUDGE_KEY": "sk-1"})
    assert scores.totals == [0.25, 0.5, 1.0, 0.0]
    assert scores.errors == {"judge": 1}
    first = handler.calls[0]
    assert first["auth"] == "Bearer sk-1"
    assert first["body"]["messages"][0]["content"] == "Rate the answer to 2+2."
    assert first["body"]["max_tokens"] == 8 and first["body"]["temperature"] == 0


def test_score_model_retries_then_succeeds(judge_server) -> None:
    url, handler = judge_server
    handler.fail_first = 2
    judge = Judge(ScoreModelGrader.model_validate(_judge_spec(url, max_retries=3)), url, None,
                  backoff_seconds=0.01)
    assert judge.score([make_sample("a b")], [{"q": "x"}]) == [0.5]
    assert len(handler.calls) == 3


def test_score_model_that_stays_down_fails_clearly(judge_server) -> None:
    url, handler = judge_server
    handler.fail_first = 100
    judge = Judge(ScoreModelGrader.model_validate(_judge_spec(url, max_retries=2)), url, None,
                  backoff_seconds=0.01)
    with pytest.raises(JudgeUnavailable, match="failed after 3 attempts: HTTP 503"):
        judge.score([make_sample("a"), make_sample("b")], [{"q": "x"}] * 2)


def test_score_model_sends_concurrently_within_the_bound(judge_server) -> None:
    url, handler = judge_server
    spec = _judge_spec(url, max_concurrency=4)
    scores = grade(spec, ["a"] * 16, [{"q": "x"}] * 16)
    assert scores.totals == [0.25] * 16 and len(handler.calls) == 16


def test_parse_score() -> None:
    assert parse_score("I'd give it 7/10, so 0.7", 0, 1) == 0.7
    assert parse_score("-3", -1, 1) == -1
    with pytest.raises(GradingError):
        parse_score("great answer", 0, 1)

"""Hypothesis strategies for hostile run specs and eval requests (issue 13's fuzz).

Each strategy starts from a request that could be valid and mutates its fields with what an
attacker or a buggy client sends: NUL and control characters, non-finite and huge numbers, huge
integers, wrong types, huge lists. Bodies are serialised with Python's json (allow_nan), so
`Infinity`/`NaN` reach the API as the literals a JSON parser accepts.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from("\x00\n\r\t\x1b\u2028\ufeffa/._:-"), min_size=1, max_size=12),
    st.just("x" * 5000),
)
HOSTILE_NUMBER = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, 1e308, -0.0, 1e-320]),
)
ANY_VALUE = st.one_of(HOSTILE_NUMBER, HOSTILE_TEXT, st.booleans(), st.none(),
                      st.lists(st.integers(), max_size=3))

METHODS = ("sft", "dpo", "grpo", "ppo", "sad")
STAGE_FIELDS = (
    "epochs", "max_steps", "learning_rate", "batch_size", "gradient_accumulation", "max_seq_len",
    "warmup_steps", "weight_decay", "max_grad_norm", "eval_every_steps", "eval_fraction", "beta",
    "num_generations", "max_new_tokens", "temperature", "top_p", "alpha", "ppo_epochs", "vf_coef",
    "label_smoothing", "epsilon_high",
)
RUN_FIELDS = ("seed", "checkpoint_every_steps", "keep_checkpoints", "name", "base_model")


@st.composite
def run_specs(draw: st.DrawFn, datasets: dict[str, str]) -> str:
    """Returns the JSON body of a run spec: a plausible stage with a few hostile fields."""
    method = draw(st.sampled_from(METHODS))
    stage: dict[str, Any] = {"method": method, "datasets": [{"id": datasets[method]}], "max_steps": 2}
    for name in draw(st.lists(st.sampled_from(STAGE_FIELDS), max_size=3, unique=True)):
        stage[name] = draw(HOSTILE_NUMBER)
    if draw(st.booleans()):
        stage["datasets"] = [{"id": draw(st.one_of(HOSTILE_TEXT, st.just(datasets[method]))),
                              "weight": draw(HOSTILE_NUMBER)}] * draw(st.sampled_from([1, 2, 65, 5000]))
    if method in ("grpo", "ppo") and draw(st.booleans()):
        stage["reward"] = {"type": "regex", "pattern": draw(HOSTILE_TEXT), "weight": draw(HOSTILE_NUMBER)}
    spec: dict[str, Any] = {"base_model": "tiny-llama", "stages": [stage]}
    for name in draw(st.lists(st.sampled_from(RUN_FIELDS), max_size=2, unique=True)):
        spec[name] = draw(st.one_of(HOSTILE_NUMBER, HOSTILE_TEXT))
    if draw(st.booleans()):
        spec["adapter"] = {"type": "lora", "r": draw(HOSTILE_NUMBER), "alpha": draw(HOSTILE_NUMBER),
                           "target_modules": draw(st.one_of(st.just("all-linear"),
                                                            st.lists(HOSTILE_TEXT, max_size=3)))}
    if draw(st.booleans()):
        spec["stages"] = spec["stages"] * draw(st.sampled_from([2, 17, 1000]))
    return json.dumps(spec)


@st.composite
def eval_requests(draw: st.DrawFn, dataset_id: str) -> str:
    """Returns the JSON body of an eval request with hostile ids, numbers and lists."""
    body: dict[str, Any] = {
        "models": draw(st.one_of(st.just(["tiny-llama"]), st.lists(HOSTILE_TEXT, max_size=10))),
        "dataset_id": draw(st.one_of(st.just(dataset_id), HOSTILE_TEXT)),
        "metrics": draw(st.one_of(st.just(["loss"]), st.lists(HOSTILE_TEXT, max_size=20))),
    }
    names = st.sampled_from(["max_tokens", "temperature", "top_p", "seed", "n", "stop"])
    generation = {name: draw(ANY_VALUE) for name in draw(st.lists(names, max_size=3, unique=True))}
    if generation:
        body["generation"] = generation
    for name in draw(st.lists(st.sampled_from(["max_examples", "num_samples", "name"]), max_size=2,
                              unique=True)):
        body[name] = draw(ANY_VALUE)
    return json.dumps(body)

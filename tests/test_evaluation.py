"""The lmms-eval adapter end to end, offline: a local task (YAML + parquet rows written here) run by `lmms-eval --model
llava_multilayer` (and once by `llava-multilayer evaluate`) on converted tiny checkpoints.

The predictions must equal the model's own `generate` on prompts built here from the chat template, and the
`loglikelihood` values the log-probabilities summed here from the model's logits. For IGVA the instruction must reach
the aggregator: two questions on one image get different fusion weights, and the scores equal those computed with
each document's own question as the instruction, not with another one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch


pytest.importorskip(
    "lmms_eval", reason='lmms-eval is not installed: `pip install "llava-multilayer[eval]"` runs these tests'
)

from converted_fixtures import converted_dir  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402


MAX_NEW_TOKENS = 5
#: The adapter's load settings; `_load` loads the reference model with the same ones.
MODEL_ARGS = "device=cpu,dtype=float32"
#: question, answer, image indices (the last document has two images); 0 and 1 share their image.
ROWS = [
    ("What color is the square?", "red", [0]),
    ("How many objects are on the left side?", "two", [0]),
    ("Is there a circle?", "yes", [1]),
    ("Which of the two images is brighter?", "the first", [1, 0]),
]

TASK_UTILS = """
import ast

def doc_to_visual(doc):
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"match": float(results[0].strip() == doc["answer"])}


def loglikelihood_results(doc, results):
    # lmms-eval 0.7.3 logs the adapter's (log-probability, is-greedy) pair as its str()
    return {"log_probability": float(ast.literal_eval(results[0])[0])}
"""


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(36 + 6 * i, 44, 3) * 255).astype("uint8")) for i in range(2)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two lmms-eval tasks over the same local parquet file: `mllocal_generate` (greedy answers) and
    `mllocal_loglikelihood` (log-probability of the answer)."""
    import datasets

    root = tmp_path_factory.mktemp("lmms_eval_tasks")
    images = _images()
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    rows = {
        "images": [[images[i] for i in indices] for _, _, indices in ROWS],
        "question": [question for question, _, _ in ROWS],
        "answer": [answer for _, answer, _ in ROWS],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "test.parquet"))
    (root / "utils.py").write_text(TASK_UTILS)
    common = f"""\
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {root / "test.parquet"}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        """
    (root / "mllocal_generate.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent(f"""\
        task: mllocal_generate
        output_type: generate_until
        generation_kwargs:
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: match
            aggregation: mean
            higher_is_better: true
        """)
    )
    (root / "mllocal_loglikelihood.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent("""\
        task: mllocal_loglikelihood
        output_type: loglikelihood
        process_results: !function utils.loglikelihood_results
        metric_list:
          - metric: log_probability
            aggregation: mean
            higher_is_better: true
        """)
    )
    return root


def _environment(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }


TASKS = "mllocal_generate,mllocal_loglikelihood"


def _evaluate(command: list[str], output: Path, tmp_path: Path) -> dict[str, dict[int, list]]:
    """Runs the evaluation command (which writes its results and samples under `output`); returns task -> doc id ->
    the raw responses lmms-eval logged."""
    result = subprocess.run(
        command, env=_environment(tmp_path), capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    # lmms-eval 0.7.3 exits with status 0 after an error too: the result files are the proof that it ran.
    log = f"{command} (status {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0 and list(output.rglob("*_results.json")), log
    responses = {}
    for task in ("mllocal_generate", "mllocal_loglikelihood"):
        (samples,) = output.rglob(f"*_samples_{task}.jsonl")
        lines = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        responses[task] = {line["doc_id"]: line["filtered_resps"] for line in lines}
    (results_file,) = output.rglob("*_results.json")
    assert set(json.loads(results_file.read_text())["results"]) == {"mllocal_generate", "mllocal_loglikelihood"}
    return responses


def _reference(model, processor, question: str, images, instruction: str | None, answer: str | None = None):
    """The inputs the model's own API builds for one document (chat template, one `<image>` per image)."""
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs = {"instructions": [instruction]} if instruction is not None else {}
    text = prompt if answer is None else f"{prompt} {answer}"
    return processor(images=images, text=text, return_tensors="pt", **kwargs), prompt


def _direct_loglikelihood(model, processor, question, images, answer, instruction) -> tuple[float, bool]:
    full, prompt = _reference(model, processor, question, images, instruction, answer)
    prompt_length = len(processor(images=images, text=prompt, **_kw(instruction))["input_ids"][0])
    with torch.no_grad():
        logits = model(**full).logits[0]
    targets = full["input_ids"][0, prompt_length:]
    log_probs = torch.log_softmax(logits[prompt_length - 1 : -1], dim=-1)
    total = log_probs.gather(-1, targets[:, None]).sum().item()
    return total, bool((log_probs.argmax(-1) == targets).all())


def _load(model_dir):
    """The model as the adapter loads it with MODEL_ARGS (float32 on the CPU, default attention)."""
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu").eval()


def _kw(instruction):
    return {"instructions": [instruction]} if instruction is not None else {}


def _check(name: str, responses: dict, igva: bool):
    model_dir = converted_dir(name)
    model = _load(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    images = _images()
    for doc_id, (question, answer, indices) in enumerate(ROWS):
        doc_images = [images[i] for i in indices]
        instruction = question if igva else None
        inputs, _ = _reference(model, processor, question, doc_images, instruction)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert responses["mllocal_generate"][doc_id] == expected.strip(), (name, doc_id)  # lmms-eval strips answers

        logged = ast.literal_eval(responses["mllocal_loglikelihood"][doc_id])  # see loglikelihood_results
        total, is_greedy = _direct_loglikelihood(model, processor, question, doc_images, answer, instruction)
        assert abs(float(logged[0]) - total) <= 1e-4, (name, doc_id, logged, total)
        assert total < 0 and logged[1] == is_greedy, (name, doc_id, logged, is_greedy)
        if igva and doc_id < 2:  # the two questions on the same image: each other's instruction scores differently
            other = ROWS[1 - doc_id][0]
            wrong, _ = _direct_loglikelihood(model, processor, question, doc_images, answer, other)
            assert abs(wrong - total) > 1e-4, (
                f"the instruction does not change the score of doc {doc_id}",
                wrong,
                total,
            )
    if igva:
        weights = [
            model(**_reference(model, processor, question, [images[0]], question)[0]).fusion_weights
            for question, _, _ in ROWS[:2]
        ]
        assert not torch.allclose(weights[0], weights[1], atol=1e-4), weights


@pytest.mark.parametrize(
    "name",
    ["lsf-E_D-clip-3-18-23", "lsf-I_M-clip-3-18-23", "igva-clip"],
)
def test_lmms_eval_matches_the_model(name, task_dir, tmp_path):
    output = tmp_path / "results"
    command = [
        str(Path(sys.executable).parent / "lmms-eval"),
        "--model",
        "llava_multilayer",
        "--model_args",
        f"pretrained={converted_dir(name)},{MODEL_ARGS}",
        "--include_path",
        str(task_dir),
        "--tasks",
        TASKS,
        "--batch_size",
        "2",  # pads the shorter document of each batch on the left
        "--output_path",
        str(output),
        "--log_samples",
    ]
    _check(name, _evaluate(command, output, tmp_path), igva=name.startswith("igva"))


def test_evaluate_command_runs_lmms_eval(task_dir, tmp_path):
    """`llava-multilayer evaluate` forwards to lmms-eval with the adapter and the checkpoint."""
    name = "lsf-I_M-clip-3-18-23"
    output = tmp_path / "results"
    command = [str(Path(sys.executable).parent / "llava-multilayer"), "evaluate", str(converted_dir(name))]
    command += ["--tasks", TASKS, "--batch-size", "2", "--output-path", str(output), "--model-args", MODEL_ARGS]
    command += ["--log-samples", "--include-path", str(task_dir)]
    _check(name, _evaluate(command, output, tmp_path), igva=False)


@pytest.mark.parametrize("name", ["lsf-I_M-clip-3-18-23", "igva-clip"])
def test_loglikelihood_does_not_depend_on_padding(name):
    """A document scores the same alone and left-padded in a batch: the positions count from its first token (I_M's
    cross-attention lets each text position see only the visual tokens up to it)."""
    from llava_multilayer.evaluation.lmms_eval_model import LlavaMultiLayerLmms

    adapter = LlavaMultiLayerLmms(pretrained=str(converted_dir(name)), device="cpu", dtype="float32")
    images = _images()
    docs = [{"images": [images[i] for i in indices]} for _, _, indices in ROWS]
    adapter._doc = lambda task, split, doc_id: docs[doc_id]
    requests = [
        (question, f" {answer}", lambda doc: doc["images"], doc_id, "mllocal_loglikelihood", "test")
        for doc_id, (question, answer, _) in enumerate(ROWS[:2])
    ]
    lengths = [len(adapter.tokenizer(question)["input_ids"]) for question, _, _ in ROWS[:2]]
    assert lengths[0] != lengths[1], "the batch must pad one of its rows"
    alone = [adapter._loglikelihood_batch([request])[0] for request in requests]
    batched = adapter._loglikelihood_batch(requests)
    for (alone_value, alone_greedy), (batched_value, batched_greedy) in zip(alone, batched):
        assert abs(alone_value - batched_value) <= 1e-5 and alone_greedy == batched_greedy, (alone, batched)


def test_evaluate_command_fails_when_lmms_eval_writes_no_results(tmp_path):
    """lmms-eval 0.7.3 exits with status 0 after an error; `evaluate` exits with 1 and says so."""
    command = [str(Path(sys.executable).parent / "llava-multilayer"), "evaluate", str(converted_dir("igva-clip"))]
    command += ["--tasks", "mllocal_no_such_task", "--output-path", str(tmp_path / "results")]
    result = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "llava-multilayer evaluate: error: evaluate: expected lmms-eval to write a *_results.json" in result.stderr


def test_data_parallel_under_accelerate_launch(task_dir, tmp_path):
    """Two CPU processes (`accelerate launch --cpu`, gloo) split the documents and give the single-process results."""
    name = "lsf-E_D-clip-3-18-23"
    output = tmp_path / "results"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "lmms_eval",
        "--model", "llava_multilayer",
        "--model_args", f"pretrained={converted_dir(name)},{MODEL_ARGS}",
        "--include_path", str(task_dir),
        "--tasks", TASKS,
        "--batch_size", "1",
        "--output_path", str(output),
        "--log_samples",
    ]
    responses = _evaluate(command, output, tmp_path)
    assert all(len(responses[task]) == len(ROWS) for task in responses), "the two ranks' documents were not gathered"
    _check(name, responses, igva=False)

"""Child process of tests/test_vllm.py and benchmarks/vllm_throughput.py: serves one checkpoint with vLLM (CPU) and
prints the greedy token ids of each request as JSON. One engine per process: vLLM keeps global state per engine.

Usage: python vllm_generate.py CHECKPOINT_DIR SPEC_JSON. SPEC_JSON holds "requests" (a list of {"prompt", "images"
(paths), "instructions" (optional)}), "max_tokens", optionally "ignore_eos", "dtype" and "model_impl"; the script
prints `VLLM_RESULT {"token_ids": [[...], ...], "seconds": generation time}`.
"""

import json
import sys
import time


def main(checkpoint: str, requests_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    spec = json.loads(open(requests_path).read())
    llm = LLM(
        model=checkpoint,
        trust_remote_code=True,
        dtype=spec.get("dtype", "float32"),
        max_model_len=512,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
        seed=0,
        **({"model_impl": spec["model_impl"]} if "model_impl" in spec else {}),
    )
    prompts = []
    for request in spec["requests"]:
        prompt = {"prompt": request["prompt"]}
        if request.get("images"):
            prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in request["images"]]}
        if request.get("instructions"):
            prompt["mm_processor_kwargs"] = {"instructions": request["instructions"]}
        prompts.append(prompt)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=spec.get("ignore_eos", False))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result = {"token_ids": [list(output.outputs[0].token_ids) for output in outputs], "seconds": seconds}
    print("VLLM_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])

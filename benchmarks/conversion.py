# Copyright 2026 The llava-multilayer authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Wall time and peak memory of converting a 7B-shaped MMFuser checkpoint, relative to copying its shards.

The benchmark first writes a synthetic checkpoint in the ORIGINAL MMFuser layout, as the original trainer
(transformers 4.37 `save_pretrained`) writes it: bfloat16 `model-0000k-of-0000n.safetensors` shards of at most 5 GB
+ `model.safetensors.index.json`, LLaMA-7B keys, the embedded CLIP ViT-L/14-336 tower
(`model.vision_tower.vision_tower.vision_model.*`, also saved as the `--vision-tower` directory's weights, which
the converter reads, checking the embedded copy against them), the MMFuser projector (`model.mm_projector.*`), the
original config.json and a 32000-piece SentencePiece tokenizer. Values are random; nothing is downloaded.

Then, in interleaved rounds (`--repeats`), each in a fresh subprocess with the source shards evicted from the page
cache (`posix_fadvise(DONTNEED)`) so that both read from disk:

- a plain copy of the shards and index (`shutil.copyfile`, i.e. an in-kernel copy) + fsync;
- `conversion_scripts/convert_mmfuser_to_hf.py` on the checkpoint + fsync of what it wrote.

Reported: time of each (median), `time_ratio = convert / copy`, the converter's peak resident memory (the
process's high-water mark `VmHWM`, which also counts the resident pages of memory-mapped files) against the largest
source shard, and against the checkpoint size.

    python benchmarks/conversion.py                  # the 7B shape: 14 GB written, ~45 GB of free disk needed
    python benchmarks/conversion.py --quick          # a ~230 MB checkpoint
    python benchmarks/conversion.py --workdir /big/disk --keep   # then --reuse THE_PRINTED_DIR to measure again
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "mmfuser-clip"  # SentencePiece model and tiny CLIP tower of the tests
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SELECT_LAYERS = [-22, -17, -12, -7, -2]
CLIP_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}

# Run in a fresh interpreter: ru_maxrss of RUSAGE_SELF is then the peak of this one conversion (or copy).
# Run in a fresh interpreter. The peak is VmHWM of /proc/self/status (the high-water mark of this process's own
# address space; ru_maxrss, the fallback off Linux, also counts the parent's pages copied by fork before exec).
PEAK_RSS = r"""
def peak_rss_bytes():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

CONVERT_CHILD = PEAK_RSS + r"""
import json, os, sys, time
from pathlib import Path
started = time.perf_counter()
from llava_multilayer.conversion.convert_mmfuser_to_hf import main
imported = time.perf_counter()
rss_after_import = peak_rss_bytes()
main(sys.argv[1:])
output = Path(sys.argv[sys.argv.index("--output-dir") + 1])
for path in output.iterdir():
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
finished = time.perf_counter()
print(json.dumps({
    "seconds": finished - imported, "import_seconds": imported - started,
    "peak_rss_bytes": peak_rss_bytes(), "rss_after_import_bytes": rss_after_import,
}))
"""

COPY_CHILD = PEAK_RSS + r"""
import json, os, shutil, sys, time
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
started = time.perf_counter()
target.mkdir()
names = sorted(p.name for p in source.iterdir() if p.name.endswith(".safetensors") or p.name.endswith(".index.json"))
for name in names:
    shutil.copyfile(source / name, target / name)
for name in names:
    with open(target / name, "rb") as handle:
        os.fsync(handle.fileno())
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}))
"""


def llm_config(args) -> dict:
    if args.quick:
        width, layers, intermediate, heads = 1024, 4, 2752, 8
    else:
        width, layers, intermediate, heads = 4096, 32, 11008, 32
    width = args.llm_width or width
    layers = args.llm_layers or layers
    if args.llm_width:
        intermediate, heads = int(width * 11008 / 4096), max(1, width // 128)
    return {"hidden_size": width, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "vocab_size": 32000}


def original_tensor_shapes(llm: dict, vision_tower_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of an original MMFuser finetune checkpoint, in the order its state dict lists them."""
    from transformers import AutoConfig, AutoModel

    from llava_multilayer.deformable_fusion_llava_multilayer import MMFuserBlock

    width, inner, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    shapes = [("model.embed_tokens.weight", (vocab, width))]
    for layer in range(llm["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes += [(prefix + f"self_attn.{name}_proj.weight", (width, width)) for name in ("q", "k", "v", "o")]
        shapes += [
            (prefix + "mlp.gate_proj.weight", (inner, width)),
            (prefix + "mlp.up_proj.weight", (inner, width)),
            (prefix + "mlp.down_proj.weight", (width, inner)),
            (prefix + "input_layernorm.weight", (width,)),
            (prefix + "post_attention_layernorm.weight", (width,)),
        ]
    shapes.append(("model.norm.weight", (width,)))
    vision_config = AutoConfig.from_pretrained(vision_tower_dir)
    with torch.device("meta"):
        tower = AutoModel.from_config(vision_config)
        block = MMFuserBlock(vision_config.hidden_size, num_levels=4, num_heads=16, num_points=4, layer_norm_eps=1e-6)
    shapes += [(VISION_PREFIX + key, tuple(t.shape)) for key, t in tower.state_dict().items()]
    renames = {"cross_attn_scale": "gamma1", "self_attn_scale": "gamma2"}
    shapes += [(f"model.mm_projector.0.{renames.get(k, k)}", tuple(t.shape)) for k, t in block.state_dict().items()]
    shapes += [
        ("model.mm_projector.1.weight", (width, vision_config.hidden_size)),
        ("model.mm_projector.1.bias", (width,)),
        ("model.mm_projector.3.weight", (width, width)),
        ("model.mm_projector.3.bias", (width,)),
        ("lm_head.weight", (vocab, width)),
    ]
    return shapes


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """transformers 4.37's `shard_checkpoint`: a new shard starts when the next tensor would overflow the current."""
    shards, current, current_size = [], [], 0
    for key, shape in shapes:
        size = 2 * max(1, int(torch.Size(shape).numel()))
        if current and current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append((key, shape))
        current_size += size
    shards.append(current)
    return shards


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """The tests' SentencePiece model grown to `vocab_size` pieces (the LLaMA tokenizer's size)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((FIXTURE / "original" / "tokenizer.model").read_bytes())
    for index in range(vocab_size - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score = f"\u2581w{index}", -1000.0 - index
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    (directory / "tokenizer.model").write_bytes(model.SerializeToString())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(FIXTURE / "original" / name, directory / name)


def write_vision_tower(directory: Path, quick: bool) -> None:
    """Config and image processor of the tower (its weights are written with the checkpoint)."""
    directory.mkdir(parents=True)
    if quick:
        for name in ("config.json", "preprocessor_config.json"):
            shutil.copyfile(FIXTURE / "vision_tower" / name, directory / name)
        return
    from transformers import CLIPVisionConfig

    settings = {k: v for k, v in _common.CLIP_L_336.items() if k != "model_type"}
    CLIPVisionConfig(**settings).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2) + "\n")


def write_checkpoint(directory: Path, llm: dict, vision_tower_dir: Path, max_shard_bytes: int, seed: int) -> dict:
    """Writes the synthetic original checkpoint, and its embedded tower copy as the tower's weights (the converter
    reads the tower from `--vision-tower` and checks the copy against it); returns the shard sizes."""
    from transformers import AutoConfig

    directory.mkdir(parents=True)
    vision_config = AutoConfig.from_pretrained(vision_tower_dir)
    config = json.loads((FIXTURE / "original" / "config.json").read_text())
    config.update(llm)
    config.update(
        {"num_key_value_heads": llm["num_attention_heads"], "max_position_embeddings": 4096,
         "mm_hidden_size": vision_config.hidden_size, "mm_vision_select_layer": SELECT_LAYERS,
         "torch_dtype": "bfloat16"}
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(directory, llm["vocab_size"])

    generator = torch.Generator().manual_seed(seed)
    shards = plan_shards(original_tensor_shapes(llm, vision_tower_dir), max_shard_bytes)
    weight_map, sizes, total, tower = {}, [], 0, {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            key: torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator)
            for key, shape in shard
        }
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        tower.update(
            {"vision_model." + key[len(VISION_PREFIX) :]: t for key, t in tensors.items() if VISION_PREFIX in key}
        )
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        weight_map.update(dict.fromkeys((key for key, _ in shard), name))
        sizes.append((directory / name).stat().st_size)
        total += size
        with open(directory / name, "rb") as handle:
            os.fsync(handle.fileno())
    save_file(tower, str(vision_tower_dir / "model.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shard_bytes": sizes, "num_tensors": len(weight_map), "tensor_bytes": total}


def evict_from_page_cache(directory: Path) -> None:
    """Drops the cached pages of the (clean) files of `directory`, so that the next reader reads the disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_child(code: str, argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"error: the subprocess failed ({' '.join(argv[:4])} ...):\n{result.stderr[-4000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["process_seconds"] = wall
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, "conversion")
    parser.set_defaults(repeats=1, warmup=0)
    parser.add_argument("--llm-width", type=int, help="LLaMA hidden size (default: 4096, 1024 with --quick).")
    parser.add_argument("--llm-layers", type=int, help="LLaMA decoder layers (default: 32, 4 with --quick).")
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        help="Max source shard size in MB (default: 5000, as the original; 64 with --quick).",
    )
    parser.add_argument(
        "--workdir", type=Path, help="Where to write the checkpoints (default: a temporary directory)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint (to --reuse it).")
    parser.add_argument("--reuse", type=Path, help="A directory kept by --keep: measure its checkpoint again.")
    args = parser.parse_args(argv)
    _common.setup(args)
    machine = _common.machine_info(torch.device("cpu"))
    shard_mb = args.shard_size_mb or (64 if args.quick else 5000)
    llm = llm_config(args)

    if args.reuse is not None:
        workdir = args.reuse
        written = json.loads((workdir / "written.json").read_text())
        llm, shard_mb = written["llm"], written["max_source_shard_mb"]
    else:
        workdir = Path(tempfile.mkdtemp(prefix="llava-multilayer-conversion-", dir=args.workdir))
    keep = args.keep or args.reuse is not None
    tower_dir, source = workdir / "vision_tower", workdir / "original"
    try:
        if args.reuse is None:
            write_vision_tower(tower_dir, args.quick)
            started = time.perf_counter()
            written = write_checkpoint(source, llm, tower_dir, int(shard_mb * 1e6), args.seed)
            written.update({"llm": llm, "max_source_shard_mb": shard_mb})
            (workdir / "written.json").write_text(json.dumps(written) + "\n")
            print(
                f"Wrote a {written['tensor_bytes'] / 1e9:.2f} GB checkpoint ({written['num_tensors']} tensors, "
                f"{len(written['shard_bytes'])} shards) in {time.perf_counter() - started:.0f} s to {source}"
            )
        copies, conversions = [], []
        for round_index in range(args.warmup + args.repeats):
            order = ("copy", "convert") if round_index % 2 == 0 else ("convert", "copy")
            for kind in order:
                evict_from_page_cache(source)
                target = workdir / kind
                if kind == "copy":
                    measured = run_child(COPY_CHILD, [str(source), str(target)])
                else:
                    measured = run_child(
                        CONVERT_CHILD,
                        ["--input-dir", str(source), "--vision-tower", str(tower_dir), "--output-dir", str(target)],
                    )
                if round_index >= args.warmup:
                    (copies if kind == "copy" else conversions).append(measured)
                shutil.rmtree(target)
    finally:
        for kind in ("copy", "convert"):
            shutil.rmtree(workdir / kind, ignore_errors=True)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    largest = max(written["shard_bytes"])
    total = sum(written["shard_bytes"])
    copy_seconds = _common.median([m["seconds"] for m in copies])
    convert_seconds = _common.median([m["seconds"] for m in conversions])
    peak = max(m["peak_rss_bytes"] for m in conversions)
    after_import = max(m["rss_after_import_bytes"] for m in conversions)
    result = {
        "checkpoint_bytes": total,
        "num_shards": len(written["shard_bytes"]),
        "largest_shard_bytes": largest,
        "num_tensors": written["num_tensors"],
        "copy_seconds": copy_seconds,
        "convert_seconds": convert_seconds,
        "convert_process_seconds": _common.median([m["process_seconds"] for m in conversions]),
        "convert_import_seconds": _common.median([m["import_seconds"] for m in conversions]),
        "time_ratio": convert_seconds / copy_seconds,
        "time_ratios_per_round": [c["seconds"] / p["seconds"] for c, p in zip(conversions, copies)],
        "copy_throughput_mb_s": total / copy_seconds / 1e6,
        "convert_throughput_mb_s": total / convert_seconds / 1e6,
        "peak_rss_bytes": peak,
        "rss_after_import_bytes": after_import,
        "copy_peak_rss_bytes": max(m["peak_rss_bytes"] for m in copies),
        "peak_rss_over_largest_shard": peak / largest,
        "peak_rss_over_checkpoint": peak / total,
        "peak_rss_above_import_over_largest_shard": (peak - after_import) / largest,
    }
    if keep:
        result["workdir"] = str(workdir)
        print(f"Kept the synthetic checkpoint in {workdir} (measure it again with --reuse {workdir}).")

    rows = [
        {"what": "checkpoint", "value": f"{total / 1e9:.3f} GB in {len(written['shard_bytes'])} shards "
                                        f"(largest {largest / 1e9:.3f} GB), {written['num_tensors']} tensors"},
        {"what": "plain copy", "value": f"{copy_seconds:.2f} s ({result['copy_throughput_mb_s']:.0f} MB/s)"},
        {"what": "conversion", "value": f"{convert_seconds:.2f} s ({result['convert_throughput_mb_s']:.0f} MB/s), "
                                        f"+{result['convert_import_seconds']:.1f} s of imports"},
        {"what": "time ratio (conversion / copy)", "value": f"{result['time_ratio']:.3f}"},
        {"what": "conversion peak RSS", "value": f"{peak / 1e9:.3f} GB ({after_import / 1e9:.3f} GB after imports)"},
        {"what": "peak RSS / largest shard", "value": f"{result['peak_rss_over_largest_shard']:.3f}"},
        {"what": "peak RSS / checkpoint", "value": f"{result['peak_rss_over_checkpoint']:.3f}"},
    ]
    _common.print_table("Conversion of an original MMFuser checkpoint (bfloat16, sharded)", rows,
                        [("what", "", ""), ("value", "", "")])
    targets = [
        _common.check_target("conversion time / plain copy", result["time_ratio"], 3.0),
        _common.check_target("conversion peak RSS / largest shard", result["peak_rss_over_largest_shard"], 1.25),
    ]
    _common.print_targets(targets)
    payload = {
        "benchmark": "conversion",
        "machine": machine,
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup, "llm": llm,
                     "max_source_shard_mb": shard_mb},
        "results": [result],
        "targets": targets,
    }
    _common.write_results(args.output, payload)
    return payload


if __name__ == "__main__":
    main()

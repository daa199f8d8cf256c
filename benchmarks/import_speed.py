"""Importing a Hugging Face Llama folder: seconds for `convert.py --to=julian` on SmolLM2-135M's shape.

    python benchmarks/import_speed.py              # ~1 min: builds the folder, then times the import

The folder is a random `transformers.LlamaForCausalLM` of SmolLM2-135M's shape (30 layers, d_model
576, 9 query / 3 K/V heads, d_ff 1536, vocabulary 49,152, tied embeddings), saved by
`save_pretrained` in bf16 as SmolLM2's own folder is, with the bundled tiny tokenizer's files
(what the tokenizer costs is not the question). It times, each in a fresh process as a user runs
them: `convert.py --to=julian` (read, check, transpose, stack, save the Orbax checkpoint) and
`checkpoint.load` of the HF folder itself (what `train.py --init_from=FOLDER` does), and prints one
table. The goal is under 30 s on the 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_folder(out: str) -> int:
    import torch
    import transformers

    from hf_tokenizer import save_hf_tokenizer
    from tokenizer import train_tokenizer
    from tokenizer_files import open_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100_000.0,
        tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    samples = os.path.join(REPO, "samples")
    texts = [os.path.join(samples, name) for name in sorted(os.listdir(samples)) if name.endswith(".txt")]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = train_tokenizer(texts, os.path.join(tmp, "tok"), vocab_size=4096)
        save_hf_tokenizer(open_tokenizer(tokenizer_path), out)
    return sum(p.numel() for p in model.parameters())


def timed(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smollm2_135m_shape")
        params = make_folder(folder)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        python_start = timed("-c", "import convert, checkpoint")
        convert_s = timed("convert.py", "--to=julian", f"--hf={folder}", f"--out={os.path.join(tmp, 'imported')}")
        load_s = timed("-c", f"import checkpoint; checkpoint.load({folder!r})")
        print(f"| what ({params:,} parameters, folder {size:.0f} MiB, bf16) | seconds |")
        print("| --- | --- |")
        print(f"| python + imports of convert.py and checkpoint.py alone | {python_start:.1f} |")
        print(f"| `convert.py --to=julian` (process, import, Orbax save) | {convert_s:.1f} |")
        print(f"| `checkpoint.load(FOLDER)` (process, import; what --init_from does) | {load_s:.1f} |")


if __name__ == "__main__":
    main()
